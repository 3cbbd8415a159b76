"""A real-prose corpus available on every machine: the docstrings and comments of the Python
standard library that ships with the running interpreter (nothing is copied into the repository).

    from data_tools.corpus import write_stdlib_corpus
    write_stdlib_corpus("smoke/stdlib.jsonl", max_bytes=8_000_000)

Output is JSONL, one document per line: {"text": ..., "source": "module:qualified.name"} for a
docstring, {"text": ..., "source": "relative/path.py:line"} for a block of consecutive comment
lines. Files are visited in sorted path order (library modules before test suites), so the
corpus is deterministic for a given Python installation. Short fragments (< 64 characters) are
left out: they are mostly "# noqa"-like markers, not prose.
"""
import ast
import json
import logging
import os
import sysconfig
import warnings

from data_tools.errors import DataError
from data_tools.staging import claim_staging_path

logger = logging.getLogger(__name__)

MINIMUM_CHARACTERS = 64
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}
LATER_DIRECTORIES = {"test", "tests", "idlelib", "lib2to3"}


def _stdlib_files(root: str):
    """Sorted .py files of the standard library; test suites and tools after the library proper."""
    first, later = [], []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if name not in SKIPPED_DIRECTORIES)
        relative = os.path.relpath(directory, root)
        bucket = later if set(relative.split(os.sep)) & LATER_DIRECTORIES else first
        bucket.extend(os.path.join(directory, name) for name in sorted(names) if name.endswith(".py"))
    return first + later


def _docstrings(tree: ast.AST, module: str):
    """(qualified name, cleaned docstring) for the module, its classes and functions, in order."""
    stack = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        docstring = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if docstring:
            yield name, docstring
        children = [child for child in ast.iter_child_nodes(node)
                    if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack[0:0] = [(child, f"{name}.{child.name}") for child in children]


def _comment_blocks(source: str):
    """(first line number, text) of each run of consecutive full-line comments."""
    block, first_line = [], 0
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith(("#!", "# -*-")):
            if not block:
                first_line = number
            block.append(stripped.lstrip("#").strip())
            continue
        if block:
            yield first_line, "\n".join(block).strip()
            block = []
    if block:
        yield first_line, "\n".join(block).strip()


def iter_stdlib_documents(root: str | None = None):
    """Yield {"text", "source"} documents from the standard library under `root`."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise DataError(f"standard library directory {root} not found")
    for path in _stdlib_files(root):
        relative = os.path.relpath(path, root)
        module = relative[:-3].replace(os.sep, ".").removesuffix(".__init__")
        try:
            with open(path, encoding="utf-8") as stream:
                source = stream.read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # invalid escape sequences in old test files
                tree = ast.parse(source, filename=path)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue   # a few test fixtures are deliberately broken Python
        for name, docstring in _docstrings(tree, module):
            if len(docstring) >= MINIMUM_CHARACTERS:
                yield {"text": docstring, "source": f"{module}:{name.split('.', 1)[-1] if '.' in name else ''}"}
        for line, comment in _comment_blocks(source):
            if len(comment) >= MINIMUM_CHARACTERS:
                yield {"text": comment, "source": f"{relative}:{line}"}


def write_stdlib_corpus(out_path: str, max_bytes: int) -> dict:
    """Write up to `max_bytes` of stdlib docstrings/comments as JSONL to `out_path` (atomically).

    Returns {"documents", "bytes", "path"}. Deterministic for a given Python installation.
    """
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise DataError(f"output directory {directory} does not exist; create it first")
    if max_bytes <= 0:
        raise DataError(f"max_bytes {max_bytes} must be positive")
    temporary = claim_staging_path(out_path)
    documents = written = 0
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            for document in iter_stdlib_documents():
                line = json.dumps(document, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if written + size > max_bytes:
                    break
                stream.write(line)
                written += size
                documents += 1
        os.replace(temporary, out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info("stdlib corpus: %d documents, %.1f MB -> %s", documents, written / 1e6, out_path)
    return {"documents": documents, "bytes": written, "path": out_path}
