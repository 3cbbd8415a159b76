"""Shared entry-point plumbing for the data_tools CLIs: logging setup and the one place where a
`DataError` turns into a one-line message on stderr and exit status 2.

SIGTERM and SIGHUP (what `kill`, `timeout` and Slurm send) are turned into the same exception
as Ctrl-C, so that every `finally`/`with` block runs: temporary files and part directories are
removed and worker pools are stopped, exactly as on Ctrl-C. An OSError that reaches the entry
point (an unwritable directory, a full disk) is reported in one line with exit status 2.
"""
import logging
import os
import signal
import sys
import threading

from data_tools.errors import DataError

EXIT_DATA_ERROR = 2
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_handling_process = None   # the pid that installed _raise_terminated


def _raise_terminated(signum, frame):
    if os.getpid() != _handling_process:
        # A forked worker that has not yet replaced the inherited handler: die as by default.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise Terminated(signum)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a DataError becomes `error: <message>` on stderr and exit status 2."""
    global _handling_process
    previous = {}
    if threading.current_thread() is threading.main_thread():
        _handling_process = os.getpid()
        for signum in TERMINATING_SIGNALS:
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        result = main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if result is None else int(result)
