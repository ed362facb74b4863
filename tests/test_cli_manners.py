"""How the CLI behaves around its user: progress lines for logs and pipes (a live table on
a terminal), ``--json``, tables that never cut a value, clear errors instead of tracebacks
for a wrong model source, and a chat where Ctrl-C stops one answer (and cancels its
generation on the engine) without ending the chat."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import REPO, tiny_loaded
from conftest import tiny_config as make_tiny_config
from reverie.cli import app
from reverie.cli import main
from reverie.config import Settings, WakeConfig
from reverie.memory.daylog import DayLog
from reverie.memory.records import Message, Session

STAMP = r"\d\d:\d\d:\d\d "


@pytest.fixture
def plain_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "models": {"cache_dir": str(tmp_path / "cache")}}))
    return config


# -- the night's progress -------------------------------------------------------------------

def day_session(sid: str, user_turns: int, forget: bool = False) -> Session:
    """A session of ``user_turns`` exchanges (the last one a forget request with
    ``forget``)."""
    messages = []
    for i in range(user_turns):
        text = "Please forget my number." if forget and i == user_turns - 1 else f"turn {i}"
        messages += [Message(turn_id=f"t{2 * i + 1}", role="user", content=text),
                     Message(turn_id=f"t{2 * i + 2}", role="assistant", content="ok")]
    return Session(session_id=sid, user_id="me", messages=messages)


def fake_night(buffer: io.StringIO, seen: dict):
    """A stand-in for ``run_night``: reports a small night through the callbacks and notes
    what had been written to ``buffer`` at chosen moments (so the test sees lines appear
    while the night runs, not at its end)."""

    def run(on_update, on_train):
        sessions = [day_session("s1", 6), day_session("s2", 2, forget=True)]
        on_update("gather", {"sessions": sessions})  # 8 user turns, one asks to forget: 7
        seen["after gather"] = buffer.getvalue()
        for i in range(3):
            on_update("read", {"candidates": {f"c{i}{j}": SimpleNamespace(status="pending")
                                              for j in range(2)}})
        seen["after reads"] = buffer.getvalue()
        on_update("triage", {})
        statuses = ["passed"] * 4 + ["failed"] * 2 + ["rejected"]
        for s in statuses:
            on_update("verify", {"candidates": {"x": SimpleNamespace(status=s)}})
        on_update("triage", {})
        seen["after verify"] = buffer.getvalue()
        on_update("consolidate", {"consolidation": {"added": ["m1", "m2"], "deleted": []}})
        for step in range(1, 21):
            on_train(step, 20, 2.0 - step / 20, 300.0)
        seen["after training"] = buffer.getvalue()
        on_update("learn", {"forge": {"promoted": True, "version": "v2"}})
        return {"night_id": "n1"}

    return run


def test_piped_night_prints_timestamped_lines_as_it_goes():
    buffer = io.StringIO()
    piped = Console(file=buffer, force_terminal=False, width=40)  # narrow: lines must not wrap
    seen: dict = {}
    result = main._with_night_display(fake_night(buffer, seen), to=piped, settings=Settings())
    assert result == {"night_id": "n1"}
    assert re.search(rf"^{STAMP}gather: 2 sessions$", seen["after gather"], re.M)
    # the first note-taker call is reported at once, the rest when the round ends
    assert re.search(rf"^{STAMP}note-taker 1/7 turns, 2 notes$", seen["after reads"], re.M)
    assert "note-taker 3/7" not in seen["after reads"]
    assert re.search(rf"^{STAMP}note-taker 3/7 turns, 6 notes$", seen["after verify"], re.M)
    assert re.search(rf"^{STAMP}verify 5 calls: 4 passed, 1 failed, 0 rejected$",
                     seen["after verify"], re.M)                       # every 5 calls
    assert re.search(rf"^{STAMP}verify 7 calls: 4 passed, 2 failed, 1 rejected$",
                     seen["after verify"], re.M)                       # and at the round's end
    assert re.search(rf"^{STAMP}consolidate: 2 added, 0 deleted$", seen["after training"], re.M)
    steps = re.findall(rf"^{STAMP}forge step (\d+)/20, loss", seen["after training"], re.M)
    assert steps == ["1", "2", "4", "6", "8", "10", "12", "14", "16", "18", "20"]
    out = buffer.getvalue()
    assert re.search(rf"^{STAMP}forge: promoted v2$", out, re.M)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d night starts\n", out)
    assert "━" not in out and "┃" not in out  # no table: never both
    assert "triage" not in out


def test_terminal_night_shows_the_live_table_and_no_lines():
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    main._with_night_display(fake_night(buffer, {}), to=terminal, settings=Settings())
    out = buffer.getvalue()
    assert "verifier" in out and "4 passed, 2 failed, 1 rejected" in out
    assert "promoted v2" in out
    assert not re.search(rf"^{STAMP}", out, re.M) and "night starts" not in out


def test_night_json_is_the_summary_alone_on_stdout(plain_config, monkeypatch):
    import reverie.graphs.run as night_run

    summary = {"night_id": "n7", "sessions": 1, "memories_added": 2, "superseded": 0,
               "deleted": 0, "forge": {"skipped": "forge disabled"}, "seconds": 1.5}

    async def run_night(settings, runtime=None, on_update=None, on_train=None, **kw):
        on_update("gather", {"sessions": [day_session("s1", 2)]})
        print("a library talking on stdout")
        on_update("learn", {"forge": summary["forge"]})
        return summary

    closed = []
    monkeypatch.setattr(night_run, "run_night", run_night)
    monkeypatch.setattr(main, "_runtime", lambda settings: SimpleNamespace(
        close=lambda: closed.append(True)))
    result = CliRunner().invoke(app, ["--config", str(plain_config), "night", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads(result.stdout) == summary
    assert re.search(rf"^{STAMP}gather: 1 sessions$", result.stderr, re.M)
    assert re.search(rf"^{STAMP}forge: forge disabled$", result.stderr, re.M)
    assert "a library talking on stdout" in result.stderr
    assert closed == [True]


# -- tables and --json ------------------------------------------------------------------------

def test_models_list_wraps_in_an_80_column_terminal(plain_config, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(main, "console", Console(force_terminal=True, color_system=None))
    result = CliRunner().invoke(app, ["--config", str(plain_config), "models", "list"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines if line[:1] in "┏┃┡│└") <= 80
    assert "…" not in result.stdout
    header = next(line for line in lines if "source" in line and "┃" in line)
    col = [c.strip() for c in header.split("┃")].index("source")
    cells = "".join(line.split("│")[col].strip() for line in lines if line.count("│") > col)
    assert "embedded:smollm2-135m-instruct" in cells
    assert "embedded:qwen2.5-coder-0.5b-instruct" in cells


def test_models_list_in_a_pipe_and_as_json(plain_config):
    result = CliRunner().invoke(app, ["--config", str(plain_config), "models", "list"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert rows[0] == ["name", "kind", "source", "cached", "size", "roles"]
    assert ["default", "chat", "embedded:smollm2-135m-instruct", "no", "-",
            "persona, student"] in rows
    result = CliRunner().invoke(app, ["--config", str(plain_config), "models", "list", "--json"])
    data = json.loads(result.stdout)
    default = next(m for m in data["models"] if m["name"] == "default")
    assert default["source"] == "embedded:smollm2-135m-instruct" and default["cached"] is False
    assert set(default["roles"]) == {"persona", "student"}
    assert data["versions"] == [] and data["active"] is None


# -- wrong model sources: a message, not a traceback ------------------------------------------

def reverie(config, *args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "reverie", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("source, command, expected", [
    ("/nope.gguf", ["ask", "hi"], "models.chat.default: no GGUF file at /nope.gguf"),
    ("embedded:nope", ["night"], "models.chat.default: unknown embedded model 'nope'"),
])
def test_a_wrong_model_source_is_named_before_any_work(tmp_path, source, command, expected):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "models": {"chat": {"default": source}}}))
    done = reverie(config, *command)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "data" / "diary").exists()   # no night was started


def test_a_model_that_fails_to_load_is_an_error_not_a_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "models": {"chat": {"default": str(bad)}}}))
    result = CliRunner().invoke(app, ["--config", str(config), "ask", "hi"])
    assert result.exit_code == 1
    assert f"{bad}: not a readable GGUF file" in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_check_source_is_cheap_and_names_the_field(tmp_path):
    from reverie.runtime.sources import ModelSourceError, check_source

    check_source("HuggingFaceTB/SmolLM2-135M-Instruct")      # maybe a hub id: not checked
    check_source("embedded:smollm2-135m-instruct")            # known, whether fetched or not
    check_source(str(tmp_path), "models.embedding", folder=True)
    check_source(SimpleNamespace(langchain="ollama:x"))       # not ours to load
    with pytest.raises(ModelSourceError, match=r"models.chat.big: no model file or folder at"):
        check_source(str(tmp_path / "missing"), "models.chat.big")
    with pytest.raises(ModelSourceError, match=r"models.embedding: no model folder at /nope"):
        check_source("/nope", "models.embedding", folder=True)


# -- chat: Ctrl-C stops one answer ------------------------------------------------------------

def test_ctrl_c_during_a_stream_stops_that_answer_and_cancels_it(tmp_path, smollm2_tokenizer):
    from reverie.prompts import load_prompt
    from reverie.runtime.chat_model import MLXChatModel
    from reverie.wake.chat import CHAT_VARIABLES, COMPACT_VARIABLES, ChatSession

    with tiny_loaded(smollm2_tokenizer, seed=5) as loaded:
        session = ChatSession(MLXChatModel(loaded=loaded, max_tokens=400),
                              load_prompt("chat", CHAT_VARIABLES),
                              load_prompt("compact", COMPACT_VARIABLES), "You are Reverie.",
                              DayLog(tmp_path / "days"), "ana", WakeConfig(), rag=False)
        shown = []

        def on_token(piece):
            if len(shown) == 3:
                raise KeyboardInterrupt   # what Ctrl-C does while the answer prints
            shown.append(piece)

        reply = session.send("Tell me a long story.", on_token=on_token)
        assert reply.interrupted and reply.kind == "reply"
        # a short request after the cancel: when it is done, the worker has dropped the
        # cancelled one (had it not been cancelled, it would run ~396 more tokens)
        assert loaded.engine.generate([1, 2, 3], 2)[-1].finish_reason is not None
        assert loaded.engine.in_flight() == 0
        # the chat goes on; the stopped turn was logged with the part generated
        session.model = MLXChatModel(loaded=loaded, max_tokens=4)
        again = session.send("Go on.", on_token=lambda piece: None)
        assert not again.interrupted
    (logged,) = DayLog(tmp_path / "days").sessions("ana")
    assert [m.content for m in logged.messages][::2] == ["Tell me a long story.", "Go on."]
    assert logged.messages[1].content.startswith("".join(shown).strip())
    assert logged.messages[1].content == reply.text


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, smollm2_tokenizer, model_cache):
    root = tmp_path_factory.mktemp("tiny")
    path = make_tiny_config(root, smollm2_tokenizer, model_cache,
                            roles={"student": {"model": "default", "max_tokens": 16}},
                            wake={"user": "ana"})
    return path, root / "data"


def test_piped_chat_goes_on_after_a_stopped_answer(tiny_config, monkeypatch):
    from reverie.wake.chat import ChatSession

    config, data = tiny_config
    send, calls = ChatSession.send, []

    def stopped_first(self, text, on_token=None, on_retrieved=None):
        calls.append(text)
        if len(calls) > 1:
            return send(self, text, on_token, on_retrieved)
        pieces = []

        def ctrl_c_after_two(piece):
            on_token(piece)
            pieces.append(piece)
            if len(pieces) == 2:
                raise KeyboardInterrupt

        return send(self, text, ctrl_c_after_two, on_retrieved)

    monkeypatch.setattr(ChatSession, "send", stopped_first)
    result = CliRunner().invoke(app, ["--config", str(config), "chat"],
                                input="hi there\nsecond line\n/quit\n")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert calls == ["hi there", "second line"]
    assert result.stdout.count("reverie>") == 2
    assert "(stopped: the part shown is logged as the answer)" in result.stdout
    (session,) = DayLog(data / "days").sessions("ana")
    assert [m.content for m in session.messages][::2] == ["hi there", "second line"]
    assert not (data / "chat_history").exists()   # no line editing without a terminal


def test_terminal_prompt_keeps_history_and_ctrl_d_ctrl_c_end_it(tmp_path):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    history = tmp_path / "data" / "chat_history"
    with create_pipe_input() as keys:
        read = main._line_reader(history, True, input=keys, output=DummyOutput())
        keys.send_text("remember me\r")
        assert read() == "remember me"
        keys.send_text("\x04")           # Ctrl-D on an empty line
        with pytest.raises(EOFError):
            read()
        keys.send_text("half\x03")       # Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            read()
    assert "remember me" in history.read_text()
