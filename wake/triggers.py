"""When to sleep: at a clock time, when the day log grows past a size, or from cron.

- ``reverie night --at HH:MM`` waits for the next HH:MM (local time) and runs;
- the "sunset" trigger (:meth:`reverie.memory.daylog.DayLog.size` against ``wake.sunset_chars``)
  fires in the chat after a turn, and ``reverie night --if-sunset`` runs only when it is due
  (for cron, several times a day);
- ``reverie schedule`` prints the crontab line for a nightly run at ``wake.night_at``.
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable


def parse_hhmm(text: str) -> tuple[int, int]:
    """``"HH:MM"`` (24-hour) -> ``(hour, minute)``.

    Raises:
        ValueError: not two numbers in range, naming the text.
    """
    try:
        hour, minute = (int(x) for x in text.strip().split(":"))
    except ValueError:
        raise ValueError(f"expected a time as HH:MM (24-hour), got {text!r}") from None
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(f"expected a time as HH:MM (24-hour), got {text!r}")
    return hour, minute


def next_time(hhmm: str, after: datetime) -> datetime:
    """The first moment strictly after ``after`` whose clock reads ``hhmm`` (same tz as
    ``after``; tomorrow when today's has passed)."""
    hour, minute = parse_hhmm(hhmm)
    at = after.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > after else at + timedelta(days=1)


def wait_until(when: datetime, clock: Callable[[], datetime] = datetime.now,
               sleep: Callable[[float], None] = time.sleep,
               on_wait: Callable[[float], None] | None = None, step: float = 30.0) -> None:
    """Block until ``clock()`` reaches ``when``, in steps of at most ``step`` seconds (so a
    suspended laptop or a changed clock is noticed); ``on_wait(seconds_left)`` each step."""
    while True:
        left = (when - clock()).total_seconds()
        if left <= 0:
            return
        if on_wait is not None:
            on_wait(left)
        sleep(min(step, left))


def cron_line(hhmm: str, config: Path | None, workdir: Path, log: Path,
              executable: str | None = None) -> str:
    """A crontab line that runs ``reverie night`` every day at ``hhmm``, in ``workdir``,
    appending output to ``log``. ``executable`` defaults to the ``reverie`` script beside
    this Python interpreter."""
    hour, minute = parse_hhmm(hhmm)
    exe = executable or str(Path(sys.executable).with_name("reverie"))
    cmd = [exe] + (["--config", str(Path(config).resolve())] if config else []) + ["night"]
    return (f"{minute} {hour} * * * cd {shlex.quote(str(workdir))} && "
            f"{' '.join(shlex.quote(c) for c in cmd)} >> {shlex.quote(str(log))} 2>&1")
