"""Show what is in a token shard: counts, document length statistics and a decoded sample.

    python -m data_tools.inspect data/web --tokenizer tok/cheems.model --samples 2

Reads the shard with numpy only (fast, no torch); the tokenizer comes from --tokenizer or from
PREFIX.meta.json. Structural faults raise the same one-line errors as data_tools.verify.
"""
import argparse
import sys

import numpy

from data_tools._cli import run_cli, setup_logging
from data_tools.errors import DataError
from data_tools.indexed import bin_path, check_shard
from data_tools.verify import shard_metadata


def describe(prefix: str, tokenizer_path: str | None = None, samples: int = 1,
             max_characters: int = 400, seed: int = 0) -> str:
    """A multi-line human-readable description of the shard."""
    if samples < 0:
        raise DataError(f"--samples {samples}: need 0 or more")
    if max_characters < 0:
        raise DataError(f"--max-chars {max_characters}: need 0 or more")
    index = check_shard(prefix, check_tokens=False)
    metadata = shard_metadata(prefix)
    lengths = numpy.asarray(index.sequence_lengths, dtype=numpy.int64)
    lines = [
        f"shard        {prefix}",
        f"dtype        {index.dtype.name}",
        f"documents    {index.num_documents:,}",
        f"sequences    {index.num_sequences:,}",
        f"tokens       {index.num_tokens:,}",
    ]
    if len(lengths):
        percentiles = numpy.percentile(lengths, [50, 90, 99])
        lines.append(
            f"doc length   min {lengths.min():,}  mean {lengths.mean():,.1f}  median {percentiles[0]:,.0f}  "
            f"p90 {percentiles[1]:,.0f}  p99 {percentiles[2]:,.0f}  max {lengths.max():,}")
    for key in ("tokenizer", "eod", "append_eod", "empty_documents_skipped", "bad_lines_skipped"):
        if key in metadata:
            lines.append(f"{key:<12} {metadata[key]}")
    tokenizer_path = tokenizer_path or metadata.get("tokenizer")
    if samples and len(lengths):
        if not tokenizer_path:
            raise DataError(f"{prefix}: no tokenizer to decode a sample; pass --tokenizer")
        from data_tools.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
        tokens = numpy.memmap(bin_path(prefix), mode="r", dtype=index.dtype)
        generator = numpy.random.default_rng(seed)
        chosen = generator.choice(len(lengths), size=min(samples, len(lengths)), replace=False)
        for document in sorted(chosen.tolist()):
            start = int(index.sequence_pointers[document]) // index.dtype.itemsize
            ids = tokens[start:start + int(lengths[document])]
            if len(ids) and int(ids.max()) >= tokenizer.vocab_size:
                raise DataError(f"{bin_path(prefix)}: document {document} holds token id {int(ids.max())}, "
                                f"outside the {tokenizer.vocab_size} ids of {tokenizer_path} (the wrong "
                                f"tokenizer, or a corrupt shard: run data_tools.verify)")
            text = tokenizer.decode(ids.tolist())
            shown = text if len(text) <= max_characters else text[:max_characters] + " [...]"
            lines.append(f"--- document {document} ({len(ids)} tokens; first ids "
                         f"{ids[:8].tolist()}; last {ids[-2:].tolist()}) ---")
            lines.append(shown)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.inspect",
        description=("Print a token shard's counts, document length statistics and decoded "
                     "sample documents.\n\nexample:\n  python -m data_tools.inspect data/web --samples 2"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prefix", metavar="PREFIX", help="shard path without .bin/.idx")
    parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                        help="sentencepiece model to decode samples (default: the one in PREFIX.meta.json)")
    parser.add_argument("--samples", type=int, default=1,
                        help="number of random documents to decode and print (default: 1; 0: none)")
    parser.add_argument("--max-chars", type=int, default=400,
                        help="cut each printed sample after this many characters (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed choosing the sample documents (default: 0)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.verbose)
    print(describe(arguments.prefix, arguments.tokenizer, arguments.samples,
                   arguments.max_chars, arguments.seed))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
