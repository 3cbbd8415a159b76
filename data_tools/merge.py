"""Merge token shards into one, in the order given, with megatron-core's IndexedDatasetBuilder.

    python -m data_tools.merge --inputs data/web-00 data/web-01 --output-prefix data/web

Every input is verified first (data_tools.indexed.check_shard, without the token scan) and all
must share one dtype; the output is written under temporary names and renamed when complete.
This imports torch and megatron-core (a few seconds); it is not on the preprocess hot path.
"""
import argparse
import json
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
    output_directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(output_directory):
        raise DataError(f"output directory {output_directory} does not exist; create it first")
    if os.path.abspath(output_prefix) in {os.path.abspath(prefix) for prefix in input_prefixes}:
        raise DataError(f"--output-prefix {output_prefix} is also an input")
    indices = [indexed.check_shard(prefix, check_tokens=False) for prefix in input_prefixes]
    dtypes = {index.dtype.name for index in indices}
    if len(dtypes) > 1:
        listing = ", ".join(f"{index.prefix}={index.dtype.name}" for index in indices)
        raise DataError(f"cannot merge shards of different dtypes ({listing})")
    vocab_sizes = {shard_metadata(prefix).get("vocab_size") for prefix in input_prefixes} - {None}
    if len(vocab_sizes) > 1:
        raise DataError(f"the inputs were made with different tokenizers (vocab sizes {sorted(vocab_sizes)})")

    indexed.join_with_megatron_builder(input_prefixes, output_prefix, indices[0].dtype)
    merged = indexed.check_shard(output_prefix, check_tokens=False)
    metadata = {key: value for key, value in shard_metadata(input_prefixes[0]).items()
                if key in ("tokenizer", "vocab_size", "eod", "dtype")}
    metadata["append_eod"] = all(shard_metadata(prefix).get("append_eod", False) for prefix in input_prefixes)
    metadata.update(documents=merged.num_documents, tokens=merged.num_tokens,
                    merged_from=[os.path.abspath(prefix) for prefix in input_prefixes])
    with open(f"{output_prefix}.meta.json.tmp", "w") as stream:
        json.dump(metadata, stream, indent=2)
        stream.write("\n")
    os.replace(f"{output_prefix}.meta.json.tmp", f"{output_prefix}.meta.json")
    return merged


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
