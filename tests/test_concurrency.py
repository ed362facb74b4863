"""Several processes on one data directory: day-log writers (chat, server, ingest) at once,
turns written while a night runs, one night at a time (refused, or taken over from a
killed one), and the memory store and index kept together while a night, the chat and a
``reverie memories forget`` run at once.

Synchronisation is by barriers and events (a fake model that waits inside the night),
never by sleeping."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reverie.locks import NIGHT_HOLDER, NIGHT_LOCK, NightLocked, night_holder, night_lock
from reverie.memory.daylog import DayLog
from reverie.memory.records import Message, Session

REPO = Path(__file__).resolve().parent.parent
WAIT = 120  # seconds before a test gives up on an event that never comes (a hang, a bug)

# (a): processes x threads x exchanges
PROCESSES, THREADS, EXCHANGES = 4, 2, 15


# -- many writers -------------------------------------------------------------------------

def _write_turns(root: str, proc: int, threads: int, exchanges: int, barrier) -> None:
    """One process: ``threads`` threads, each growing its own chat session one exchange at
    a time (as the chat and the server log a turn) and appending a one-exchange session
    after each (as ``reverie ingest`` does), all into user ``ana``'s one day file."""
    log = DayLog(root)
    errors = []
    day = datetime(2026, 11, 2, 9, tzinfo=timezone.utc)

    def thread(t: int) -> None:
        try:
            session = None
            barrier_t.wait(WAIT)
            for k in range(exchanges):
                tag = f"p{proc}-t{t}-x{k}"
                messages = [] if session is None else list(session.messages)
                n = len(messages)
                messages += [Message(turn_id=f"t{n + 1}", role="user", content=f"chat {tag}"),
                             Message(turn_id=f"t{n + 2}", role="assistant", content=f"ok {tag}")]
                session = Session(session_id=f"chat-p{proc}-t{t}", user_id="ana",
                                  started_at=day, messages=messages)
                log.save(session)
                log.append([Session(session_id=f"imp-{tag}", user_id="ana", started_at=day,
                                    messages=[Message(turn_id="t1", role="user",
                                                      content=f"imported {tag}")])])
        except BaseException as exc:  # noqa: BLE001  (reported through the exit code)
            errors.append(exc)

    barrier.wait(WAIT)  # every process is up: start together
    barrier_t = threading.Barrier(threads)
    workers = [threading.Thread(target=thread, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def _spawn_writers(root: Path, processes: int, threads: int, exchanges: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    procs = [ctx.Process(target=_write_turns, args=(str(root), p, threads, exchanges, barrier))
             for p in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WAIT * 2)
    assert [p.exitcode for p in procs] == [0] * processes


def test_many_processes_and_threads_write_one_day_file_and_every_turn_is_kept(tmp_path):
    root = tmp_path / "days"
    _spawn_writers(root, PROCESSES, THREADS, EXCHANGES)
    log = DayLog(root)
    assert [f.name for f in log.files("ana")] == ["2026-11-02.jsonl"]  # all in one file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged (half-written) line would warn
        sessions = log.sessions("ana")
    chats = {s.session_id: s for s in sessions if s.session_id.startswith("chat-")}
    imported = [s.session_id for s in sessions if s.session_id.startswith("imp-")]
    assert len(chats) == PROCESSES * THREADS
    for sid, s in chats.items():  # every exchange of every chat, in order, once
        tag = sid.removeprefix("chat-")
        assert [m.content for m in s.messages] == [
            f"{word} {tag}-x{k}" for k in range(EXCHANGES) for word in ("chat", "ok")]
        assert [m.turn_id for m in s.messages] == [f"t{i}" for i in range(1, 2 * EXCHANGES + 1)]
    assert len(imported) == len(set(imported)) == PROCESSES * THREADS * EXCHANGES
    texts = Counter(m.content for s in sessions for m in s.messages)
    assert len(texts) == PROCESSES * THREADS * EXCHANGES * 3 and set(texts.values()) == {1}
    lines = (root / "ana" / "2026-11-02.jsonl").read_text().splitlines()
    assert len(lines) == len(sessions) == PROCESSES * THREADS * (EXCHANGES + 1)


# -- nights -------------------------------------------------------------------------------

NO_MEMORIES = "none"


def _fakes():
    from test_night import KEEP, Fake

    return Fake, KEEP


class Reader:
    """A fake note-taker that records every prompt and can hold the night inside its first
    call until the test has done its concurrent work."""

    def __init__(self, responses=(NO_MEMORIES,), hold: bool = False):
        Fake, _ = _fakes()
        outer = self
        self.prompts: list[str] = []
        self.inside, self.go = threading.Event(), threading.Event()
        if not hold:
            self.go.set()

        class Recording(Fake):
            def _call(self, messages, *args, **kwargs):
                outer.prompts.append("\n".join(str(m.content) for m in messages))
                outer.inside.set()
                assert outer.go.wait(WAIT), "the test never let the night go on"
                return super()._call(messages, *args, **kwargs)

        self.model = Recording(responses=list(responses))


def _models(reader, verifier=None, persona=None, dreamer=None):
    from conftest import NoteDreamer

    Fake, KEEP = _fakes()
    return {"notetaker": reader.model, "dreamer": dreamer or NoteDreamer(),
            "verifier": verifier or Fake(responses=["{}"]),
            "reshaper": Fake(responses=["none"]), "persona": persona or Fake(responses=[KEEP])}


def _run(settings, embedder, models, **kw):
    from reverie.graphs.run import run_night

    return asyncio.run(run_night(settings, models=models, embedder=embedder, learner=None, **kw))


class Background:
    """A night running in a thread; ``result()`` joins it and returns its summary (or
    raises what it raised)."""

    def __init__(self, settings, embedder, models):
        self.out: dict = {}

        def run():
            try:
                self.out["summary"] = _run(settings, embedder, models)
            except BaseException as exc:  # noqa: BLE001
                self.out["error"] = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def result(self) -> dict:
        self.thread.join(WAIT * 2)
        assert not self.thread.is_alive(), "the night did not finish"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["summary"]


@pytest.fixture
def settings(tmp_path, model_cache):
    from reverie.config import load_settings

    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.models.cache_dir = model_cache
    s.night.dream_bursts = 1
    s.night.reshape_rounds = 0
    return s


def _chat(log, session, user_text):
    from reverie.wake.chat import log_turn

    return log_turn(log, session, "ana", user_text, f"noted: {user_text}")


def test_turns_written_while_a_night_runs_are_slept_by_the_next_night_once(settings, embedder,
                                                                          tmp_path):
    log = DayLog(settings.paths.days)
    chat = _chat(log, None, "old one: my sister lives in Oslo.")
    chat = _chat(log, chat, "old two: she has a cat.")
    reader = Reader(hold=True)
    night = Background(settings, embedder, _models(reader))
    assert reader.inside.wait(WAIT)  # the night has gathered the day and is reading it
    # meanwhile: the chat goes on in its session, and another process (a server, an
    # ingest) writes the same user's day file
    chat = _chat(log, chat, "new three: I bought a bike.")
    chat = _chat(log, chat, "new four: it is red.")
    _spawn_writers(settings.paths.days, processes=2, threads=1, exchanges=2)
    reader.go.set()
    first = night.result()
    assert first["sessions"] == 1
    assert "old" in reader.prompts[0]
    assert not any("new three" in p for p in reader.prompts)

    # the next night reads exactly what the first did not: the chat's new turns (same
    # session, turn ids kept) and the other writers' sessions whole
    left = {s.session_id: s for s in log.unconsumed("ana")}
    assert [m.turn_id for m in left[chat.session_id].messages] == ["t5", "t6", "t7", "t8"]
    written = {f"chat-p{p}-t0" for p in range(2)} | {f"imp-p{p}-t0-x{k}" for p in range(2)
                                                      for k in range(2)}
    assert set(left) == {chat.session_id} | written
    second_reader = Reader()
    second = _run(settings, embedder, _models(second_reader))
    assert second["sessions"] == len(left)
    prompts = "\n".join(second_reader.prompts)
    assert "new three" in prompts and "new four" in prompts and "chat p1-t0-x1" in prompts
    assert "old one" not in prompts and "old two" not in prompts  # nothing slept twice
    # one note-taker call per user turn, each turn read once (as the message; the next
    # turn's prompt shows it again as context)
    assert len(second_reader.prompts) == sum(m.role == "user" for s in left.values()
                                               for m in s.messages)
    read = [p.rsplit("Message:", 1)[-1] for p in second_reader.prompts]
    assert sum("new three: I bought a bike." in r for r in read) == 1

    # and then nothing is left: a third night sleeps on no session
    assert log.unconsumed("ana") == []
    assert _run(settings, embedder, _models(Reader()))["sessions"] == 0
    # a chat that goes on after that is read from its next turn
    chat = _chat(log, chat, "new five: I ride it to work.")
    (rest,) = log.unconsumed("ana")
    assert [m.turn_id for m in rest.messages] == ["t9", "t10"]


def test_a_second_night_is_refused_with_the_holders_pid_and_no_traceback(settings, embedder,
                                                                        tmp_path):
    log = DayLog(settings.paths.days)
    _chat(log, None, "my sister lives in Oslo.")
    reader = Reader(hold=True)
    night = Background(settings, embedder, _models(reader))
    try:
        assert reader.inside.wait(WAIT)
        nights_before = sorted(p.name for p in settings.paths.diary.iterdir())
        # in this process (as the chat's /sleep would)
        with pytest.raises(NightLocked) as refused:
            _run(settings, embedder, _models(Reader()))
        message = str(refused.value)
        assert f"another night (pid {os.getpid()}, started " in message
        assert str(settings.data_dir) in message and "wait for it" in message
        assert refused.value.holder["pid"] == os.getpid()
        # from the command line (as cron's `reverie night` would)
        cli = subprocess.run([sys.executable, "-m", "reverie", "--data-dir",
                              str(settings.data_dir), "night"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=WAIT)
        assert cli.returncode == 1
        assert f"another night (pid {os.getpid()}, started " in cli.stderr
        assert "Traceback" not in cli.stderr + cli.stdout
        # the refused nights wrote nothing
        assert sorted(p.name for p in settings.paths.diary.iterdir()) == nights_before
    finally:
        reader.go.set()
    assert night.result()["sessions"] == 1
    assert night_holder(settings.data_dir) is None  # the holder record goes with the night


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_lock_left_by_a_dead_night_is_taken_over_with_a_notice(settings, embedder, capfd):
    dead = _dead_pid()
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / NIGHT_HOLDER).write_text(json.dumps(
        {"pid": dead, "host": socket.gethostname(), "started": "2026-11-02T03:00:01"}))
    (settings.data_dir / NIGHT_LOCK).write_text("")
    _chat(DayLog(settings.paths.days), None, "my sister lives in Oslo.")
    summary = _run(settings, embedder, _models(Reader()))
    assert summary["sessions"] == 1
    err = capfd.readouterr().err
    assert f"notice: the previous night (pid {dead}, started 2026-11-02 03:00:01) ended " \
           "without releasing" in err
    assert night_holder(settings.data_dir) is None
    # were the lock still held with that record (a file system without OS locks keeps a
    # lock file), the refusal would say the holder is gone and what to delete
    stale = str(NightLocked(settings.data_dir, {"pid": dead, "host": socket.gethostname(),
                                                "started": "2026-11-02T03:00:01"}))
    assert "that process is gone" in stale and f"delete {settings.data_dir / NIGHT_LOCK}" in stale


HOLDER = """
import sys
from reverie.locks import night_lock
with night_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_night_killed_with_sigkill_releases_the_lock(tmp_path):
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NightLocked) as refused:
            with night_lock(data):
                pass
        assert f"(pid {holder.pid}, started " in str(refused.value)
        assert f"stop it (kill {holder.pid})" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait(WAIT)
    assert night_holder(data)["pid"] == holder.pid  # its record is left behind ...
    notes = []
    with night_lock(data, notify=notes.append) as mine:  # ... but the OS lock is free
        assert mine["pid"] == os.getpid() and night_holder(data)["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0]
    with night_lock(data, notify=notes.append):  # released cleanly: no notice this time
        pass
    assert len(notes) == 1


# -- the memory store and its index -------------------------------------------------------

DOG = "mem-dog0000001"


def test_store_and_index_agree_after_a_night_a_chat_and_a_forget_at_once(settings, embedder,
                                                                       tmp_path, monkeypatch):
    import chromadb
    import yaml
    from typer.testing import CliRunner

    from reverie.cli import app
    from reverie.memory.facts import MemoryIndex
    from reverie.memory.manage import forget_memory
    from reverie.memory.records import Memory
    from reverie.memory.store import MemoryStore
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction
    from conftest import NoteDreamer, notes
    from test_night import judgement

    def index():
        return MemoryIndex(chromadb.PersistentClient(path=str(settings.paths.chroma)),
                           MiniLMEmbeddingFunction(embedder))

    store = MemoryStore(settings.paths.memories_db)
    seeded = [Memory(id=DOG, user_id="ana", kind="fact", question="What is the user's dog called?",
                     answer="Biscuit", status="verified"),
              Memory(id="mem-job0000001", user_id="ana", kind="fact",
                     question="Where does the user work?", answer="At the bakery",
                     status="verified")]
    for m in seeded:
        store.add(m)
    index().upsert_many(seeded)
    log = DayLog(settings.paths.days)
    log.append([Session(session_id="s1", user_id="ana",
                        started_at=datetime(2026, 11, 2, 9, tzinfo=timezone.utc),
                        messages=[Message(turn_id="t1", role="user",
                                          content="My dog is called Rex now."),
                                  Message(turn_id="t2", role="assistant", content="Noted!")])])

    # the night supersedes the dog memory; a forget of it arrives while the night is in
    # the middle of that change, and the chat logs turns meanwhile
    real_supersede = MemoryStore.supersede
    inside, forget_started = threading.Event(), threading.Event()
    order = []

    def supersede(self, *args, **kwargs):
        inside.set()
        assert forget_started.wait(WAIT)
        done = real_supersede(self, *args, **kwargs)
        order.append("night superseded")
        return done

    monkeypatch.setattr(MemoryStore, "supersede", supersede)

    def forget():
        assert inside.wait(WAIT)
        chat = _chat(log, None, "what was my dog called again?")
        _chat(log, chat, "never mind.")
        forget_started.set()
        with MemoryStore(settings.paths.memories_db) as mine:
            order.append(forget_memory(mine, index(), DOG, reason="test",
                                       request="reverie memories forget dog"))

    forgetting = threading.Thread(target=forget)
    forgetting.start()
    Fake, _ = _fakes()
    reader = Reader(responses=[notes("The user's dog is called Rex now.")])
    summary = _run(settings, embedder, _models(
        reader, Fake(responses=[judgement()]),
        dreamer=NoteDreamer(rules=[("Rex", "Q: What is my dog called?")])))
    forgetting.join(WAIT)
    assert summary["superseded"] == 1 and summary["memories_added"] == 1
    # the forget waited for the night's change, then forgot every version (the new one too)
    assert order[0] == "night superseded"
    assert order[1][0] == DOG and len(order[1]) == 2
    assert [m.id for m in store.list(user_id="ana")] == ["mem-job0000001"]
    assert index().check(store) == {"missing": [], "stale": [], "differ": []}
    # the chat's turns are kept, for the next night
    assert [s.messages[0].content for s in log.unconsumed("ana")] == \
        ["what was my dog called again?"]

    # `reverie memories check`: exit 0 when they agree; exit 1 naming what differs
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(settings.data_dir),
                                      "models": {"cache_dir": str(settings.models.cache_dir)}}))
    runner = CliRunner()
    ok = runner.invoke(app, ["-c", str(config), "memories", "check"])
    assert ok.exit_code == 0, ok.output
    assert "agrees with the store: 1 memory of every user" in ok.output
    index().remove("mem-job0000001")
    apart = runner.invoke(app, ["-c", str(config), "memories", "check", "--json"])
    assert apart.exit_code == 1
    assert json.loads(apart.output) == {"agree": False, "memories": 1,
                                        "missing": ["mem-job0000001"], "stale": [],
                                        "differ": []}
    assert runner.invoke(app, ["-c", str(config), "memories", "reindex"]).exit_code == 0
    assert runner.invoke(app, ["-c", str(config), "memories", "check"]).exit_code == 0
    store.close()


def test_the_chats_sleep_is_refused_while_a_night_runs_and_the_chat_goes_on(tmp_path):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from reverie.config import WakeConfig
    from reverie.prompts import load_prompt
    from reverie.wake.chat import CHAT_VARIABLES, COMPACT_VARIABLES, ChatSession

    data = tmp_path / "data"

    def sleep():  # as the CLI's: a night on this data dir
        with night_lock(data):
            raise AssertionError("a night ran while another held the lock")

    log = DayLog(data / "days")
    chat = ChatSession(FakeListChatModel(responses=["Nice!"]), load_prompt("chat", CHAT_VARIABLES),
                       load_prompt("compact", COMPACT_VARIABLES), "You are Reverie.", log, "ana",
                       WakeConfig(auto_sleep_turns=1), rag=False, sleep=sleep)
    with night_lock(data):  # a cron night holds the data dir
        refused = chat.handle("/sleep")
        assert refused.kind == "info" and not refused.slept
        assert refused.text.startswith(f"not sleeping now: another night (pid {os.getpid()}")
        answered = chat.handle("I got a bike.")  # the auto-sleep trigger fires, and is refused
        assert answered.kind == "reply" and answered.text == "Nice!" and not answered.slept
    (session,) = log.unconsumed("ana")
    assert [m.content for m in session.messages] == ["I got a bike.", "Nice!"]
