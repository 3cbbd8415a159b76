"""Check that a token shard's .idx and .bin agree; exit 2 with a one-line reason when they do not.

    python -m data_tools.verify data/web data/books --tokenizer tok/cheems.model

Checks (data_tools.indexed.check_shard): index magic, format version and dtype; index size
against its header counts; non-negative sequence lengths; sequence pointers equal to the running
byte offsets; document indices from 0 to n, never going backwards; .bin size equal to the indexed
bytes (a truncated .bin is named as such); token ids inside the vocabulary; and, when the shard
was written with --append-eod, an EOD at the end of every document. The EOD id and vocabulary
come from --tokenizer, else from PREFIX.meta.json written by data_tools.preprocess.
"""
import argparse
import logging
import os
import sys

from data_tools._cli import run_cli, setup_logging
from data_tools.errors import DataError
from data_tools.indexed import check_shard, read_json_object

logger = logging.getLogger(__name__)


def shard_metadata(prefix: str) -> dict:
    """PREFIX.meta.json as a dict ({} when absent)."""
    path = f"{prefix}.meta.json"
    return read_json_object(path) if os.path.exists(path) else {}


def expected_ids(prefix: str, tokenizer_path: str | None, check_eod: str):
    """(eod id or None, vocab size or None) to check a shard against."""
    metadata = shard_metadata(prefix)
    eod = vocab_size = None
    if tokenizer_path:
        from data_tools.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
        eod, vocab_size = tokenizer.eod, tokenizer.vocab_size
    else:
        eod, vocab_size = metadata.get("eod"), metadata.get("vocab_size")
    wants_eod = {"auto": metadata.get("append_eod", tokenizer_path is not None),
                 "yes": True, "no": False}[check_eod]
    if wants_eod and eod is None:
        raise DataError(f"{prefix}: no EOD id to check; pass --tokenizer")
    return (eod if wants_eod else None), vocab_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.verify",
        description=("Verify token shards (PREFIX.bin + PREFIX.idx): sizes, pointers, dtype, "
                     "version, token ids and EOD positions. Exit status 2 names the first fault.\n\n"
                     "example:\n  python -m data_tools.verify data/web --tokenizer tok/cheems.model"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX",
                        help="shard path(s) without .bin/.idx")
    parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                        help="sentencepiece model giving the EOD id and vocabulary size "
                             "(default: read them from PREFIX.meta.json)")
    parser.add_argument("--check-eod", default="auto", choices=["auto", "yes", "no"],
                        help="require every document to end with EOD: auto = when the shard was "
                             "written with --append-eod (per PREFIX.meta.json, or when --tokenizer "
                             "is given) (default: auto)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.verbose)
    for prefix in arguments.prefixes:
        eod, vocab_size = expected_ids(prefix, arguments.tokenizer, arguments.check_eod)
        index = check_shard(prefix, eod_id=eod, vocab_size=vocab_size)
        checks = ["sizes", "pointers", "document indices", "dtype " + index.dtype.name]
        if vocab_size is not None:
            checks.append(f"ids < {vocab_size}")
        if eod is not None:
            checks.append(f"EOD {eod} ends every document")
        print(f"{prefix}: OK ({index.num_documents:,} documents, {index.num_tokens:,} tokens; "
              f"checked {', '.join(checks)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
