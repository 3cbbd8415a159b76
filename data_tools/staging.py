"""Names for outputs being written, and the clean-up of those a killed run left behind.

Every tool writes its outputs under a staging name beside the final one and renames them into place when
complete, so a reader never sees a half-written shard. An exception or a signal removes the staging files; a
SIGKILL (the OS out of memory, a scheduler's time limit) cannot, and a multi-GB `.bin` being written would stay
forever. So a staging name carries the writer's host and process id, `<final>.<kind>-<host>-<pid>[.<suffix>]`,
and the next run that writes the same output removes the staged leftovers of processes of this host that no
longer run. Leftovers of other hosts (a shared filesystem) and of live processes (a concurrent run, or a
reused pid) are left alone; names in the older `<final>.<kind>-<pid>` form cannot be attributed to a host and
are only reported. The host name stands for the process-id namespace: two containers that share a host name and a
volume but not their pids, writing the same output at once, could remove each other's staging files (the run that
loses them then fails at its rename; it never publishes a partial output).
"""
import logging
import os
import re
import shutil
import socket

logger = logging.getLogger(__name__)

HOST = socket.gethostname() or "localhost"


def staging_path(final: str, kind: str = "tmp") -> str:
    """The name this process writes `final` under until it renames it into place."""
    return f"{final}.{kind}-{HOST}-{os.getpid()}"


def claim_staging_path(final: str, kind: str = "tmp") -> str:
    """This process's staging name for `final`, after removing what killed runs of this host left under that name:
    what every writer calls before it writes."""
    remove_orphans(final, kind)
    return staging_path(final, kind)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # another user's process
        return True
    return True


def remove_orphans(final: str, kind: str = "tmp") -> list[str]:
    """Remove the staging files (or directories) of `final` that a process of this host which no longer runs
    left behind; return their paths. Call before writing `final`."""
    directory = os.path.dirname(os.path.abspath(final))
    stem = os.path.basename(final) + f".{kind}-"
    pattern = re.compile(r"(?:(?P<host>.+)-)?(?P<pid>\d+)(?:\..*)?")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(stem):
            continue
        match = pattern.fullmatch(name[len(stem):])
        if match is None:
            continue
        path = os.path.join(directory, name)
        host, pid = match.group("host"), int(match.group("pid"))
        if host is None:
            logger.warning("%s was left by an interrupted run of an earlier version (process %d, host unknown); "
                           "delete it if nothing is writing it", path, pid)
            continue
        if host != HOST or pid == os.getpid() or _running(pid):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:   # another run cleaning up the same leftover
                continue
        logger.warning("removed %s, left by process %d of this host, which no longer runs (killed?)", path, pid)
        removed.append(path)
    return removed
