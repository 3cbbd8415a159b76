"""The megatron-core indexed dataset format (`P.bin` + `P.idx`), written and checked with numpy only.

Why this exists beside megatron-core's `IndexedDatasetBuilder`: importing
`megatron.core.datasets.indexed_dataset` imports all of `megatron.core` and torch (about 3 s on the
2-core CPU machine, measured), which alone is more than the whole start-up budget of
`data_tools.preprocess`. The format is small and fixed, so the preprocess hot path writes it here;
`tests/unit/test_data_indexed.py` checks that the bytes are identical to what
`IndexedDatasetBuilder` writes for the same documents and that megatron-core's own
`IndexedDataset` reads them back; `preprocess --writer megatron` assembles the output through
`IndexedDatasetBuilder.add_index` instead, for anyone who wants the library path.

Layout (little endian; n sequences, d + 1 document boundaries; one sequence per document here):
    P.idx: b"MMIDIDX\\x00\\x00" | u64 version = 1 | u8 dtype code | u64 n | u64 d + 1
           | int32 sequence_lengths[n] | int64 sequence_pointers[n] (byte offsets into P.bin)
           | int64 document_indices[d + 1] (sequence index where each document starts; 0 .. n)
    P.bin: the tokens of all sequences back to back, in the dtype of the code.
"""
import contextlib
import json
import logging
import os
import signal
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy

from data_tools.errors import DataError
from data_tools.staging import claim_staging_path

logger = logging.getLogger(__name__)

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: code -> numpy dtype.
DTYPE_BY_CODE = {
    1: numpy.uint8,
    2: numpy.int8,
    3: numpy.int16,
    4: numpy.int32,
    5: numpy.int64,
    6: numpy.float64,
    7: numpy.float32,
    8: numpy.uint16,
}
CODE_BY_DTYPE = {numpy.dtype(dtype): code for code, dtype in DTYPE_BY_CODE.items()}
# 9 bytes magic + 8 version + 1 dtype code + 8 sequence count + 8 document count.
HEADER_BYTES = 34
# megatron-core's DType.optimal_dtype: uint16 below this cardinality, int32 from it on.
UINT16_VOCAB_LIMIT = 65500


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def check_output_prefix(prefix: str, flag: str = "--output-prefix") -> str:
    """The directory that `prefix` writes into; DataError when it is missing or `prefix` names a
    directory (a trailing "/" would write hidden files named ".bin", ".idx")."""
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise DataError(f"{flag} {prefix} is a directory; give a path prefix inside it, "
                        f"e.g. {os.path.join(prefix, 'name')}")
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        raise DataError(f"output directory {directory} does not exist; create it first")
    return directory


def read_json_object(path: str) -> dict:
    """A JSON object from `path` (a shard's .meta.json, a tokenizer's sidecar); DataError naming the file
    when it is not UTF-8 JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    except ValueError as error:   # malformed JSON or not UTF-8
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def write_json(path: str, value) -> None:
    with open(path, "w") as stream:
        json.dump(value, stream, indent=2)
        stream.write("\n")


@contextlib.contextmanager
def staged_json(final_path: str, value):
    """Write `value` as JSON under a temporary name and yield the (temporary, final) pair for `publish`
    (e.g. a shard's .meta.json, renamed together with its .bin/.idx); the temporary file is removed on
    exit if it was not renamed."""
    temporary = claim_staging_path(final_path)
    try:
        write_json(temporary, value)
        yield temporary, final_path
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def publish(renames) -> None:
    """Rename (temporary, final) pairs in order, with SIGINT/SIGTERM/SIGHUP held back until all are
    done (then delivered again), so an interruption never leaves a new .bin beside an old .idx or
    an old .meta.json. (Handlers, not a signal mask: a mask holds for one thread only, and
    torch, once imported, runs threads that would take the signal.)"""
    if threading.current_thread() is not threading.main_thread():
        for temporary, final in renames:
            os.replace(temporary, final)
        return
    held = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for temporary, final in renames:
            os.replace(temporary, final)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            os.kill(os.getpid(), signum)


def token_dtype_for_vocab(vocab_size: int) -> numpy.dtype:
    """uint16 when the vocabulary is below 65 500 entries (megatron-core's rule), else int32."""
    return numpy.dtype(numpy.uint16 if vocab_size < UINT16_VOCAB_LIMIT else numpy.int32)


def parse_token_dtype(name: str, vocab_size: int) -> numpy.dtype:
    """Resolve a --dtype flag ('auto', 'uint16', 'int32') against the vocabulary size."""
    if name == "auto":
        return token_dtype_for_vocab(vocab_size)
    if name not in ("uint16", "int32"):
        raise DataError(f"--dtype {name!r}: choose auto, uint16 or int32")
    dtype = numpy.dtype(name)
    largest_id = vocab_size - 1
    if largest_id > numpy.iinfo(dtype).max:
        raise DataError(
            f"the tokenizer has {vocab_size} ids but --dtype {name} holds ids up to "
            f"{numpy.iinfo(dtype).max}; use --dtype int32 (or auto)"
        )
    return dtype


def write_index_file(path: str, dtype: numpy.dtype, sequence_lengths: numpy.ndarray,
                     document_indices: numpy.ndarray) -> None:
    """Write an .idx exactly as megatron-core's `_IndexWriter` does (fsynced before returning)."""
    sequence_lengths = numpy.ascontiguousarray(sequence_lengths, dtype=numpy.int32)
    document_indices = numpy.ascontiguousarray(document_indices, dtype=numpy.int64)
    sequence_pointers = numpy.zeros(len(sequence_lengths), dtype=numpy.int64)
    if len(sequence_lengths) > 1:
        numpy.cumsum(sequence_lengths[:-1].astype(numpy.int64) * numpy.dtype(dtype).itemsize,
                     out=sequence_pointers[1:])
    with open(path, "wb") as stream:
        stream.write(INDEX_HEADER)
        stream.write(struct.pack("<Q", INDEX_VERSION))
        stream.write(struct.pack("<B", CODE_BY_DTYPE[numpy.dtype(dtype)]))
        stream.write(struct.pack("<Q", len(sequence_lengths)))
        stream.write(struct.pack("<Q", len(document_indices)))
        stream.write(sequence_lengths.tobytes(order="C"))
        stream.write(sequence_pointers.tobytes(order="C"))
        stream.write(document_indices.tobytes(order="C"))
        stream.flush()
        os.fsync(stream.fileno())


class ShardWriter:
    """Writes one shard `prefix.bin/.idx` under temporary names; `commit()` renames them into place.

    A shard is never visible half-written: until commit the files are `prefix.bin.tmp-<host>-<pid>` and
    `prefix.idx.tmp-<host>-<pid>`, and leaving the `with` block by an exception deletes them (those of a killed
    run go when the next run writes the same shard: `data_tools.staging`).
    One document = one sequence (as megatron's tools/preprocess_data.py writes GPT data).
    """

    def __init__(self, prefix: str, dtype: numpy.dtype):
        check_output_prefix(prefix)
        self.prefix = prefix
        self.dtype = numpy.dtype(dtype)
        self.temporary_bin = claim_staging_path(bin_path(prefix))
        self.temporary_idx = claim_staging_path(idx_path(prefix))
        self._stream = open(self.temporary_bin, "wb")
        self._length_chunks = []          # int32 arrays, concatenated at commit
        self._open_document_length = 0    # tokens added to a document not yet ended
        self.num_tokens = 0

    # --- streaming one document (for documents too large to hold as one array) ---
    def add_tokens(self, tokens: numpy.ndarray) -> None:
        tokens = numpy.asarray(tokens, dtype=self.dtype)
        self._stream.write(tokens.tobytes(order="C"))
        self._open_document_length += tokens.size

    def end_document(self) -> None:
        self._length_chunks.append(numpy.array([self._open_document_length], dtype=numpy.int32))
        self.num_tokens += self._open_document_length
        self._open_document_length = 0

    # --- many documents at once ---
    def add_documents(self, flat_tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        """Append documents given as their concatenated tokens and per-document lengths."""
        flat_tokens = numpy.asarray(flat_tokens, dtype=self.dtype)
        self._stream.write(flat_tokens.tobytes(order="C"))
        self._length_chunks.append(numpy.asarray(lengths, dtype=numpy.int32))
        self.num_tokens += int(flat_tokens.size)

    def append_raw(self, path: str, lengths: numpy.ndarray) -> None:
        """Append a file of raw tokens (already in this dtype) holding documents of `lengths`."""
        with open(path, "rb") as source:
            while True:
                block = source.read(1 << 24)
                if not block:
                    break
                self._stream.write(block)
        self._length_chunks.append(numpy.asarray(lengths, dtype=numpy.int32))
        self.num_tokens += int(numpy.asarray(lengths, dtype=numpy.int64).sum())

    @property
    def num_documents(self) -> int:
        return sum(len(chunk) for chunk in self._length_chunks)

    def commit(self, also_rename=()) -> None:
        """Write the index and rename both files into place (then each (temporary, final) pair of
        `also_rename`, e.g. the metadata), none of it interruptible half-way."""
        if self._open_document_length:
            raise RuntimeError("commit() with a document still open: call end_document() first")
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        lengths = (numpy.concatenate(self._length_chunks) if self._length_chunks
                   else numpy.zeros(0, dtype=numpy.int32))
        write_index_file(self.temporary_idx, self.dtype, lengths,
                         numpy.arange(len(lengths) + 1, dtype=numpy.int64))
        # .bin first: a reader that finds the new .idx also finds its .bin.
        publish([(self.temporary_bin, bin_path(self.prefix)),
                 (self.temporary_idx, idx_path(self.prefix)), *also_rename])

    def abort(self) -> None:
        if not self._stream.closed:
            self._stream.close()
        for path in (self.temporary_bin, self.temporary_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            self.abort()
        return False


@dataclass
class ShardIndex:
    """The parsed .idx of a shard (arrays are memory-mapped views)."""

    prefix: str
    dtype: numpy.dtype
    sequence_lengths: numpy.ndarray   # (n,) int32
    sequence_pointers: numpy.ndarray  # (n,) int64 byte offsets
    document_indices: numpy.ndarray   # (d + 1,) int64

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=numpy.int64))


def join_with_megatron_builder(part_prefixes: list[str], output_prefix: str, dtype: numpy.dtype,
                               also_rename=()) -> None:
    """Concatenate shards into OUTPUT.bin/.idx through megatron-core's IndexedDatasetBuilder, written under
    temporary names and renamed only when complete, then the pairs of `also_rename` (imports
    megatron-core: keep it off the hot path)."""
    logging.getLogger("megatron").setLevel(logging.WARNING)   # it logs every index it opens at INFO
    with warnings.catch_warnings():
        # megatron.core warns at import that Transformer Engine and Apex are missing (irrelevant here).
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    temporary_bin = claim_staging_path(bin_path(output_prefix))
    temporary_idx = claim_staging_path(idx_path(output_prefix))
    try:
        builder = IndexedDatasetBuilder(temporary_bin, dtype=dtype.type)
        for prefix in part_prefixes:
            builder.add_index(prefix)
        builder.finalize(temporary_idx)
        publish([(temporary_bin, bin_path(output_prefix)), (temporary_idx, idx_path(output_prefix)),
                 *also_rename])
    finally:
        for path in (temporary_bin, temporary_idx):
            if os.path.exists(path):
                os.remove(path)


def read_index(prefix: str) -> ShardIndex:
    """Parse and check `prefix.idx` (header, version, dtype, sizes); DataError names the fault."""
    path = idx_path(prefix)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist (expected a shard prefix without .bin/.idx)")
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header (truncated?)")
    if header[:9] != INDEX_HEADER:
        raise DataError(f"{path}: bad magic {header[:9]!r}, not a megatron-core MMIDIDX index")
    version = struct.unpack("<Q", header[9:17])[0]
    if version != INDEX_VERSION:
        raise DataError(f"{path}: index format version {version}; this reader (and megatron-core "
                        f"0.16) understands version {INDEX_VERSION} only")
    code = header[17]
    if code not in DTYPE_BY_CODE:
        raise DataError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_BY_CODE)})")
    dtype = numpy.dtype(DTYPE_BY_CODE[code])
    if dtype not in (numpy.dtype(numpy.uint16), numpy.dtype(numpy.int32)):
        raise DataError(f"{path}: token dtype {dtype.name}; token shards are uint16 or int32")
    num_sequences, num_document_indices = struct.unpack("<QQ", header[18:34])
    expected = HEADER_BYTES + 12 * num_sequences + 8 * num_document_indices
    # megatron writes one int8 "mode" per sequence for multimodal data; token shards have none.
    if size not in (expected, expected + num_sequences):
        raise DataError(f"{path}: {size} bytes, but its header promises {num_sequences} sequences "
                        f"and {num_document_indices} document indices = {expected} bytes "
                        f"(truncated or corrupt index)")
    buffer = numpy.memmap(path, mode="r", dtype=numpy.uint8)
    offset = HEADER_BYTES
    lengths = buffer[offset:offset + 4 * num_sequences].view(numpy.int32)
    offset += 4 * num_sequences
    pointers = buffer[offset:offset + 8 * num_sequences].view(numpy.int64)
    offset += 8 * num_sequences
    documents = buffer[offset:offset + 8 * num_document_indices].view(numpy.int64)
    return ShardIndex(prefix, dtype, lengths, pointers, documents)


def check_shard(prefix: str, eod_id: int | None = None, vocab_size: int | None = None,
                check_tokens: bool = True) -> ShardIndex:
    """Check that `prefix.idx` and `prefix.bin` agree; raise DataError naming the first fault.

    Checks: header/version/dtype/size (read_index), non-negative lengths, pointers equal to the
    running byte offsets of the lengths, document indices running from 0 to n without going
    backwards, .bin size equal to the indexed bytes, and, when given, every document ending in
    `eod_id` and every token id below `vocab_size`.
    """
    index = read_index(prefix)
    name = idx_path(prefix)
    lengths = numpy.asarray(index.sequence_lengths)
    if len(lengths) and lengths.min() < 0:
        bad = int(numpy.argmax(lengths < 0))
        raise DataError(f"{name}: sequence {bad} has negative length {int(lengths[bad])}")
    expected_pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    if len(lengths) > 1:
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * index.dtype.itemsize, out=expected_pointers[1:])
    mismatch = numpy.nonzero(numpy.asarray(index.sequence_pointers) != expected_pointers)[0]
    if len(mismatch):
        first = int(mismatch[0])
        raise DataError(f"{name}: sequence {first} points at byte {int(index.sequence_pointers[first])}, "
                        f"but the lengths before it put it at {int(expected_pointers[first])}")
    documents = numpy.asarray(index.document_indices)
    if len(documents) == 0 or documents[0] != 0 or documents[-1] != len(lengths):
        raise DataError(f"{name}: document indices must run from 0 to {len(lengths)}, "
                        f"found {documents[:1].tolist()} .. {documents[-1:].tolist()}")
    if len(documents) > 1 and numpy.any(numpy.diff(documents) < 0):
        bad = int(numpy.argmax(numpy.diff(documents) < 0))
        raise DataError(f"{name}: document index {bad + 1} goes backwards ({int(documents[bad])} -> "
                        f"{int(documents[bad + 1])})")
    data_path = bin_path(prefix)
    if not os.path.exists(data_path):
        raise DataError(f"{data_path} does not exist but {name} does")
    expected_bytes = index.num_tokens * index.dtype.itemsize
    actual_bytes = os.path.getsize(data_path)
    if actual_bytes != expected_bytes:
        what = "truncated" if actual_bytes < expected_bytes else "has trailing bytes"
        raise DataError(f"{data_path}: {actual_bytes} bytes, but {name} indexes {index.num_tokens} "
                        f"{index.dtype.name} tokens = {expected_bytes} bytes ({what})")
    if check_tokens and index.num_tokens:
        tokens = numpy.memmap(data_path, mode="r", dtype=index.dtype)
        if vocab_size is not None:
            largest = int(tokens.max())
            if largest >= vocab_size:
                position = int(numpy.argmax(tokens >= vocab_size))
                raise DataError(f"{data_path}: token id {int(tokens[position])} at token {position} is "
                                f"outside the tokenizer's vocabulary of {vocab_size} (largest id {largest})")
        if eod_id is not None:
            nonempty = lengths > 0
            ends = (numpy.asarray(index.sequence_pointers) // index.dtype.itemsize + lengths - 1)[nonempty]
            missing = numpy.nonzero(tokens[ends] != eod_id)[0]
            empty = int((~nonempty).sum())
            if len(missing) or empty:
                first = int(numpy.nonzero(nonempty)[0][missing[0]]) if len(missing) else int(numpy.argmin(nonempty))
                raise DataError(f"{data_path}: {len(missing) + empty} of {len(lengths)} documents do not "
                                f"end with EOD id {eod_id} (first: document {first}); was it "
                                f"preprocessed without --append-eod?")
    return index
