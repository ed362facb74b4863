"""Locks between the processes (and threads) that share one data directory.

``reverie chat``, ``reverie serve``, a cron ``reverie night`` and ``reverie memories``
may run at the same time on one data directory. Two kinds of lock keep them apart, both
OS file locks through the ``filelock`` package (``flock`` on Linux and macOS), which the
kernel releases when the holder dies, ``kill -9`` included:

* :func:`hold`: a short exclusive section that waits its turn (a day-log write, a change
  of the memory store and its index together). Re-entrant within one thread.
* :func:`night_lock`: one night per data directory. A second night does not wait: it is
  refused at once with :class:`NightLocked`, whose message names the running night's pid
  and start time. The holder's pid, host and start time are written beside the lock
  (``night.holder.json``) for that message; a holder file left by a night that died is
  how a stale lock is noticed (and taken over, with a notice on stderr).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock, Timeout

from reverie.files import atomic_write_json

NIGHT_LOCK = "night.lock"
NIGHT_HOLDER = "night.holder.json"


class LockTimeout(TimeoutError):
    """A short lock (:func:`hold`) was not free within its timeout. A ``TimeoutError``, so
    an ``OSError``: callers that handle a failed write handle this too."""


@contextmanager
def hold(path: str | Path, timeout: float, what: str) -> Iterator[None]:
    """Hold the exclusive file lock ``path`` (created with its folder if missing) for the
    ``with`` body, waiting up to ``timeout`` seconds for another process or thread to
    release it. Re-entrant in one thread (one lock object per path in a process).

    Args:
        what: what the lock guards, for the error message ("the day log").

    Raises:
        LockTimeout: still held elsewhere after ``timeout`` seconds (nothing was done).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, is_singleton=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise LockTimeout(f"{what} is busy: another process held {path} for over "
                          f"{timeout:g} s") from None
    try:
        yield
    finally:
        lock.release()


# -- one night per data directory ---------------------------------------------------------

def _alive(pid: int) -> Optional[bool]:
    """Whether process ``pid`` exists on this machine (None: cannot tell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except (OSError, OverflowError, ValueError):
        return None
    return True


def night_holder(data_dir: str | Path) -> Optional[dict]:
    """What the night holding (or last holding) the lock wrote: ``{"pid", "host",
    "started", "argv"}``; None when there is no holder file or it cannot be read."""
    try:
        info = json.loads((Path(data_dir) / NIGHT_HOLDER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _who(info: Optional[dict]) -> str:
    if not info:
        return "pid unknown"
    host = info.get("host")
    on = f" on {host}" if host and host != socket.gethostname() else ""
    started = str(info.get("started", "?")).replace("T", " ")
    return f"pid {info.get('pid', '?')}{on}, started {started}"


class NightLocked(RuntimeError):
    """Another night holds this data directory's night lock.

    Attributes:
        holder: what that night wrote (:func:`night_holder`), or None.
        data_dir: the data directory.
    """

    def __init__(self, data_dir: Path, holder: Optional[dict]):
        self.data_dir, self.holder = Path(data_dir), holder
        pid = holder.get("pid") if holder else None
        here = not holder or holder.get("host") in (None, socket.gethostname())
        gone = here and isinstance(pid, int) and _alive(pid) is False
        lock = self.data_dir / NIGHT_LOCK
        if gone:
            what = (f"that process is gone: either a new night is starting this moment (try "
                    f"again), or the lock is stale (a file system without OS locks keeps it): "
                    f"then delete {lock}")
        elif isinstance(pid, int):
            what = (f"wait for it to finish, or stop it (kill {pid}) and finish it later with "
                    "`reverie night --resume`")
        else:
            what = (f"wait for it to finish (its holder record {self.data_dir / NIGHT_HOLDER} "
                    "is not there: it is starting, or was removed)")
        super().__init__(f"another night ({_who(holder)}) is running on {self.data_dir}; "
                         f"{what}")


def _stderr(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


@contextmanager
def night_lock(data_dir: str | Path,
               notify: Callable[[str], None] = _stderr) -> Iterator[dict]:
    """Hold the night lock of ``data_dir`` for the ``with`` body; yields the holder record
    written for others to read (``pid``, ``host``, ``started``: local time, ``argv``).

    The lock is ``data_dir/night.lock`` (an OS lock: a holder that dies releases it); the
    record is ``data_dir/night.holder.json``, removed when the body ends. A record found on
    taking the lock was left by a night that died: ``notify`` is told (default: a
    ``notice:`` line on stderr) and the lock is taken over.

    Raises:
        NightLocked: another night holds it (nothing was written).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(data_dir / NIGHT_LOCK)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise NightLocked(data_dir, night_holder(data_dir)) from None
    holder_file = data_dir / NIGHT_HOLDER
    try:
        previous = night_holder(data_dir)
        if previous is not None or holder_file.exists():
            notify(f"the previous night ({_who(previous)}) ended without releasing the night "
                   f"lock of {data_dir} (killed?): taking it over; `reverie diary list` shows "
                   "a night it left unfinished and `reverie night --resume` finishes it")
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}
        atomic_write_json(holder_file, mine)
        try:
            yield mine
        finally:
            holder_file.unlink(missing_ok=True)
    finally:
        lock.release()


def check_no_night(data_dir: str | Path) -> None:
    """Raise :class:`NightLocked` now if a night holds the night lock of ``data_dir``: a
    quick look (the lock is taken and let go, nothing written) so a command can stop
    before it loads models or shows progress. The night itself still takes the lock
    (:func:`night_lock`), so a night that starts after this look is refused then."""
    data_dir = Path(data_dir)
    if not (data_dir / NIGHT_LOCK).exists():
        return
    lock = FileLock(data_dir / NIGHT_LOCK)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise NightLocked(data_dir, night_holder(data_dir)) from None
    lock.release()


def holds_night_lock(run):
    """Decorator for an ``async def run(settings, ...)`` that runs a night: the whole call
    holds :func:`night_lock` on ``settings.paths.data_dir``, so every way of starting a
    night (``reverie night``, the chat's ``/sleep``, ``reverie cycle``) goes through it.

    Raises:
        NightLocked: another night is running on that data directory.
    """
    @functools.wraps(run)
    async def locked(settings, *args, **kwargs):
        with night_lock(settings.paths.data_dir):
            return await run(settings, *args, **kwargs)

    return locked


__all__ = ["LockTimeout", "NIGHT_HOLDER", "NIGHT_LOCK", "NightLocked", "check_no_night", "hold",
           "holds_night_lock", "night_holder", "night_lock"]
