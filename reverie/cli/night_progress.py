"""What a running night shows: a live table on a terminal; anywhere else (cron's
``reverie night >> night.log``, a pipe, the stderr of ``reverie night --json``) plain
timestamped lines, each written (and flushed) as it happens. Never both.

The night reports through two callbacks (:func:`reverie.graphs.run.run_night`):
``on_update(node, update)`` after each graph node and ``on_train(step, total, loss,
tokens_per_s)`` while the forge trains. :class:`NightTally` counts what they say; the live
table and the plain lines both render it.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

# An agent stage prints a line at its first call, every EVERY calls, and when a round of
# the night's work ends (the graph's ``triage`` node, or any node that is not an agent's).
EVERY = 5
# The forge prints about this many lines while it trains.
TRAIN_LINES = 10
# The graph's agent nodes (one update per agent call) and the names shown for them.
AGENT_NODES = {"read": "note-taker", "verify": "verify", "reshape": "reshape", "dream": "dream",
               "consult": "persona"}


class NightTally:
    """Counts of a running night.

    Args:
        turns_to_read: ``sessions -> note-taker calls to expect``, to show "note-taker 4/9
            turns" (None: the count alone; also on a resumed night, whose ``gather`` does
            not rerun).
    """

    def __init__(self, turns_to_read: Callable[[list], int] | None = None):
        self.counts: Counter = Counter()      # node -> updates seen
        self.verdicts: Counter = Counter()    # what those updates said
        self.notes: dict[str, str] = {}       # one-line outcomes of the single-shot nodes
        self.turns_to_read = turns_to_read
        self.read_total: int | None = None

    def update(self, node: str, update: dict) -> None:
        """Count one graph update (``node``'s returned state update)."""
        self.counts[node] += 1
        v = self.verdicts
        if node == "gather":
            sessions = update.get("sessions", [])
            v["sessions"] += len(sessions)
            if self.turns_to_read is not None:
                self.read_total = self.turns_to_read(sessions)
        elif node == "revisit":
            back = len(update.get("candidates", {}))
            self.notes["revisit"] = f"{back} parked thought{'s' * (back != 1)} back for review"
        elif node == "route":
            v["chunks"] += update.get("routed_chunks", 0)
            v["forget"] += len(update.get("forget", []))
        elif node == "consolidate":
            ops = _dump(update.get("consolidation"))
            self.notes["consolidate"] = ", ".join(f"{len(x)} {k}" for k, x in ops.items()) or "-"
        elif node == "park":
            sub = _dump(update.get("subconscious"))
            self.notes["park"] = ", ".join(f"{len(x)} {k}" for k, x in sub.items() if x) or "-"
        elif node == "handoff":
            self.notes["handoff"] = str(update.get("training_set", "")) or "no training set"
        elif node == "learn":
            f = update.get("forge", {})
            self.notes["forge"] = (f"promoted {f['version']}" if f.get("promoted") else
                                   f.get("skipped") or "; ".join(f.get("reasons", [])) or
                                   "rolled back")
        for c in update.get("candidates", {}).values():
            key = {"read": "notes", "reshape": "reshaped"}.get(node, c.status)
            if node == "dream" and c.status == "rejected":
                key = "dream-rejected"
            elif node == "verify" and c.status == "rejected":
                key = "verify-rejected"
            v[key] += 1

    def train(self, step: int, total: int, loss: float, tps: float) -> None:
        """Note one forge training step (``loss``: the step's training loss)."""
        self.notes["forge"] = f"step {step}/{total}, loss {loss:.3f}, {tps:.0f} tok/s"

    def outcome(self, node: str) -> str:
        """What ``node`` (a graph node, or ``"forge"``) did so far, in a few words."""
        v = self.verdicts
        return {
            "gather": f"{v['sessions']} sessions",
            "route": f"{v['chunks']} verbatim chunks, {v['forget']} forget requests",
            "read": f"{v['notes']} notes",
            "verify": f"{v['passed']} passed, {v['failed']} failed, {v['verify-rejected']} "
                      "rejected",
            "dream": f"{v['dreamt']} dreamt, {v['dream-rejected']} without a question",
            "reshape": f"{v['reshaped']} rewritten",
            "consult": f"{v['approved']} approved, {v['vetoed']} vetoed",
        }.get(node) or self.notes.get("forge" if node == "learn" else node, "")

    def line(self, node: str) -> str:
        """One progress line about ``node`` (no timestamp), e.g. ``note-taker 4/9 turns, 11
        notes``, ``verify 20 calls: 8 passed, 9 failed, 3 rejected``, ``forge step
        40/120, loss 1.230, 350 tok/s``."""
        n = self.counts[node]
        if node == "read":
            done = f"{n}/{self.read_total}" if self.read_total else str(n)
            return f"note-taker {done} turns, {self.outcome(node)}"
        if node in AGENT_NODES:
            return f"{AGENT_NODES[node]} {n} call{'s' * (n != 1)}: {self.outcome(node)}"
        if node == "train":
            return f"forge {self.notes.get('forge', '')}"
        return f"{'forge' if node == 'learn' else node}: {self.outcome(node)}"

    def table(self) -> Table:
        """The live table: one row per stage, with its count and outcome."""
        table = Table(title="night", show_header=True)
        for col in ("stage", "done", "outcome"):
            table.add_column(col, overflow="fold")
        read = self.counts["read"]
        rows = [("gather", "gather"), ("route", "route"), ("note-taker", "read"),
                ("verifier", "verify"), ("reshaper", "reshape"), ("dreamer", "dream"),
                ("persona", "consult"),
                ("consolidate", "consolidate"), ("subconscious", "park"),
                ("handoff", "handoff"), ("forge", "learn")]
        for label, node in rows:
            done = (f"{read}/{self.read_total}" if node == "read" and self.read_total
                    else str(self.counts[node]))
            table.add_row(label, done, self.outcome(node))
        return table


def _dump(record: Any) -> dict:
    if record is None:
        return {}
    return record.model_dump() if hasattr(record, "model_dump") else dict(record)


class PlainLines:
    """Progress as plain lines on ``to`` (``HH:MM:SS what``), for logs and pipes.

    Args:
        tally: the counts to report.
        to: where to write; each line is flushed as it is printed (rich flushes).
        clock: the time of a line (a test may pass a fixed one).
    """

    def __init__(self, tally: NightTally, to: Console, clock: Callable[[], datetime] = datetime.now):
        self.tally, self.to, self.clock = tally, to, clock
        self.shown: Counter = Counter()   # node -> its count when its last line was printed

    def say(self, text: str) -> None:
        """Print one timestamped line."""
        self.to.print(f"{self.clock():%H:%M:%S} {text}", markup=False, highlight=False,
                      emoji=False, soft_wrap=True)

    def start(self) -> None:
        """The first line, with the date (a log file spans many nights)."""
        self.to.print(f"{self.clock():%Y-%m-%d %H:%M:%S} night starts", markup=False,
                      highlight=False, soft_wrap=True)

    def flush(self) -> None:
        """A line for each agent stage with calls not yet reported."""
        for node in AGENT_NODES:
            if self.tally.counts[node] > self.shown[node]:
                self._stage(node)

    def _stage(self, node: str) -> None:
        self.shown[node] = self.tally.counts[node]
        self.say(self.tally.line(node))

    def on_update(self, node: str, update: dict) -> None:
        """``run_night``'s ``on_update``: count, and print when a line is due."""
        self.tally.update(node, update)
        if node in AGENT_NODES:
            n = self.tally.counts[node]
            if n == 1 or n % EVERY == 0:
                self._stage(node)
        else:
            self.flush()
            if node != "triage":  # a meeting point with nothing to say
                self._stage(node)

    def on_train(self, step: int, total: int, loss: float, tps: float) -> None:
        """``run_night``'s ``on_train``: a line on the first and last step and about
        :data:`TRAIN_LINES` in between."""
        self.tally.train(step, total, loss, tps)
        if step in (1, total) or step % max(1, total // TRAIN_LINES) == 0:
            self.say(self.tally.line("train"))


def with_night_display(run: Callable[[Callable, Callable], Any], to: Console,
                       turns_to_read: Callable[[list], int] | None = None) -> Any:
    """Call ``run(on_update, on_train)`` (which runs a night) while showing its progress on
    ``to``: a live table when ``to.is_terminal``, else :class:`PlainLines`. Returns what
    ``run`` returns; its exceptions pass through (the lines so far are already written)."""
    tally = NightTally(turns_to_read)
    if not to.is_terminal:
        lines = PlainLines(tally, to)
        lines.start()
        try:
            return run(lines.on_update, lines.on_train)
        finally:
            lines.flush()

    from rich.live import Live

    with Live(tally.table(), console=to, refresh_per_second=4) as live:
        def on_update(node: str, update: dict) -> None:
            tally.update(node, update)
            live.update(tally.table())

        def on_train(step: int, total: int, loss: float, tps: float) -> None:
            tally.train(step, total, loss, tps)
            live.update(tally.table())

        return run(on_update, on_train)
