"""`reverie ingest` on bad input, fuzzed: it never crashes, every error names the file and
the line or record (and the field, where one is at fault), the valid records around a bad
one are imported exactly once, a second import adds nothing, and the exit code says whether
anything was rejected.

Each case starts from a small valid file of one of the four formats (OpenAI JSON Lines,
ShareGPT as a JSON array or JSON Lines, a LoCoMo conversation, Reverie's own day log):
N valid records plus one mutated at a random position (a field retyped or removed, a lone
surrogate, a NUL, a 5 MB string, 10,000 nested lists, bytes flipped, the line cut, Latin-1
or CESU bytes, garbage), or the whole file spoiled (empty, a directory, missing, binary,
UTF-16 with and without a BOM, truncated, a JSON scalar). Every case is seeded
(``random.Random(f"{seed}-{case}")``): a failure names seed, case and mutation, and
``case_for(seed, case, tmp_path)`` rebuilds it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from reverie.cli import app
from reverie.memory.daylog import DayLog
from reverie.memory.ingest import IngestError, ingest
from reverie.memory.records import Message, Session

SEEDS = range(8)
CASES_PER_SEED = 40
HUGE = 5_000_000            # characters in a "huge" string
DEEP = 10_000               # nesting of a "deep" value (json's recursion limit is ~1,000)

FORMATS = ("openai", "sharegpt", "locomo", "reverie")
# a field of one record changed (the file stays valid JSON, unless nested too deeply)
STRUCTURE_MUTATIONS = ("retype", "remove", "surrogate", "nul", "extra", "unicode",
                       "deep_list", "deep_dict", "huge")
# the bytes of one record changed
BYTE_MUTATIONS = ("flip", "cut", "raw_nul", "latin1", "cesu", "garbage", "newline")
RECORD_MUTATIONS = STRUCTURE_MUTATIONS + BYTE_MUTATIONS
FILE_MUTATIONS = ("empty", "blank", "directory", "missing", "binary", "utf16_bom",
                  "utf16_nobom", "utf8_bom", "truncate", "scalar")
MUTATIONS = RECORD_MUTATIONS + FILE_MUTATIONS
# mutations that keep the record valid JSON: a rejection must name the field at fault
FIELD_MUTATIONS = {"retype", "remove", "surrogate", "huge"}
PLACEHOLDER = "@@TARGET@@"


# -- valid records ------------------------------------------------------------------------


def _openai(rng: random.Random, tag: str) -> dict:
    messages = [{"role": "user", "content": f"question {tag}"},
                {"role": "assistant", "content": f"answer {tag}"}]
    if rng.random() < 0.3:
        messages[0]["content"] = [{"type": "text", "text": f"question {tag}"}]
    if rng.random() < 0.3:
        messages[1]["created_at"] = 1_700_000_000 + rng.randrange(10**6)
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "be brief"})
    rec: dict = {"messages": messages}
    if rng.random() < 0.5:
        rec["id"] = f"conv-{tag}"
    if rng.random() < 0.3:
        rec["created"] = 1_700_000_000 + rng.randrange(10**6)
    return rec


def _sharegpt(rng: random.Random, tag: str) -> dict:
    rec: dict = {"conversations": [{"from": "human", "value": f"question {tag}"},
                                   {"from": "gpt", "value": f"answer {tag}"}]}
    if rng.random() < 0.5:
        rec["id"] = rng.choice([rng.randrange(10**6), f"share-{tag}"])
    return rec


def _reverie(rng: random.Random, tag: str) -> dict:
    s = Session(session_id=f"chat-{tag}", user_id="someone",
                started_at=f"2025-03-0{rng.randint(1, 9)}T09:00:00+00:00",
                messages=[Message(turn_id="t1", role="user", content=f"question {tag}"),
                          Message(turn_id="t2", role="assistant", content=f"answer {tag}")])
    return s.model_dump(mode="json")


def _locomo(rng: random.Random, tag: str, n: int) -> dict:
    """A LoCoMo session as the keys it has in the conversation."""
    return {f"session_{n}_date_time": f"{rng.randint(1, 12)}:0{rng.randint(0, 9)} pm on "
                                      f"{rng.randint(1, 28)} May, 2023",
            f"session_{n}": [{"speaker": "Ann", "dia_id": f"D{n}:1", "text": f"question {tag}"},
                             {"speaker": "Bob", "dia_id": f"D{n}:2", "text": f"answer {tag}"}]}


# -- structure mutations --------------------------------------------------------------------


def _nodes(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path below ``obj`` (dict keys and list indices)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) \
        else ()
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_nodes(v, prefix + (k,)))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _other_value(rng: random.Random, old: Any) -> Any:
    kinds = {
        str: lambda: rng.choice(["", "x", "tool", "user", "human", "gpt", "Ann", "42",
                                 "2023-13-45", "null"]),
        int: lambda: rng.choice([0, -1, 7, 2**70]),
        float: lambda: rng.choice([1.5, 1e308, float("nan"), float("inf")]),
        bool: lambda: rng.choice([True, False]),
        type(None): lambda: None,
        list: lambda: rng.choice([[], ["x"], [1, [2]], [{"role": "user"}]]),
        dict: lambda: rng.choice([{}, {"text": "x"}, {"a": 1}]),
    }
    kind = rng.choice([k for k in kinds if type(old) is not k])
    return kinds[kind]()


def _mutate_structure(rng: random.Random, rec: Any, mutation: str,
                      may_replace_root: bool) -> tuple[Any, Optional[tuple], str]:
    """(mutated record, path of the field mutated or None for the whole record, detail)."""
    rec = copy.deepcopy(rec)
    nodes = _nodes(rec)
    strings = [p for p in nodes if isinstance(_get(rec, p), str)]
    if mutation == "retype":
        if may_replace_root and rng.random() < 0.1:
            return _other_value(rng, rec), None, "the whole record retyped"
        path = rng.choice(nodes)
        _set(rec, path, _other_value(rng, _get(rec, path)))
        return rec, path, f"{path} retyped to {_get(rec, path)!r}"
    if mutation == "remove":
        keyed = [p for p in nodes if isinstance(p[-1], str)]
        path = rng.choice(keyed)
        del _get(rec, path[:-1])[path[-1]]
        return rec, path, f"{path} removed"
    if mutation == "extra":
        dicts = [()] + [p for p in nodes if isinstance(_get(rec, p), dict)]
        path = rng.choice(dicts)
        _get(rec, path)["zz_unknown"] = rng.choice([1, "x", None, [1]])
        return rec, path + ("zz_unknown",), f"unknown field at {path}"
    path = rng.choice(strings)
    old = _get(rec, path)
    at = rng.randint(0, len(old))
    if mutation == "surrogate":
        ch = rng.choice(["\ud800", "\udfff", "\udc80", "\udbff"])
        _set(rec, path, old[:at] + ch + old[at:])
    elif mutation == "nul":
        _set(rec, path, old[:at] + "\x00" + old[at:])
    elif mutation == "unicode":    # valid but awkward text: line separators, BOM, RTL, emoji
        _set(rec, path, old[:at] + rng.choice(["\u2028", "\u2029", "\x85", "\ufeff", "\u202e",
                                               "\U0001f600", "\r", "\x1e", "é"]) + old[at:])
    elif mutation == "huge":
        _set(rec, path, old + " " + "x" * HUGE)
    elif mutation in ("deep_list", "deep_dict"):
        _set(rec, path, f"@@{mutation}@@")
    return rec, path, f"{mutation} in {path}"


def _deep(text: str) -> str:
    return (text.replace('"@@deep_list@@"', "[" * DEEP + "]" * DEEP)
                .replace('"@@deep_dict@@"', '{"a":' * DEEP + "1" + "}" * DEEP))


# -- byte mutations -------------------------------------------------------------------------


def _mutate_bytes(rng: random.Random, data: bytes, mutation: str) -> tuple[bytes, str]:
    b = bytearray(data)
    at = rng.randrange(len(b) + 1)
    if mutation == "flip":
        spots = [rng.randrange(len(b)) for _ in range(rng.randint(1, 3))]
        for i in spots:
            b[i] ^= rng.randint(1, 255)
        return bytes(b), f"bytes flipped at {spots}"
    if mutation == "cut":
        return bytes(b[:at]), f"cut at byte {at}"
    if mutation == "raw_nul":
        return bytes(b[:at] + b"\x00" + b[at:]), f"NUL byte at {at}"
    if mutation == "cesu":
        return bytes(b[:at] + b"\xed\xa0\x80" + b[at:]), f"surrogate bytes at {at}"
    if mutation == "newline":
        return bytes(b[:at] + b"\n" + b[at:]), f"newline at {at}"
    if mutation == "garbage":
        return rng.randbytes(rng.randint(1, 300)), "garbage bytes"
    raise AssertionError(mutation)


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One fuzz case and what must come of it."""

    name: str                       # seed, case, format, mutation, detail: for messages
    path: Path
    fmt: Optional[str]              # given to ingest (None: detected)
    tags: list[str]                 # each record's tag, in file order
    valid: set[str]                 # tags that must be imported exactly once
    maybe: set[str] = field(default_factory=set)   # the mutated record: once or not at all
    lines: Optional[set[int]] = None   # where the record's errors may point (None: anywhere)
    unit: Optional[str] = None      # "line" or "record", when errors point at records
    file_level: bool = False        # errors may name no line (a problem with the whole file)
    need_error: bool = False        # nothing of it may be imported silently
    field_root: Optional[str] = None   # first part of the field at fault, when known
    target_tag: Optional[str] = None
    no_errors: bool = False         # a whole file that must import cleanly
    may_vanish: bool = False        # the mutation may have taken the record out of the file
    data: bytes = b""


def _parses(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8-sig"))
        return True
    except (ValueError, RecursionError):
        return False


def case_for(seed: int, index: int, root: Path) -> Case:
    """Build fuzz case ``index`` of ``seed`` under ``root``: the file on disk and its oracle."""
    rng = random.Random(f"{seed}-{index}")
    k = seed * CASES_PER_SEED + index
    mutation = MUTATIONS[k % len(MUTATIONS)]
    fmt = FORMATS[(k // len(MUTATIONS)) % len(FORMATS)]
    layout = fmt
    if fmt == "sharegpt":
        layout = rng.choice(["sharegpt-array", "sharegpt-jsonl"])
    n = rng.randint(2, 5)
    total = n + 1
    tags = [f"<s{seed}c{index}r{i}>" for i in range(total)]
    target = rng.randrange(total) if mutation in RECORD_MUTATIONS else None
    given = fmt if rng.random() < 0.25 else None
    name = f"seed={seed} case={index} format={layout} mutation={mutation}"
    document = layout in ("locomo", "sharegpt-array")
    path = root / f"case-{seed}-{index}.{'json' if document else 'jsonl'}"

    build = {"openai": _openai, "sharegpt-array": _sharegpt, "sharegpt-jsonl": _sharegpt,
             "reverie": _reverie}
    if layout == "locomo":
        records = [_locomo(rng, t, i + 1) for i, t in enumerate(tags)]
    else:
        records = [build[layout](rng, t) for t in tags]
    if mutation == "latin1":   # the mutated record has a non-ASCII letter, others do not
        rec = records[target]
        turns = rec[f"session_{target + 1}"] if layout == "locomo" else None
        if turns is not None:
            turns[0]["text"] += " café"
        else:
            key = "conversations" if "conversations" in rec else "messages"
            msg = rec[key][-1]
            msg["value" if key == "conversations" else "content"] += " café"

    field_root, detail, mutated = None, "", None
    if mutation in STRUCTURE_MUTATIONS:
        mutated, fpath, detail = _mutate_structure(rng, records[target], mutation,
                                                   may_replace_root=layout != "locomo")
        field_root = str(fpath[0]) if fpath else None

    # a lone surrogate can only be written as a JSON escape
    ensure_ascii = rng.random() < 0.5 or mutation == "surrogate"

    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=ensure_ascii)

    # the file with a placeholder for the target record's text
    if layout == "locomo":
        conv: dict = {"speaker_a": "Ann", "speaker_b": "Bob"}
        for i, rec in enumerate(records):
            if i == target:
                key = f"session_{i + 1}"
                if mutated is not None:    # a structure mutation: the two keys as mutated
                    conv.update(mutated)
                    continue
                conv[f"{key}_date_time"] = rec[f"{key}_date_time"]
                conv[key] = PLACEHOLDER
            else:
                conv.update(rec)
        text = json.dumps(conv, ensure_ascii=ensure_ascii, indent=rng.choice([None, 1]))
        target_text = dumps(records[target][f"session_{target + 1}"]) if target is not None \
            else ""
        quoted = f'"{PLACEHOLDER}"'
    else:
        items = [PLACEHOLDER if i == target else dumps(r) for i, r in enumerate(records)]
        if layout == "sharegpt-array":
            text = "[\n" + ",\n".join(items) + "\n]\n"
        else:
            text = "\n".join(items) + "\n"
        target_text = dumps(records[target]) if target is not None else ""
        quoted = PLACEHOLDER
    if mutated is not None and layout != "locomo":
        target_text = dumps(mutated)
    target_text = _deep(target_text)

    if target is not None and quoted in text:
        before, after = text.split(quoted)
        prefix, suffix = before.encode(), after.encode()
        if mutation == "latin1":
            middle = json.dumps(json.loads(target_text), ensure_ascii=False).encode("latin-1")
            detail = "the record in Latin-1"
        elif mutation in BYTE_MUTATIONS:
            middle, detail = _mutate_bytes(rng, target_text.encode(), mutation)
        else:
            middle = target_text.encode()
        data = prefix + middle + suffix
    else:
        # a structure mutation of LoCoMo (inline in the document), or no target
        data = _deep(text).encode()
        prefix = middle = b""

    case = Case(name=f"{name} {detail}".strip(), path=path, fmt=given, tags=tags,
                valid=set(), target_tag=tags[target] if target is not None else None)

    # whole-file mutations
    if mutation in FILE_MUTATIONS:
        case.file_level = True
        case.valid = set(tags)
        if mutation == "empty":
            data = b""
        elif mutation == "blank":
            data = rng.choice([b"\n", b"   \n\n", b"\t"])
        elif mutation == "binary":
            data = rng.randbytes(rng.randint(1, 4096))
        elif mutation == "utf16_bom":
            data = data.decode().encode(rng.choice(["utf-16", "utf-16-be", "utf-32"]))
            if not data.startswith((b"\xff\xfe", b"\xfe\xff")):
                data = b"\xfe\xff" + data      # utf-16-be gets its BOM
        elif mutation == "utf16_nobom":
            data = data.decode().encode("utf-16-le")
        elif mutation == "utf8_bom":
            data = b"\xef\xbb\xbf" + data
        elif mutation == "scalar":
            data = rng.choice([b"5", b"null", b"[]", b"{}", b'"text"', b"[1, 2]", b"true"])
        elif mutation == "truncate":
            cut = rng.randrange(len(data))
            case.name += f" at byte {cut}"
            if document:
                case.valid = set(tags) if _parses(data[:cut]) else set()
            else:   # JSON Lines: the records whose line is whole
                ends = [i for i, b in enumerate(data) if b == 0x0A]
                whole = sum(1 for end in ends if end <= cut)
                case.valid = set(tags[:whole])
                start = ends[whole - 1] + 1 if whole else 0
                if data[start:cut].strip():
                    case.maybe = {tags[whole]}
                    case.target_tag = tags[whole]
                    case.lines = {whole + 1}
                    case.need_error = True
            data = data[:cut]
        if mutation in ("empty", "blank", "directory", "missing", "binary", "utf16_nobom",
                        "scalar"):
            case.valid = set()
        case.need_error = case.need_error or not case.valid
        case.no_errors = mutation in ("utf16_bom", "utf8_bom")
    else:
        L0 = prefix.count(b"\n") + 1
        case.maybe = {case.target_tag}
        case.need_error = case.may_vanish = True
        case.field_root = field_root if mutation in FIELD_MUTATIONS else None
        if document and not _parses(data):
            case.valid, case.maybe = set(), set()     # a broken document is rejected whole
            case.lines = None
            case.field_root = None
        elif document:
            case.valid = set(tags) - {case.target_tag}
            case.unit = "record"
            case.lines = {target + 1}
        else:
            case.valid = set(tags) - {case.target_tag}
            case.unit = "line"
            case.lines = set(range(L0, L0 + middle.count(b"\n") + 1))
    case.data = data

    if mutation == "directory":
        path.mkdir()
    elif mutation != "missing":
        path.write_bytes(data)
    return case


# -- the oracle -----------------------------------------------------------------------------


def _shown(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check(case: Case, report, log: DayLog) -> list[str]:
    """What is wrong with ``report`` and the day log for ``case`` ([] when all is well)."""
    problems = []
    errors = report.errors
    for e in errors:
        if not isinstance(e, IngestError):
            problems.append(f"not an IngestError: {e!r}")
            continue
        if not str(e).startswith(_shown(case.path)):
            problems.append(f"error does not name the file: {e}")
        if e.message.startswith("unexpected "):
            problems.append(f"an unexpected exception, caught: {e}")
        if e.line is None and not case.file_level:
            problems.append(f"error names no line or record: {e}")
        if e.line is not None and case.lines is not None and e.line not in case.lines:
            problems.append(f"error points at {e.unit} {e.line}, not {sorted(case.lines)}: {e}")
        if e.line is not None and case.unit and e.unit != case.unit:
            problems.append(f"error names a {e.unit}, not a {case.unit}: {e}")
        if len(str(e)) > 2000:
            problems.append(f"error message of {len(str(e))} characters: {str(e)[:200]}")
    if case.no_errors and errors:
        problems.append(f"a valid file reported {errors[0]}")
    sessions = log.sessions("me")
    counts: Counter = Counter()
    others = 0
    for s in sessions:
        hit = {t for t in case.tags if any(t in m.content for m in s.messages)}
        if len(hit) > 1:
            problems.append(f"one session holds records {sorted(hit)}")
        tag = next(iter(hit)) if len(hit) == 1 else None
        if tag in case.valid:
            counts[tag] += 1
        elif tag is None or tag in case.maybe:
            others += 1
        else:
            problems.append(f"record {tag} imported, but it is not valid")
    for tag in sorted(case.valid):
        if counts[tag] != 1:
            problems.append(f"valid record {tag} imported {counts[tag]} times")
    if others > len(case.maybe):
        problems.append(f"{others} sessions imported besides the valid records")
    if report.imported != len(sessions):
        problems.append(f"report says {report.imported} imported, the log has {len(sessions)}")
    if case.maybe and others and errors:
        problems.append(f"the mutated record was imported and reported: {errors[0]}")
    if case.need_error and not others and not errors and not (
            case.may_vanish and case.target_tag.encode() not in case.data):
        problems.append("a record was neither imported nor reported")
    if case.field_root and not others and errors and not any(
            e.field.split(".")[0] == case.field_root for e in errors):
        problems.append(f"no error names the field {case.field_root!r}: "
                        f"{[str(e)[:200] for e in errors]}")
    return problems


def run_case(case: Case, days: Path) -> list[str]:
    log = DayLog(days)
    try:
        first = ingest([case.path], log, "me", fmt=case.fmt)
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return [f"crashed: {type(exc).__name__}: {str(exc)[:300]}"]
    problems = check(case, first, log)
    before = {p: p.read_bytes() for p in log.files()}
    try:
        again = ingest([case.path], log, "me", fmt=case.fmt)
    except Exception as exc:  # noqa: BLE001
        return problems + [f"crashed on re-import: {type(exc).__name__}: {str(exc)[:300]}"]
    if again.imported:
        problems.append(f"re-import imported {again.imported} again")
    if {p: p.read_bytes() for p in log.files()} != before:
        problems.append("re-import changed the day log")
    if [str(e) for e in again.errors] != [str(e) for e in first.errors]:
        problems.append("re-import reported other errors")
    return problems


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_ingest(seed, tmp_path):
    failures = []
    for index in range(CASES_PER_SEED):
        case = case_for(seed, index, tmp_path)
        problems = run_case(case, tmp_path / f"days-{index}")
        failures += [f"{case.name}: {p}" for p in problems]
    assert not failures, f"{len(failures)} problems (rebuild one with case_for(seed, case, " \
                         "tmp_path)):\n" + "\n".join(failures)


def test_the_cases_cover_every_format_and_mutation(tmp_path):
    seen = Counter()
    for seed in SEEDS:
        for index in range(CASES_PER_SEED):
            k = seed * CASES_PER_SEED + index
            seen[(MUTATIONS[k % len(MUTATIONS)], FORMATS[(k // len(MUTATIONS)) % 4])] += 1
    assert len(seen) == len(MUTATIONS) * len(FORMATS) and min(seen.values()) >= 3
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = case_for(3, 7, tmp_path / "a"), case_for(3, 7, tmp_path / "b")
    assert a.data == b.data and a.name == b.name     # seeded: a case rebuilds the same


# -- the cases the issue names ----------------------------------------------------------------


def _chat(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                    {"role": "assistant", "content": f"answer {i}"}]})


def test_lone_surrogate_is_one_clear_error(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(_chat(1) + "\n" + '{"messages": [{"role": "user", "content": "ab\\ud800"}]}\n'
                 + _chat(3) + "\n")
    log = DayLog(tmp_path / "days")
    report = ingest([f], log, "me")
    assert report.imported == 2
    assert [str(e) for e in report.errors] == [
        f"{f}:2: messages.0.content: lone surrogate \\ud800 at character 2 (not valid Unicode)"]
    assert [m.content for s in log.sessions() for m in s.messages] == [
        "question 1", "answer 1", "question 3", "answer 3"]


def test_records_refuse_lone_surrogates():
    with pytest.raises(ValueError, match="lone surrogate"):
        Message(turn_id="t1", role="user", content="x\udcff")
    with pytest.raises(ValueError, match="lone surrogate"):
        Session(session_id="s\ud800", user_id="me",
                messages=[Message(turn_id="t1", role="user", content="x")])
    assert Message(turn_id="t1", role="user", content="\U0001f600").content == "\U0001f600"


def test_line_separators_survive_the_day_log(tmp_path):
    """U+2028, U+2029 and NEL are legal inside JSON strings and are written raw: a day-log
    line holding one must still read as one session."""
    log = DayLog(tmp_path)
    text = "one\u2028two\u2029three\x85four\x1efive"
    log.append([Session(session_id="s", user_id="me", started_at="2025-03-01T09:00:00Z",
                        messages=[Message(turn_id="t1", role="user", content=text)])])
    (s,) = log.sessions("me")
    assert s.messages[0].content == text
    log.save(s.model_copy(update={"source": "x"}))
    (s,) = log.sessions("me")
    assert s.source == "x" and s.messages[0].content == text


def test_line_separators_survive_the_diary_and_the_training_set(tmp_path):
    from reverie.memory.diary import Diary, DiaryStep, read_steps
    from reverie.training.dataset import TrainingSet

    text = "one\u2028two\u2029three\x85four"
    diary = Diary(tmp_path, "night-1")
    diary.record(DiaryStep(step_id="a", night_id="night-1", agent="dreamer",
                           prompt=[{"role": "user", "content": text}], raw_output=text))
    diary.record(DiaryStep(step_id="b", night_id="night-1", agent="verifier"))
    a, b = read_steps(diary.steps_file)
    assert a.raw_output == text and b.step_id == "b"
    TrainingSet([{"messages": [{"role": "user", "content": text}]}], [(text, [text])],
                []).save(tmp_path / "set.jsonl")
    loaded = TrainingSet.load(tmp_path / "set.jsonl")
    assert loaded.rows[0]["messages"][0]["content"] == text and loaded.new_items == [
        (text, [text])]


# -- the command line -----------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str):
    config = tmp_path / "config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    return CliRunner().invoke(app, ["--config", str(config), "ingest", "--user", "me", *args])


def test_cli_exit_codes(tmp_path):
    clean = tmp_path / "clean.jsonl"
    clean.write_text(_chat(1) + "\n" + _chat(2) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(_chat(3) + "\n" + '{"messages": [{"role": "user", "content": "\\udfff"}]}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 5}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * DEEP + "]" * DEEP)

    for args, code, says in [
            ([str(clean)], 0, None),
            ([str(clean)], 0, None),                          # all already there: not an error
            ([str(mixed)], 1, f"{mixed}:2: messages.0.content: lone surrogate \\udfff"),
            ([str(bad)], 2, f"{bad}:1: messages: "),
            ([str(tmp_path / "nope.jsonl")], 2, "nope.jsonl: cannot read"),
            ([str(tmp_path)], 2, "cannot read"),
            ([str(deep)], 2, f"{deep}:1: invalid JSON: nested more than"),
            ([str(clean), str(tmp_path / "nope.jsonl")], 1, "cannot read"),
            ([str(clean), "--format", "xml"], 2, "unknown format 'xml'")]:
        result = _cli(tmp_path, *args)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            (args, result.exception)
        if says:
            assert says in result.output, (args, result.output)
    assert len(DayLog(tmp_path / "data" / "days").sessions("me")) == 3


def test_cli_process_never_prints_a_traceback(tmp_path):
    """The real process, stdout strict UTF-8: a lone surrogate, a file whose name is not
    UTF-8, 10,000 nested lists and a UTF-16 file with a BOM."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text(_chat(1) + "\n" + '{"messages": [{"role": "user", "content": '
                         '"\\ud800"}]}\n')
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/odd\xff name.jsonl"))
    odd.write_text(_chat(2) + "\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"messages": ' + "[" * DEEP + "]" * DEEP + "}\n" + _chat(3) + "\n")
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes((_chat(4) + "\n").encode("utf-16"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIO"))}
    env.update(LC_ALL="C.UTF-8", PYTHONUTF8="0", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "reverie", "--config", str(config), "ingest",
                           "--user", "me", str(surrogate), odd, str(deep), str(utf16)],
                          capture_output=True, env=env, cwd=REPO, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err + out
    assert f"{surrogate}:2: messages.0.content: lone surrogate \\ud800" in err
    assert f"{deep}:1: invalid JSON: nested more than" in err
    assert "odd\\xff name.jsonl" in out
    assert "4 sessions imported" in out
    log = DayLog(tmp_path / "data" / "days")
    assert sorted(s.messages[0].content for s in log.sessions("me")) == [
        "question 1", "question 2", "question 3", "question 4"]
    assert {s.source for s in log.sessions("me")} >= {"openai:odd\\xff name.jsonl"}


# -- `reverie serve` ------------------------------------------------------------------------


def test_serve_answers_400_to_a_lone_surrogate(tmp_path):
    from fastapi.testclient import TestClient
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from reverie.config import Settings
    from reverie.runtime.models import Runtime
    from reverie.wake.serve import Server, create_app

    settings = Settings(data_dir=tmp_path / "data")
    settings.wake.rag = False
    runtime = Runtime(settings)
    try:
        server = Server(settings, runtime, chat_model=FakeListChatModel(responses=["ok"] * 4))
        http = TestClient(create_app(server))
        good = http.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hello"}]})
        assert good.status_code == 200, good.text
        for content in ('"bad \\ud800 text"', '[{"type": "text", "text": "\\udc80"}]'):
            body = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                    '"content": "yo"}, {"role": "user", "content": ' + content + '}]}')
            bad = http.post("/v1/chat/completions", content=body.encode(),
                            headers={"Content-Type": "application/json"})
            assert bad.status_code == 400, bad.text
            message = bad.json()["error"]["message"]
            assert message.startswith("messages.2.content") and "lone surrogate" in message
    finally:
        runtime.close()
    (s,) = DayLog(settings.paths.days).sessions()
    assert [m.content for m in s.messages] == ["hello", "ok"]


def test_chat_refuses_a_message_that_is_not_unicode(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}))
    result = CliRunner().invoke(app, ["--config", str(config), "chat", "-m", "hi \udcff"])
    assert result.exit_code == 2, result.output
    assert "--message: lone surrogate \\udcff at character 3" in result.output
    assert not (tmp_path / "data" / "days").exists()
