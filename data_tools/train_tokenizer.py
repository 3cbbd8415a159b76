"""Train the project's sentencepiece tokenizer (byte fallback) from JSONL or plain-text files.

    python -m data_tools.train_tokenizer --input corpus/*.jsonl --vocab-size 32000 \\
        --model-prefix tok/cheems --model-type bpe --sample-docs 200000

Writes P.model, P.vocab and P.tokenizer.json (vocab size and the pad/unk/bos/eos/eod ids; see
data_tools.tokenizer). Documents are read like data_tools.preprocess reads them; each non-empty
line of a document is one training sentence. --sample-docs keeps a uniform random sample of that
many documents (reservoir sampling, fixed --seed), so the result is deterministic.
"""
import argparse
import logging
import random
import sys

from data_tools._cli import run_cli, setup_logging
from data_tools.errors import DataError
from data_tools.inputs import ReadStats, expand_inputs, iter_documents, plan_units
from data_tools.tokenizer import train_sentencepiece

logger = logging.getLogger(__name__)


def read_documents(inputs, json_key="text", format_name="auto", text_mode="blocks",
                   skip_bad_lines=False, sample_documents=None, seed=1234):
    """All documents of the inputs (or a seeded uniform sample of `sample_documents` of them)."""
    paths = expand_inputs(inputs)
    units = plan_units(paths, format_name, text_mode, chunk_bytes=1 << 62)
    stats = ReadStats()
    generator = random.Random(seed)
    kept = []
    seen = 0
    for unit in units:
        for document in iter_documents(unit, json_key, text_mode, skip_bad_lines, stats):
            if sample_documents is None or len(kept) < sample_documents:
                kept.append(document)
            else:
                slot = generator.randrange(seen + 1)
                if slot < sample_documents:
                    kept[slot] = document
            seen += 1
    logger.info("train_tokenizer: read %d documents (%d empty skipped, %d bad lines skipped), "
                "training on %d", stats.documents, stats.empty_documents, stats.bad_lines, len(kept))
    if not kept:
        raise DataError(f"no documents in {', '.join(paths)}")
    return kept


def sentences_of(documents):
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                yield line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.train_tokenizer",
        description=(
            "Train a byte-fallback sentencepiece tokenizer; writes PREFIX.model, PREFIX.vocab and "
            "PREFIX.tokenizer.json (vocab size, pad/unk/bos/eos/eod ids).\n\n"
            "example:\n  python -m data_tools.train_tokenizer --input 'corpus/*.jsonl' "
            "--vocab-size 32000 --model-prefix tok/cheems --sample-docs 200000"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files, globs or directories (JSONL by extension .jsonl/.json/.ndjson, "
                             "else plain text; .gz read compressed)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="vocabulary size including the 4 special pieces and 256 byte pieces")
    parser.add_argument("--model-prefix", required=True,
                        help="output path without extension (the directory must exist)")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                        help="sentencepiece model type (default: bpe)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"],
                        help="input format; auto decides by extension (default: auto)")
    parser.add_argument("--text-mode", default="blocks", choices=["blocks", "file"],
                        help="plain text: a document per blank-line block, or per file (default: blocks)")
    parser.add_argument("--sample-docs", type=int, default=None,
                        help="train on a uniform random sample of this many documents (default: all)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the document sample (default: 1234)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed/non-UTF-8 lines instead of stopping")
    parser.add_argument("--threads", type=int, default=2, help="sentencepiece trainer threads (default: 2)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.verbose)
    if arguments.vocab_size < 300:
        raise DataError(f"--vocab-size {arguments.vocab_size}: byte fallback alone needs 260 ids; "
                        f"use at least 300")
    if arguments.sample_docs is not None and arguments.sample_docs < 1:
        raise DataError(f"--sample-docs {arguments.sample_docs}: need at least 1")
    if not 1 <= arguments.threads <= 1024:
        raise DataError(f"--threads {arguments.threads}: sentencepiece takes 1 to 1024")
    documents = read_documents(arguments.input, arguments.json_key, arguments.format,
                               arguments.text_mode, arguments.skip_bad_lines,
                               arguments.sample_docs, arguments.seed)
    tokenizer = train_sentencepiece(sentences_of(documents), arguments.model_prefix,
                                    arguments.vocab_size, arguments.model_type, arguments.threads)
    ids = tokenizer.special_ids()
    print(f"{arguments.model_prefix}.model: vocab {ids['vocab_size']}, pad {ids['pad']}, unk {ids['unk']}, "
          f"bos {ids['bos']}, eos {ids['eos']}, eod {ids['eod']} (sidecar {arguments.model_prefix}.tokenizer.json)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
