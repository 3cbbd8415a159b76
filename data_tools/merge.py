"""Merge token shards into one, in the order given, with megatron-core's IndexedDatasetBuilder.

    python -m data_tools.merge --inputs data/web-00 data/web-01 --output-prefix data/web

Every input is verified first (data_tools.indexed.check_shard, without the token scan) and all
must share one dtype; the output is written under temporary names and renamed when complete.
This imports torch and megatron-core (a few seconds); it is not on the preprocess hot path.
"""
import argparse
import logging
import os
import sys

from data_tools import indexed
from data_tools._cli import run_cli, setup_logging
from data_tools.errors import DataError
from data_tools.verify import shard_metadata

logger = logging.getLogger(__name__)


def merge_shards(input_prefixes: list[str], output_prefix: str) -> indexed.ShardIndex:
    """Concatenate shards (documents in input order) into output_prefix.bin/.idx."""
    if not input_prefixes:
        raise DataError("no input shards to merge")
    indexed.check_output_prefix(output_prefix)
    if os.path.abspath(output_prefix) in {os.path.abspath(prefix) for prefix in input_prefixes}:
        raise DataError(f"--output-prefix {output_prefix} is also an input")
    indices = [indexed.check_shard(prefix, check_tokens=False) for prefix in input_prefixes]
    dtypes = {index.dtype.name for index in indices}
    if len(dtypes) > 1:
        listing = ", ".join(f"{index.prefix}={index.dtype.name}" for index in indices)
        raise DataError(f"cannot merge shards of different dtypes ({listing})")
    metadatas = [shard_metadata(prefix) for prefix in input_prefixes]
    vocab_sizes = {metadata.get("vocab_size") for metadata in metadatas} - {None}
    if len(vocab_sizes) > 1:
        raise DataError(f"the inputs were made with different tokenizers (vocab sizes {sorted(vocab_sizes)})")
    with_eod = [prefix for prefix, metadata in zip(input_prefixes, metadatas) if metadata.get("append_eod") is True]
    without_eod = [prefix for prefix, metadata in zip(input_prefixes, metadatas) if metadata.get("append_eod") is False]
    if with_eod and without_eod:
        raise DataError(f"cannot merge shards with and without an EOD after each document ({with_eod[0]} was "
                        f"preprocessed with --append-eod, {without_eod[0]} without)")

    metadata = {key: value for key, value in metadatas[0].items()
                if key in ("tokenizer", "vocab_size", "eod", "dtype")}
    metadata["append_eod"] = all(shard.get("append_eod", False) for shard in metadatas)
    metadata.update(documents=sum(index.num_documents for index in indices),
                    tokens=sum(index.num_tokens for index in indices),
                    merged_from=[os.path.abspath(prefix) for prefix in input_prefixes])
    # Written first and renamed together with the merged .bin/.idx, never apart from them.
    with indexed.staged_json(f"{output_prefix}.meta.json", metadata) as staged:
        indexed.join_with_megatron_builder(input_prefixes, output_prefix, indices[0].dtype, [staged])
    return indexed.check_shard(output_prefix, check_tokens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.merge",
        description=("Merge token shards into one (documents in the order given), through "
                     "megatron-core's IndexedDatasetBuilder.add_index.\n\nexample:\n"
                     "  python -m data_tools.merge --inputs data/web-00 data/web-01 --output-prefix data/web"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX",
                        help="shard prefixes (without .bin/.idx) to merge, in order")
    parser.add_argument("--output-prefix", required=True,
                        help="merged shard path without extension (the directory must exist)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.verbose)
    merged = merge_shards(arguments.inputs, arguments.output_prefix)
    print(f"{arguments.output_prefix}: merged {len(arguments.inputs)} shards, "
          f"{merged.num_documents:,} documents, {merged.num_tokens:,} tokens ({merged.dtype.name})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
