"""Tokenize text into a megatron-core token shard `P.bin` + `P.idx` (one sequence per document).

    python -m data_tools.preprocess --input corpus/*.jsonl.gz --output-prefix data/web \\
        --tokenizer tok/cheems.model --workers 8 --append-eod

Pipeline: the main process plans work units (files, and byte ranges of large uncompressed files;
see data_tools.inputs) and hands them to a pool of worker processes. Each worker reads its unit,
parses and batch-encodes the documents with sentencepiece (one thread per worker: the workers
are the parallelism), and streams the token ids as raw `dtype` bytes into a part file next to
the output, returning the per-document lengths. The main process appends the parts to the
output in unit order, so the output order is the input order whatever the worker count. Output
goes to temporary names and is renamed only when complete (data_tools.indexed.ShardWriter).

Start-up matters (the benchmark counts it): nothing here imports torch or megatron. With
`--writer megatron` the parts are joined by megatron-core's `IndexedDatasetBuilder.add_index`
instead (identical bytes; costs ~3 s of imports).
"""
import argparse
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy

from data_tools import indexed
from data_tools._cli import run_cli, setup_logging
from data_tools.errors import DataError
from data_tools.inputs import ReadStats, WorkUnit, expand_inputs, iter_documents, plan_units
from data_tools.staging import claim_staging_path
from data_tools.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# A batch handed to sentencepiece: large enough to amortise the call, small enough to keep the
# progress bar moving and memory flat.
BATCH_DOCUMENTS = 1024
BATCH_CHARACTERS = 1 << 20
# Documents longer than this are encoded in segments cut at whitespace, so a 100 MB document
# never becomes one sentencepiece call or one Python list of ids. sentencepiece is also faster
# on pieces of this size than on long strings (measured: 3.2 MB/s at 64 KiB, 1.7 MB/s at 1 MiB),
# and its pieces never span whitespace, so cutting at a space leaves the ids unchanged.
SEGMENT_CHARACTERS = 1 << 16
SEGMENTS_PER_CALL = 16


@dataclass
class Settings:
    tokenizer_path: str
    json_key: str
    text_mode: str
    skip_bad_lines: bool
    append_eod: bool
    dtype: str                 # numpy dtype name
    parts_directory: str


@dataclass
class UnitResult:
    order: int
    part_path: str
    lengths: numpy.ndarray     # (documents,) int32
    stats: ReadStats
    tokens: int


# Worker state: set once per worker process by _init_worker.
_worker_tokenizer = None
_worker_counters = None


def _init_worker(tokenizer_path: str, counters) -> None:
    """Per worker process: load the tokenizer; count this worker in (counters[3], see preprocess)."""
    global _worker_tokenizer, _worker_counters
    if counters is not None:
        # A pool worker: Ctrl-C reaches the whole process group, but only the main process acts
        # on it (it stops the pool, which ends the workers with SIGTERM, and removes the
        # temporary files); the SIGTERM handler inherited from the main process is dropped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    _worker_counters = counters
    if counters is not None:
        with counters.get_lock():
            counters[3] += 1


def _report_progress(documents: int, tokens: int, bytes_read: int) -> None:
    if _worker_counters is None:
        return
    with _worker_counters.get_lock():
        _worker_counters[0] += documents
        _worker_counters[1] += tokens
        _worker_counters[2] += bytes_read


def _segments(text: str):
    """Cut a long document into pieces of about SEGMENT_CHARACTERS, each (but the first) starting
    at a space, newline or tab, so that encoding the pieces gives the ids of encoding the whole.
    (A 32 KiB stretch without any of them, rare outside binary junk, is cut where it stands.)"""
    start = 0
    while len(text) - start > SEGMENT_CHARACTERS:
        low, high = start + SEGMENT_CHARACTERS // 2, start + SEGMENT_CHARACTERS
        cut = max(text.rfind(" ", low, high), text.rfind("\n", low, high), text.rfind("\t", low, high))
        if cut <= start:
            cut = high
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_unit(task) -> UnitResult:
    """Worker: read, encode and write one work unit to its part file."""
    unit, settings = task
    tokenizer = _worker_tokenizer
    processor = tokenizer.processor
    dtype = numpy.dtype(settings.dtype)
    eod = tokenizer.eod
    stats = ReadStats()
    part_path = os.path.join(settings.parts_directory, f"unit-{unit.order:06d}.bin")
    length_chunks = []
    total_tokens = 0
    reported = [0, 0]   # documents, bytes already reported to the progress counters

    with open(part_path, "wb") as part:
        batch = []
        batch_characters = 0

        def flush():
            nonlocal batch, batch_characters, total_tokens
            if not batch:
                return
            encoded = processor.encode(batch, num_threads=1)
            lengths = numpy.fromiter(map(len, encoded), dtype=numpy.int64, count=len(encoded))
            flat = numpy.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                                  count=int(lengths.sum()))
            if settings.append_eod:
                flat = numpy.insert(flat, numpy.cumsum(lengths), numpy.array(eod, dtype=dtype))
                lengths += 1
            part.write(flat.tobytes())
            length_chunks.append(lengths.astype(numpy.int32))
            total_tokens += int(flat.size)
            _report_progress(stats.documents - reported[0], int(flat.size), stats.bytes_read - reported[1])
            reported[0], reported[1] = stats.documents, stats.bytes_read
            batch = []
            batch_characters = 0

        for document in iter_documents(unit, settings.json_key, settings.text_mode,
                                       settings.skip_bad_lines, stats):
            if len(document) > SEGMENT_CHARACTERS:
                flush()
                length = 0
                segments = _segments(document)
                while True:
                    group = list(itertools.islice(segments, SEGMENTS_PER_CALL))
                    if not group:
                        break
                    encoded = processor.encode(group, num_threads=1)
                    count = sum(map(len, encoded))
                    ids = numpy.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=count)
                    part.write(ids.tobytes())
                    length += count
                del document, segments
                if settings.append_eod:
                    part.write(numpy.array([eod], dtype=dtype).tobytes())
                    length += 1
                length_chunks.append(numpy.array([length], dtype=numpy.int32))
                total_tokens += length
                _report_progress(stats.documents - reported[0], length, stats.bytes_read - reported[1])
                reported[0], reported[1] = stats.documents, stats.bytes_read
                continue
            batch.append(document)
            batch_characters += len(document)
            if len(batch) >= BATCH_DOCUMENTS or batch_characters >= BATCH_CHARACTERS:
                flush()
        flush()
    _report_progress(stats.documents - reported[0], 0, stats.bytes_read - reported[1])
    lengths = numpy.concatenate(length_chunks) if length_chunks else numpy.zeros(0, numpy.int32)
    return UnitResult(unit.order, part_path, lengths, stats, total_tokens)


class Progress:
    """A one-line progress bar on stderr (a log line every 10 s when stderr is not a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total_bytes = max(total_bytes, 1)
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.last_drawn = self.started

    def update(self, documents: int, tokens: int, bytes_read: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = 0.2 if self.interactive else 10.0
        if not final and now - self.last_drawn < interval:
            return
        self.last_drawn = now
        elapsed = max(now - self.started, 1e-9)
        fraction = min(bytes_read / self.total_bytes, 1.0)
        width = 24
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        line = (f"[{bar}] {fraction * 100:5.1f}% {documents:,} docs {tokens:,} tokens "
                f"{documents / elapsed:,.0f} docs/s {tokens / elapsed / 1e6:.2f}M tokens/s")
        if final:
            line += f" in {_clock(elapsed)}"
        elif fraction > 0:
            line += f" ETA {_clock(elapsed * (1 - fraction) / fraction)}"
        if self.interactive:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            logger.info(line)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Summary:
    documents: int
    tokens: int
    bytes_read: int
    seconds: float
    empty_documents: int
    bad_lines: int
    dtype: str
    output_prefix: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"{self.output_prefix}: {self.documents:,} docs, {self.tokens:,} tokens, "
                f"{self.bytes_read:,} bytes in {self.seconds:.2f} s = "
                f"{self.tokens_per_second / 1e6:.2f}M tokens/s, "
                f"{self.documents / max(self.seconds, 1e-9):,.0f} docs/s "
                f"({self.dtype}; skipped {self.empty_documents} empty documents, "
                f"{self.bad_lines} bad lines)")


def _join_parts_megatron(results: list[UnitResult], prefix: str, dtype: numpy.dtype, also_rename=()) -> None:
    """Join the parts with megatron-core's IndexedDatasetBuilder (the library path)."""
    part_prefixes = []
    for result in results:
        part_prefix = result.part_path[: -len(".bin")]
        indexed.write_index_file(indexed.idx_path(part_prefix), dtype, result.lengths,
                                 numpy.arange(len(result.lengths) + 1, dtype=numpy.int64))
        part_prefixes.append(part_prefix)
    indexed.join_with_megatron_builder(part_prefixes, prefix, dtype, also_rename)


def preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str, json_key: str = "text",
               workers: int = 1, append_eod: bool = False, format_name: str = "auto",
               text_mode: str = "blocks", skip_bad_lines: bool = False, dtype_name: str = "auto",
               chunk_bytes: int | None = None, writer: str = "fast",
               progress: bool = False) -> Summary:
    """Tokenize `inputs` into `output_prefix.bin/.idx`; returns the summary. See module docstring."""
    started = time.perf_counter()
    if workers < 1:
        raise DataError(f"--workers {workers}: need at least 1")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise DataError(f"--chunk-mb: need a positive size, got {chunk_bytes} bytes")
    indexed.check_output_prefix(output_prefix)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = indexed.parse_token_dtype(dtype_name, tokenizer.vocab_size)
    paths = expand_inputs(inputs)
    total_bytes = sum(os.path.getsize(path) for path in paths)
    if chunk_bytes is None:
        # About 32 units per worker: the last unit, which one worker finishes while the others
        # idle, is then ~1.5% of the work; bounded so a unit is never tiny or huge.
        chunk_bytes = min(max(total_bytes // (workers * 32), 256 << 10), 64 << 20)
    units = plan_units(paths, format_name, text_mode, chunk_bytes)
    logger.info("preprocess: %d files, %.1f MB, %d work units, %d workers, %s tokens",
                len(paths), total_bytes / 1e6, len(units), workers, dtype.name)

    # (a killed run's encoded parts, as large as the output, go first)
    parts_directory = claim_staging_path(output_prefix, "parts")
    os.makedirs(parts_directory, exist_ok=True)
    settings = Settings(tokenizer_path, json_key, text_mode, skip_bad_lines, append_eod,
                        dtype.name, parts_directory)
    bar = Progress(total_bytes, progress)
    stats = ReadStats()
    total_tokens = 0
    try:
        # The shard writer opens its temporary files first, so a bad output path fails early.
        with indexed.ShardWriter(output_prefix, dtype) as shard:
            results = []

            def consume(result: UnitResult):
                nonlocal total_tokens
                stats.add(result.stats)
                total_tokens += result.tokens
                if writer == "fast":
                    shard.append_raw(result.part_path, result.lengths)
                    os.remove(result.part_path)
                else:
                    results.append(result)

            tasks = [(unit, settings) for unit in units]
            if workers == 1:
                _init_worker(tokenizer_path, None)
                for task in tasks:
                    consume(encode_unit(task))
                    bar.update(stats.documents, total_tokens, stats.bytes_read)
            else:
                # multiprocessing.Pool queues every task up front, so workers never wait for the
                # main process (concurrent.futures feeds them from a thread of the main process,
                # which a loaded machine may not schedule promptly). Pool silently replaces a
                # worker that dies (the OS killing it for memory, say) and would then wait
                # forever for its lost task; each worker counts itself in at start-up, so a
                # count above `workers` means one died, and the run stops with an error.
                context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
                counters = context.Array("q", 4)
                with context.Pool(workers, initializer=_init_worker,
                                  initargs=(tokenizer_path, counters)) as pool:
                    pending = pool.imap(encode_unit, tasks)
                    for _ in tasks:
                        while True:
                            try:
                                result = pending.next(timeout=0.2)
                                break
                            except multiprocessing.TimeoutError:
                                if counters[3] > workers:
                                    raise DataError("a worker process died while encoding (killed by "
                                                    "the OS, out of memory?); no output was written") from None
                                bar.update(counters[0], counters[1], counters[2])
                        consume(result)
                        bar.update(counters[0], counters[1], counters[2])
            if stats.documents == 0:
                # An empty shard would only fail later, deep inside the training data pipeline.
                _report_bad_lines(stats)
                named = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
                raise DataError(f"no documents in {named} ({stats.empty_documents} empty documents, "
                                f"{stats.bad_lines} bad lines skipped); nothing written")
            summary = Summary(stats.documents, total_tokens, stats.bytes_read, 0.0,
                              stats.empty_documents, stats.bad_lines, dtype.name, output_prefix)
            # The metadata is renamed into place together with the shard, never apart from it.
            with indexed.staged_json(f"{output_prefix}.meta.json",
                                     _metadata(tokenizer, summary, append_eod, paths)) as metadata:
                if writer == "megatron":
                    shard.abort()
                    _join_parts_megatron(results, output_prefix, dtype, also_rename=[metadata])
                else:
                    shard.commit(also_rename=[metadata])
    finally:
        shutil.rmtree(parts_directory, ignore_errors=True)
    bar.update(stats.documents, total_tokens, stats.bytes_read, final=True)
    _report_bad_lines(stats)
    summary.seconds = time.perf_counter() - started
    return summary


def _report_bad_lines(stats: ReadStats) -> None:
    for example in stats.bad_line_examples:
        logger.warning("skipped %s", example)
    if stats.bad_lines:
        logger.warning("skipped %d bad lines in total", stats.bad_lines)


def _metadata(tokenizer, summary: Summary, append_eod: bool, paths) -> dict:
    """`P.meta.json`: what made the shard; verify/inspect read the EOD id and vocab from it."""
    return {
        "tokenizer": os.path.abspath(tokenizer.model_path),
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "append_eod": append_eod,
        "dtype": summary.dtype,
        "documents": summary.documents,
        "tokens": summary.tokens,
        "input_bytes": summary.bytes_read,
        "empty_documents_skipped": summary.empty_documents,
        "bad_lines_skipped": summary.bad_lines,
        "inputs": [os.path.abspath(path) for path in paths][:1000],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.preprocess",
        description=(
            "Tokenize JSONL or plain-text files (optionally .gz) into a megatron-core token shard "
            "PREFIX.bin + PREFIX.idx, in parallel over files and chunks of large files.\n\n"
            "example:\n  python -m data_tools.preprocess --input 'corpus/*.jsonl.gz' "
            "--output-prefix data/web --tokenizer tok/cheems.model --workers 8 --append-eod"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files, globs (quote them; ** recurses) or directories; "
                             ".jsonl/.json/.ndjson are JSONL, anything else plain text; .gz is read compressed")
    parser.add_argument("--output-prefix", required=True,
                        help="output path without extension: writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json "
                             "(the directory must exist)")
    parser.add_argument("--tokenizer", required=True, metavar="MODEL",
                        help="sentencepiece .model from data_tools.train_tokenizer")
    parser.add_argument("--json-key", default="text",
                        help="JSONL field holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes encoding in parallel (default: all cores)")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the tokenizer's EOD id after every document (needed for "
                             "document masking and for the trainer's sample packing)")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"],
                        help="input format; auto decides by file extension (default: auto)")
    parser.add_argument("--text-mode", default="blocks", choices=["blocks", "file"],
                        help="plain text: a document per blank-line-separated block, or per file "
                             "(default: blocks)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed JSON lines, lines without the key and non-UTF-8 lines, "
                             "count and report them, instead of stopping at the first with its file:line")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "int32"],
                        help="token dtype in PREFIX.bin; auto: uint16 when the vocabulary has fewer "
                             "than 65 500 ids, else int32 (default: auto)")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="split uncompressed files into work units of about this many MB "
                             "(default: total size / (32 x workers), between 0.25 and 64)")
    parser.add_argument("--writer", default="fast", choices=["fast", "megatron"],
                        help="fast: write the .bin/.idx with numpy (byte-identical to megatron-core's); "
                             "megatron: join the parts with megatron-core's IndexedDatasetBuilder "
                             "(adds ~3 s of torch/megatron imports) (default: fast)")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not draw the progress bar (the summary line is still printed)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(argv=None) -> int:
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.verbose)
    if arguments.chunk_mb is not None and not 0 < arguments.chunk_mb < float("inf"):
        raise DataError(f"--chunk-mb {arguments.chunk_mb}: need a positive, finite number of MB")
    summary = preprocess(
        arguments.input, arguments.output_prefix, arguments.tokenizer,
        json_key=arguments.json_key, workers=arguments.workers, append_eod=arguments.append_eod,
        format_name=arguments.format, text_mode=arguments.text_mode,
        skip_bad_lines=arguments.skip_bad_lines, dtype_name=arguments.dtype,
        chunk_bytes=None if arguments.chunk_mb is None else max(int(arguments.chunk_mb * (1 << 20)), 1),
        writer=arguments.writer, progress=not arguments.no_progress,
    )
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
