"""Reading documents from JSONL and plain-text files (and their .gz versions), split into work units.

Formats:
    jsonl  one JSON object per line; the document is the string under --json-key (default "text").
    text   "blocks": a document per block of lines separated by blank lines;
           "file":   the whole file is one document.
A large uncompressed file is cut into byte ranges ("work units") that start on a line boundary
(JSONL) or right after a blank line (text blocks), so workers can read its parts in parallel and
the output keeps the input order. A .gz file is one unit (it cannot be entered in the middle).

Bad input raises DataError naming file:line (malformed JSON, a missing or non-string key,
non-UTF-8 bytes); with skip_bad_lines the line is skipped and counted instead. Empty documents
(nothing but whitespace) are skipped and counted.
"""
import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field

from data_tools.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Keep this many bad-line descriptions per unit for the report; the count is always exact.
MAX_REPORTED_BAD_LINES = 5
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class WorkUnit:
    """Bytes [start, end) of one input file (end None: to the end of the file)."""

    order: int
    path: str
    format: str          # "jsonl" or "text"
    start: int = 0
    end: int | None = None

    @property
    def compressed(self) -> bool:
        return self.path.endswith(".gz")


@dataclass
class ReadStats:
    """Counts for one unit, summed over units by the caller."""

    documents: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    bytes_read: int = 0
    bad_line_examples: list = field(default_factory=list)

    def add(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.empty_documents += other.empty_documents
        self.bad_lines += other.bad_lines
        self.bytes_read += other.bytes_read
        room = MAX_REPORTED_BAD_LINES - len(self.bad_line_examples)
        self.bad_line_examples.extend(other.bad_line_examples[:max(room, 0)])


def detect_format(path: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in ("jsonl", "text"):
            raise DataError(f"--format {requested!r}: choose auto, jsonl or text")
        return requested
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, globs (** recursive) and directories (all files below, sorted)."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern) for name in names
                if not name.startswith(".")
            )
        elif glob.has_magic(pattern):
            found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        else:
            if not os.path.exists(pattern):
                raise DataError(f"input {pattern} does not exist")
            found = [pattern]
        if not found:
            raise DataError(f"input {pattern!r} matches no files")
        files.extend(found)
    return files


def _next_boundary(stream, position: int, file_size: int, pattern: re.Pattern | None) -> int:
    """First unit boundary at or after `position`: just past a newline (pattern None) or past a
    blank line (pattern BLANK_LINE). Returns file_size when there is none."""
    window = 1 << 16
    # Start one byte early so a boundary exactly at `position` is seen.
    cursor = max(position - 1, 0)
    carry = b""
    while cursor < file_size:
        stream.seek(cursor)
        block = stream.read(window)
        if not block:
            break
        data = carry + block
        base = cursor - len(carry)
        if pattern is None:
            found = data.find(b"\n")
            if found >= 0:
                return base + found + 1
        else:
            match = pattern.search(data)
            if match:
                return base + match.end()
        # Keep a tail so a blank line split across two windows is still found.
        carry = data[-256:]
        cursor += len(block)
    return file_size


def plan_units(paths: list[str], format_name: str, text_mode: str, chunk_bytes: int) -> list[WorkUnit]:
    """Work units covering every input byte once, in input order."""
    if text_mode not in ("blocks", "file"):
        raise DataError(f"--text-mode {text_mode!r}: choose blocks or file")
    units = []
    for path in paths:
        file_format = detect_format(path, format_name)
        size = os.path.getsize(path)
        whole_file = path.endswith(".gz") or (file_format == "text" and text_mode == "file")
        if whole_file or size <= chunk_bytes:
            units.append(WorkUnit(len(units), path, file_format))
            continue
        pattern = None if file_format == "jsonl" else BLANK_LINE
        with open(path, "rb") as stream:
            start = 0
            while start < size:
                end = _next_boundary(stream, start + chunk_bytes, size, pattern)
                units.append(WorkUnit(len(units), path, file_format, start, end))
                start = end
    return units


def _line_number(path: str, unit: WorkUnit, local_line: int) -> int:
    """1-based line number in the file of the unit's `local_line`-th line (0-based); computed only
    when an error is reported, by counting newlines before the unit's start."""
    if unit.start == 0:
        return local_line + 1
    newlines = 0
    with open(path, "rb") as stream:
        remaining = unit.start
        while remaining > 0:
            block = stream.read(min(remaining, 1 << 24))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + local_line + 1


class _UnitReader:
    """Iterates the documents of one work unit, counting into `stats`."""

    def __init__(self, unit: WorkUnit, json_key: str, text_mode: str, skip_bad_lines: bool,
                 stats: ReadStats):
        self.unit = unit
        self.json_key = json_key
        self.text_mode = text_mode
        self.skip_bad_lines = skip_bad_lines
        self.stats = stats

    def _bad_line(self, local_line: int, reason: str) -> None:
        line = _line_number(self.unit.path, self.unit, local_line)
        where = f"{self.unit.path}:{line}"
        if not self.skip_bad_lines:
            hint = " (--skip-bad-lines skips and counts such lines)"
            raise DataError(f"{where}: {reason}{hint}")
        self.stats.bad_lines += 1
        if len(self.stats.bad_line_examples) < MAX_REPORTED_BAD_LINES:
            self.stats.bad_line_examples.append(f"{where}: {reason}")

    def _lines(self):
        """(local line index, [raw bytes]) for the unit's lines, streaming.

        The line comes in a one-element list that the consumer empties (`box.pop()`): a 100 MB
        line is then referenced only by the consumer, which can drop it as soon as it is decoded,
        instead of staying alive in this generator's frame."""
        unit = self.unit
        try:
            if unit.compressed:
                stream = gzip.open(unit.path, "rb")
            else:
                stream = open(unit.path, "rb")
                if unit.start:   # (a pipe, such as --input <(zcat ...), is one unit from 0: no seek)
                    stream.seek(unit.start)
        except OSError as error:
            raise DataError(f"{unit.path}: cannot open ({error.strerror or error})") from None
        limit = None if unit.end is None else unit.end - unit.start
        consumed = 0
        try:
            with stream:
                for local_line, raw in enumerate(stream):
                    consumed += len(raw)
                    self.stats.bytes_read += len(raw)
                    box = [raw]
                    del raw
                    yield local_line, box
                    if limit is not None and consumed >= limit:
                        break
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise DataError(f"{unit.path}: corrupt or truncated gzip data ({error})") from None

    def _decode(self, local_line: int, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            self._bad_line(local_line, f"not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                       f"{error.start + 1})")
            return None

    def _keep(self, text: str):
        if text and not text.isspace():   # isspace(): no copy of the text, unlike strip()
            self.stats.documents += 1
            return True
        self.stats.empty_documents += 1
        return False

    def documents(self):
        if self.unit.format == "jsonl":
            yield from self._jsonl_documents()
        elif self.text_mode == "file":
            yield from self._file_documents()
        else:
            yield from self._block_documents()

    def _jsonl_documents(self):
        key = self.json_key
        for local_line, box in self._lines():
            raw = box.pop()
            if not raw.strip():
                continue   # blank lines between records are not documents
            # Only a \uD800-\uDFFF escape can put a lone surrogate (not valid Unicode, refused by
            # sentencepiece) into the parsed text; look for the escape in the bytes first (cheap).
            escaped_surrogate = b"\\ud" in raw or b"\\uD" in raw
            line = self._decode(local_line, raw)
            if line is None:
                continue
            del raw
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                self._bad_line(local_line, f"malformed JSON ({error.msg} at column {error.colno})")
                continue
            except (ValueError, RecursionError) as error:   # an integer of > 4300 digits; deep nesting
                self._bad_line(local_line, f"JSON that Python cannot load ({str(error).split(';')[0]})")
                continue
            del line
            if not isinstance(record, dict):
                self._bad_line(local_line, f"expected a JSON object, found {type(record).__name__}")
                continue
            if key not in record:
                keys = ", ".join(sorted(map(str, record))[:8]) or "none"
                self._bad_line(local_line, f"no key {key!r} (keys: {keys}); choose one with --json-key")
                continue
            text = record.pop(key)
            del record
            if not isinstance(text, str):
                self._bad_line(local_line, f"key {key!r} holds {type(text).__name__}, not a string")
                continue
            if escaped_surrogate:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    self._bad_line(local_line, f"key {key!r} holds a lone UTF-16 surrogate "
                                               f"\\u{ord(text[error.start]):04x} (character "
                                               f"{error.start + 1}), not valid Unicode")
                    continue
            if self._keep(text):
                yield text

    def _block_documents(self):
        block = []
        for local_line, box in self._lines():
            line = self._decode(local_line, box.pop())
            if line is None:
                continue
            if line.strip():
                block.append(line)
                continue
            if block:
                text = "".join(block).rstrip("\n")
                block = []
                if self._keep(text):
                    yield text
        if block:
            text = "".join(block).rstrip("\n")
            if self._keep(text):
                yield text

    def _file_documents(self):
        chunks = []
        for local_line, box in self._lines():
            line = self._decode(local_line, box.pop())
            if line is not None:
                chunks.append(line)
        text = "".join(chunks).rstrip("\n")
        del chunks
        if self._keep(text):
            yield text


def iter_documents(unit: WorkUnit, json_key: str = "text", text_mode: str = "blocks",
                   skip_bad_lines: bool = False, stats: ReadStats | None = None):
    """Yield the documents (str) of a work unit; counts go into `stats` when given."""
    reader = _UnitReader(unit, json_key, text_mode, skip_bad_lines, stats or ReadStats())
    yield from reader.documents()
