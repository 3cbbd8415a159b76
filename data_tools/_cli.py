"""Shared entry-point plumbing for the data_tools CLIs: logging setup and the one place where a
`DataError` turns into a one-line message on stderr and exit status 2.
"""
import logging
import sys

from data_tools.errors import DataError

EXIT_DATA_ERROR = 2


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a DataError becomes `error: <message>` on stderr and exit status 2."""
    try:
        result = main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else int(result)
