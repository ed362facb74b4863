"""Day log and importers: formats, errors with file/line/field, idempotence, consumption,
atomic writes, LoCoMo (when the shared file is present) and the shipped sample day."""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reverie.memory.daylog import DayLog, validate_user_id
from reverie.memory.ingest import (IngestError, detect_format, ingest, parse_locomo_datetime,
                           read_sessions, sample_day_path)
from reverie.memory.records import Message, Session
from reverie.cli.ingest import ingest_command, parse_session_numbers
from reverie.config import Settings

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "conv-30.json"


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def _session(text: str, started: str | None = "2025-03-01T09:00:00+00:00", user="me") -> Session:
    return Session(session_id=f"s-{text}", user_id=user,
                   started_at=datetime.fromisoformat(started) if started else None,
                   messages=[Message(turn_id="t1", role="user", content=text)])


# -- formats ----------------------------------------------------------------------------


def test_openai_jsonl(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [
        {"id": "abc", "user": "someone", "created": 1700000000,
         "messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
                      {"role": "tool", "content": "42"},
                      {"role": "assistant", "content": "hello"}]},
        _chat(2)])
    assert detect_format(f) == "openai"
    sessions, errors = read_sessions(f, "me")
    assert errors == []
    a, b = sessions
    assert a.session_id == "abc" and a.user_id == "me"
    assert [(m.turn_id, m.role, m.content) for m in a.messages] == [
        ("t1", "system", "be brief"), ("t2", "user", "hi"), ("t3", "assistant", "hello")]
    assert a.started_at == datetime.fromtimestamp(1700000000, timezone.utc)
    assert b.session_id == f"openai-{b.content_hash[:12]}" and b.started_at is None
    assert b.source == "openai:chat.jsonl"


def test_sharegpt_array_and_jsonl(tmp_path):
    rec = {"id": 7, "conversations": [{"from": "system", "value": "sys"},
                                      {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}]}
    arr = tmp_path / "share.json"
    arr.write_text(json.dumps([rec, {"conversations": [{"from": "human", "value": "x"}]}],
                              indent=1))
    lines = _jsonl(tmp_path / "share.jsonl", [rec])
    assert detect_format(arr) == detect_format(lines) == "sharegpt"
    sessions, errors = read_sessions(arr, "me")
    assert errors == [] and len(sessions) == 2
    assert sessions[0].session_id == "7"
    assert [m.role for m in sessions[0].messages] == ["system", "user", "assistant"]
    assert [m.turn_id for m in sessions[0].messages] == ["t1", "t2", "t3"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rec, {"conversations": [{"from": "robot", "value": "x"}]}]))
    sessions, errors = read_sessions(bad, "me")
    assert len(sessions) == 1
    assert str(errors[0]) == (f"{bad}:record 2: conversations.0.from: "
                              "'robot' is not one of human, gpt, system")


def test_reverie_format_roundtrip(tmp_path):
    s = _session("hello")
    f = _jsonl(tmp_path / "day.jsonl", [s.model_dump_json()])
    assert detect_format(f) == "reverie"
    (got,), errors = read_sessions(f, "alice")
    assert errors == [] and got.user_id == "alice" and got.messages == s.messages


def test_locomo_small(tmp_path):
    conv = {"speaker_a": "Ann", "speaker_b": "Bob",
            "session_1_date_time": "12:48 am on 1 February, 2023",
            "session_1": [{"speaker": "Bob", "dia_id": "D1:1", "text": "hey"},
                          {"speaker": "Ann", "dia_id": "D1:2", "text": "look",
                           "img_url": ["http://x"], "blip_caption": "a photo of a cat"}],
            "session_2_date_time": "not a date",
            "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "x"}],
            "session_3_date_time": "1:56 pm on 8 May, 2023",
            "session_3": [{"speaker": "Eve", "dia_id": "D3:1", "text": "x"}]}
    f = tmp_path / "conv-x.json"
    f.write_text(json.dumps(conv))
    assert detect_format(f) == "locomo"
    sessions, errors = read_sessions(f, "me")
    (s,) = sessions
    assert s.session_id == "locomo-conv-x-s1"
    assert s.started_at == datetime(2023, 2, 1, 0, 48, tzinfo=timezone.utc)
    assert [(m.turn_id, m.role) for m in s.messages] == [("D1:1", "assistant"), ("D1:2", "user")]
    assert s.messages[1].content == "look [image: a photo of a cat]"
    assert [(e.line, e.unit, e.field) for e in errors] == [
        (2, "record", "session_2_date_time"), (3, "record", "session_3.0.speaker")]
    only, errors = read_sessions(f, "me", sessions={1, 9})
    assert len(only) == 1 and "no session 9" in str(errors[0])


def test_unknown_format(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("just some text\n")
    with pytest.raises(IngestError, match="unknown format"):
        detect_format(f)
    sessions, errors = read_sessions(f, "me")
    assert sessions == [] and errors[0].line is None and str(errors[0]).startswith(str(f))


def test_locomo_date_parsing():
    assert parse_locomo_datetime("4:04 pm on 20 January, 2023") == datetime(
        2023, 1, 20, 16, 4, tzinfo=timezone.utc)
    assert parse_locomo_datetime("12:05 pm on 3 Sept, 2023").hour == 12
    with pytest.raises(ValueError):
        parse_locomo_datetime("yesterday")


# -- errors keep the valid records --------------------------------------------------------


def test_bad_line_in_the_middle(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "robot", "content": "c"}]}
    f = _jsonl(tmp_path / "chat.jsonl", [_chat(1), bad, "{not json", _chat(4), {"messages": []}])
    log = DayLog(tmp_path / "days")
    report = ingest([f], log, "me")
    assert report.imported == 2
    assert [m.content for s in log.sessions() for m in s.messages] == [
        "question 1", "answer 1", "question 4", "answer 4"]
    e1, e2, e3 = report.errors
    assert (e1.file, e1.line, e1.field) == (str(f), 2, "messages.2.role")
    assert str(e1) == f"{f}:2: messages.2.role: 'robot' is not one of user, assistant, system"
    assert e2.line == 3 and "invalid JSON" in e2.message
    assert (e3.line, e3.field) == (5, "messages")


# -- the day log ------------------------------------------------------------------------


def test_reimport_is_a_noop(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [_chat(1), _chat(2), _chat(1)])
    log = DayLog(tmp_path / "days")
    first = ingest([f], log, "me")
    assert (first.imported, first.skipped_duplicates) == (2, 1)
    files = {p: p.read_bytes() for p in log.files()}
    again = ingest([f], log, "me")
    assert (again.imported, again.skipped_duplicates) == (0, 3)
    assert {p: p.read_bytes() for p in log.files()} == files
    assert len(log.sessions("me")) == 2


def test_day_files_and_order(tmp_path):
    log = DayLog(tmp_path)
    written = log.append([_session("late", "2025-03-02T10:00:00+00:00"), _session("undated", None),
                          _session("early", "2025-03-01T08:00:00"),
                          _session("bob", "2025-03-01T09:00:00+00:00", user="bob")])
    assert len(written) == 4
    assert (tmp_path / "me" / "2025-03-01.jsonl").exists()
    assert (tmp_path / "me" / "2025-03-02.jsonl").exists()
    assert (tmp_path / "bob" / "2025-03-01.jsonl").exists()
    assert [s.session_id for s in log.sessions("me")] == ["s-early", "s-late", "s-undated"]
    assert len(log.sessions()) == 4


def test_user_ids_are_folder_safe(tmp_path):
    assert validate_user_id("me.2_x-y") == "me.2_x-y"
    for bad in ["", "..", ".hidden", "a/b", "a b", "consumed.jsonl"]:
        with pytest.raises(ValueError, match="invalid user id"):
            validate_user_id(bad)
    with pytest.raises(ValueError, match="'a/b'"):
        DayLog(tmp_path).append([_session("x", user="a/b")])
    assert not any(tmp_path.iterdir())


def test_damaged_line_is_skipped_with_a_warning(tmp_path):
    log = DayLog(tmp_path)
    log.append([_session("one")])
    (path,) = log.files()
    path.write_text(path.read_text() + "{broken\n")
    with pytest.warns(UserWarning, match=rf"{path.name}:2"):
        assert [s.session_id for s in log.sessions()] == ["s-one"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log.append([_session("two")])
    assert "{broken" in path.read_text()  # damaged lines are kept, not destroyed


def test_consumed_sessions(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [_chat(1), _chat(2)])
    log = DayLog(tmp_path / "days")
    ingest([f], log, "me")
    one, two = log.sessions()
    log.mark_consumed([one], "night-1")
    assert log.consumed() == {one.content_hash: "night-1"}
    assert log.unconsumed("me") == [two]
    assert len(log.unconsumed(include_consumed=True)) == 2
    report = ingest([f], log, "me")
    assert (report.imported, report.skipped_consumed, report.skipped_duplicates) == (0, 1, 1)
    # consumed and gone from the log: skipped unless forced
    for p in log.files():
        p.unlink()
    report = ingest([f], log, "me")
    assert (report.imported, report.skipped_consumed) == (1, 1)
    report = ingest([f], log, "me", force=True)
    assert (report.imported, report.requeued) == (1, 1)
    assert log.consumed() == {}
    assert len(log.unconsumed()) == 2


def test_atomic_write(tmp_path, monkeypatch):
    log = DayLog(tmp_path)
    log.append([_session("one")])
    (path,) = log.files()
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        log.append([_session("two")])
    with pytest.raises(OSError, match="disk full"):
        log.mark_consumed(log.sessions(), "night-1")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["2025-03-01.jsonl", "me"]  # no temps
    assert log.consumed() == {}


# -- LoCoMo (the shared real conversation, when present) -----------------------------------


@pytest.mark.skipif(not LOCOMO.exists(), reason=f"{LOCOMO} not present")
def test_locomo_conv30(tmp_path):
    assert detect_format(LOCOMO) == "locomo"
    sessions, errors = read_sessions(LOCOMO, "me", sessions={1})
    assert errors == []
    (s,) = sessions
    assert s.session_id == "locomo-conv-30-s1"
    assert len(s.messages) == 28
    assert s.turn("D1:3") is not None
    assert s.turn("D1:2").role == "user" and "Jon" in s.turn("D1:3").content  # Gina talks to Jon
    assert s.turn("D1:1").role == "assistant"
    assert s.started_at.replace(tzinfo=None) == datetime(2023, 1, 20, 16, 4)
    everything, errors = read_sessions(LOCOMO, "me")
    assert errors == [] and len(everything) == 19
    assert any("[image: " in m.content for x in everything for m in x.messages)


# -- the shipped sample day ---------------------------------------------------------------


def test_sample_day(tmp_path):
    path = sample_day_path()
    assert path.exists() and detect_format(path) == "reverie"
    sessions, errors = read_sessions(path, "me")
    assert errors == [] and 3 <= len(sessions) <= 4
    assert len({s.started_at.date() for s in sessions}) == 1
    assert all(4 <= len(s.messages) <= 8 for s in sessions)
    text = "\n".join(s.transcript() for s in sessions)
    assert "```python" in text and "https://" in text
    assert "555-0142" in sessions[0].transcript() and "forget" in sessions[-1].transcript().lower()


def test_cli_ingest(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path / "data")
    assert ingest_command([], "me", None, None, False, True, settings) == 0
    assert len(DayLog(settings.paths.days).sessions("me")) >= 3
    bad = _jsonl(tmp_path / "chat.jsonl", [_chat(1), {"messages": [{"role": "x", "content": ""}]}])
    assert ingest_command([bad], "me", "auto", None, False, False, settings) == 1
    out = capsys.readouterr()
    assert f"{bad}:2: messages.0.role: 'x' is not one of user, assistant, system" in out.err
    assert "1 imported" in out.out
    assert ingest_command([bad], "../x", None, None, False, False, settings) == 2
    assert ingest_command([bad], "me", None, "1-x", False, False, settings) == 2
    assert parse_session_numbers("1,3-5") == {1, 3, 4, 5}
    assert parse_session_numbers(None) is None
