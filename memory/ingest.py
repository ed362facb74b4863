"""Import chat histories into the day log.

Formats (``detect_format`` tells them apart by content, not by file name):

- ``reverie``: our own day-log lines, one :class:`~reverie.memory.records.Session` per JSON line.
- ``openai``: JSON Lines, each ``{"messages": [{"role", "content", "timestamp"?}, ...],
  "id"?, "user"?, "started_at"?/"created_at"?/"created"?, "ended_at"?}`` (a single such
  object as a ``.json`` document also works). ``content`` may be a string or a list of
  ``{"type": "text", "text": ...}`` parts; role ``developer`` is read as ``system``; ``tool``
  and ``function`` turns (and assistant turns that only call tools) are left out.
- ``sharegpt``: a JSON array, or JSON Lines, of ``{"id"?, "conversations": [{"from":
  "human"|"gpt"|"system", "value": ...}]}`` (``human`` -> user, ``gpt`` -> assistant).
- ``locomo``: a LoCoMo conversation, ``{"speaker_a", "speaker_b", "session_N_date_time",
  "session_N": [{"speaker", "dia_id", "text", "blip_caption"?}]}`` (or that object under
  ``"conversation"``, or a list of such samples with ``sample_id``). speaker_a is the user,
  speaker_b the assistant.

Every session is imported for the ``user_id`` given (the owner in Reverie), whatever user a
record names. Errors name the file, the line (JSON Lines, 1-based) or record (JSON
documents: 1-based index in the array, or the LoCoMo session number) and the field as a
dotted path (``messages.2.role``, indices 0-based), and never stop the valid records around
them from being imported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from reverie.memory.daylog import DayLog, validate_user_id
from reverie.memory.records import Message, Session

Format = Literal["reverie", "openai", "sharegpt", "locomo"]
FORMATS: tuple[str, ...] = ("reverie", "openai", "sharegpt", "locomo")


def sample_day_path() -> Path:
    """The sample day shipped with Reverie (``reverie/samples/sample_day.jsonl``, our own
    Session format, user ``me``)."""
    return Path(str(resources.files("reverie") / "samples" / "sample_day.jsonl"))


# -- errors and reports -----------------------------------------------------------------


class IngestError(Exception):
    """One problem with an input file, raisable and collectable.

    Attributes:
        file: the file as given (str).
        line: 1-based line number for JSON Lines; for a JSON document, the 1-based index
            of the record (``unit == "record"``; for LoCoMo, the session number); ``None``
            for a problem with the whole file.
        field: dotted path inside the record (``messages.2.role``; list indices 0-based),
            ``""`` for the whole record.
        message: what is wrong.
        unit: ``"line"`` or ``"record"``.

    ``str()`` gives ``chat.jsonl:3: messages.2.role: 'robot' is not one of user, assistant,
    system`` (``conv.json:record 2: ...`` for a JSON document, ``x.txt: ...`` for a file).
    """

    def __init__(self, file: str | Path, line: Optional[int], field: str, message: str,
                 unit: Literal["line", "record"] = "line"):
        self.file, self.line, self.field = str(file), line, field
        self.message, self.unit = message, unit
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" if self.unit == "line" else f":record {self.line}"
        return ": ".join(p for p in (where, self.field, self.message) if p)

    def __repr__(self) -> str:
        return (f"IngestError(file={self.file!r}, line={self.line!r}, field={self.field!r}, "
                f"message={self.message!r}, unit={self.unit!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IngestError) and repr(self) == repr(other)

    __hash__ = Exception.__hash__


@dataclass
class FileReport:
    """What happened to one input file."""

    file: str
    format: Optional[str] = None
    read: int = 0
    imported: int = 0
    skipped_duplicates: int = 0
    skipped_consumed: int = 0
    requeued: int = 0
    errors: list[IngestError] = field(default_factory=list)


@dataclass
class IngestReport:
    """The outcome of :func:`ingest`: counts over all files, and each file's report.

    ``imported``: sessions written to the day log; ``skipped_duplicates``: already in the
    log; ``skipped_consumed``: already consumed by a night (not ``force``); ``requeued``:
    consumed sessions made unconsumed again by ``force``; ``errors``: every IngestError.
    """

    files: list[FileReport] = field(default_factory=list)
    imported_sessions: list[Session] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return sum(f.imported for f in self.files)

    @property
    def skipped_duplicates(self) -> int:
        return sum(f.skipped_duplicates for f in self.files)

    @property
    def skipped_consumed(self) -> int:
        return sum(f.skipped_consumed for f in self.files)

    @property
    def requeued(self) -> int:
        return sum(f.requeued for f in self.files)

    @property
    def errors(self) -> list[IngestError]:
        return [e for f in self.files for e in f.errors]

    @property
    def ok(self) -> bool:
        return not self.errors


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _message(err: dict) -> str:
    """A short message for one pydantic error."""
    kind, ctx = err["type"], err.get("ctx") or {}
    value = err.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"{shown} is not one of {expected}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {shown}"
    return err["msg"]


def _errors_from(exc: ValidationError, file: str, line: int, unit: str,
                 prefix: tuple = ()) -> list[IngestError]:
    return [IngestError(file, line, _loc(prefix + tuple(e["loc"])), _message(e), unit)
            for e in exc.errors()]


# -- input schemas ----------------------------------------------------------------------

_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
                 "developer": "system"}
_SKIPPED_ROLES = {"tool", "function"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "system": "system"}


def _text(content: Any) -> Any:
    """OpenAI content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                parts.append("[image]")
            else:
                return content  # left for the str validator to reject
        return "\n".join(parts)
    return content


class _OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[str] = None
    timestamp: Optional[datetime] = None
    tool_calls: Optional[list] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _text(v)

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in _OPENAI_ROLES and v not in _SKIPPED_ROLES:
            raise ValueError(f"{v!r} is not one of user, assistant, system")
        return v


def _first(d: dict, *keys: str) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), None)


class _OpenAIRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Optional[Union[str, int]] = None
    user: Optional[Union[str, int]] = None
    started_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    messages: list[_OpenAIMessage] = Field(min_length=1)

    @classmethod
    def parse(cls, obj: dict) -> "_OpenAIRecord":
        obj = dict(obj)
        for m in obj.get("messages") or []:
            if isinstance(m, dict) and "timestamp" not in m:
                ts = _first(m, "created_at", "created", "time")
                if ts is not None:
                    m["timestamp"] = ts
        if "started_at" not in obj:
            obj["started_at"] = _first(obj, "created_at", "created", "timestamp", "start_time")
        if "ended_at" not in obj:
            obj["ended_at"] = _first(obj, "updated_at", "end_time")
        return cls.model_validate(obj)


class _ShareGPTTurn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    from_: str = Field(alias="from")
    value: str

    @field_validator("from_")
    @classmethod
    def _from(cls, v: str) -> str:
        if v not in _SHAREGPT_ROLES:
            raise ValueError(f"{v!r} is not one of human, gpt, system")
        return v


class _ShareGPTRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Optional[Union[str, int]] = None
    conversations: list[_ShareGPTTurn] = Field(min_length=1)


class _LocomoTurn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    speaker: str
    dia_id: str
    text: str
    blip_caption: Optional[str] = None


# -- format detection -------------------------------------------------------------------


def _load_json(path: Path) -> tuple[Any, Optional[str]]:
    """(parsed document, None), or (None, error text) when the file is not one JSON value."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} (line {exc.lineno}, column {exc.colno})"


def _is_locomo(obj: Any) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("conversation"), dict):
        obj = obj["conversation"]
    return (isinstance(obj, dict) and "speaker_a" in obj and "speaker_b" in obj
            and any(re.fullmatch(r"session_\d+", k) for k in obj))


def _kind_of(obj: Any) -> Optional[Format]:
    if not isinstance(obj, dict):
        return None
    if "session_id" in obj and "messages" in obj:
        return "reverie"
    if "conversations" in obj:
        return "sharegpt"
    if "messages" in obj:
        return "openai"
    return None


def detect_format(path: str | Path) -> Format:
    """Tell a file's format from its content: ``"reverie"``, ``"openai"``, ``"sharegpt"`` or
    ``"locomo"`` (see the module docstring for each shape).

    Raises:
        IngestError: the file cannot be read or matches none of the formats (the message
            says what each format looks like).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(path, None, "", f"cannot read: {exc}") from exc
    doc, _ = _load_json(path) if text.strip() else (None, "empty")
    if doc is not None:
        if _is_locomo(doc) or (isinstance(doc, list) and doc and all(_is_locomo(x) for x in doc)):
            return "locomo"
        if isinstance(doc, list):
            kinds = {_kind_of(x) for x in doc if isinstance(x, dict)}
            if kinds and kinds <= {"sharegpt"}:
                return "sharegpt"
        kind = _kind_of(doc)
        if kind:
            return kind
    else:
        for line in text.splitlines()[:50]:
            try:
                kind = _kind_of(json.loads(line))
            except json.JSONDecodeError:
                continue
            if kind:
                return kind
    raise IngestError(path, None, "", "unknown format: expected Reverie session JSONL "
                      "(session_id, messages), OpenAI JSONL (messages: role, content), "
                      "ShareGPT (conversations: from, value) or a LoCoMo conversation "
                      "(speaker_a, speaker_b, session_N)")


# -- readers ----------------------------------------------------------------------------


def _records(path: Path) -> tuple[list[tuple[int, Any]], str, list[IngestError]]:
    """The records of a JSON Lines file or a JSON array/object: ([(number, obj)], unit,
    errors for lines that are not JSON objects)."""
    text = path.read_text(encoding="utf-8")
    doc, _ = _load_json(path)
    if isinstance(doc, list):
        return list(enumerate(doc, 1)), "record", []
    if isinstance(doc, dict) and not text.strip().count("\n"):
        return [(1, doc)], "line", []
    if isinstance(doc, dict):
        return [(1, doc)], "record", []
    out, errors = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(IngestError(path, number, "", f"invalid JSON: {exc.msg} "
                                      f"(column {exc.colno})"))
            continue
        out.append((number, obj))
    return out, "line", errors


def _with_hash_id(session: Session, fmt: str) -> Session:
    return session.model_copy(update={"session_id": f"{fmt}-{session.content_hash[:12]}"})


def _span(messages: list[Message]) -> tuple[Optional[datetime], Optional[datetime]]:
    stamps = [m.timestamp for m in messages if m.timestamp is not None]
    return (stamps[0], stamps[-1]) if stamps else (None, None)


def _read_reverie(path, file, user_id, records, unit):
    sessions, errors = [], []
    for number, obj in records:
        try:
            s = Session.model_validate(obj)
        except ValidationError as exc:
            errors.extend(_errors_from(exc, file, number, unit))
            continue
        sessions.append(s.model_copy(update={"user_id": user_id,
                                             "source": s.source or f"reverie:{path.name}"}))
    return sessions, errors


def _validated(records, parse, file, unit, errors):
    """``(number, parsed)`` for each JSON object that ``parse`` accepts; every other record
    adds its errors to ``errors`` and is skipped."""
    for number, obj in records:
        if not isinstance(obj, dict):
            errors.append(IngestError(file, number, "", "expected a JSON object", unit))
            continue
        try:
            parsed = parse(obj)
        except ValidationError as exc:
            errors.extend(_errors_from(exc, file, number, unit))
            continue
        yield number, parsed


def _read_openai(path, file, user_id, records, unit):
    sessions, errors = [], []
    for number, rec in _validated(records, _OpenAIRecord.parse, file, unit, errors):
        messages, bad = [], False
        for i, m in enumerate(rec.messages):
            if m.role in _SKIPPED_ROLES or (m.content is None and m.tool_calls):
                continue
            if m.content is None:
                errors.append(IngestError(file, number, f"messages.{i}.content",
                                          "required field is missing", unit))
                bad = True
                continue
            messages.append(Message(turn_id=f"t{len(messages) + 1}", role=_OPENAI_ROLES[m.role],
                                    content=m.content, timestamp=m.timestamp))
        if bad:
            continue
        if not messages:
            errors.append(IngestError(file, number, "messages", "no user, assistant or "
                                      "system turn with text", unit))
            continue
        first, last = _span(messages)
        s = Session(session_id=str(rec.id) if rec.id is not None else "pending",
                    user_id=user_id, started_at=rec.started_at or first,
                    ended_at=rec.ended_at or last, source=f"openai:{path.name}",
                    messages=messages)
        sessions.append(s if rec.id is not None else _with_hash_id(s, "openai"))
    return sessions, errors


def _read_sharegpt(path, file, user_id, records, unit):
    sessions, errors = [], []
    for _, rec in _validated(records, _ShareGPTRecord.model_validate, file, unit, errors):
        messages = [Message(turn_id=f"t{i}", role=_SHAREGPT_ROLES[t.from_], content=t.value)
                    for i, t in enumerate(rec.conversations, 1)]
        s = Session(session_id=str(rec.id) if rec.id is not None else "pending",
                    user_id=user_id, source=f"sharegpt:{path.name}", messages=messages)
        sessions.append(s if rec.id is not None else _with_hash_id(s, "sharegpt"))
    return sessions, errors


_MONTHS = {m: i for i, m in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september",
     "october", "november", "december"], 1)}
_MONTH_ABBR = {m[:3]: i for m, i in _MONTHS.items()}
_LOCOMO_DATE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*([ap])\.?m\.?\s+on\s+(\d{1,2})\s+"
                          r"([A-Za-z]+),?\s+(\d{4})\s*", re.IGNORECASE)


def parse_locomo_datetime(text: str) -> datetime:
    """``"4:04 pm on 20 January, 2023"`` -> ``2023-01-20 16:04`` (UTC: LoCoMo gives no time
    zone, so the wall-clock time is kept as UTC). Raises ``ValueError`` if it does not parse."""
    m = _LOCOMO_DATE.fullmatch(text) if isinstance(text, str) else None
    name = m.group(5).lower() if m else ""
    month = _MONTHS.get(name) or (_MONTH_ABBR.get(name[:3]) if len(name) >= 3 else None)
    if not m or month is None:
        raise ValueError(f"{text!r} is not a date like '4:04 pm on 20 January, 2023'")
    hour, minute = int(m.group(1)) % 12, int(m.group(2))
    if m.group(3).lower() == "p":
        hour += 12
    return datetime(int(m.group(6)), month, int(m.group(4)), hour, minute, tzinfo=timezone.utc)


def _read_locomo(path, file, user_id, doc, selected: Optional[set[int]]):
    sessions, errors = [], []
    samples = doc if isinstance(doc, list) else [doc]
    for k, sample in enumerate(samples):
        conv = sample["conversation"] if isinstance(sample.get("conversation"), dict) else sample
        name = str(sample.get("sample_id") or (path.stem if len(samples) == 1 else
                                                f"{path.stem}-{k + 1}"))
        a, b = conv.get("speaker_a"), conv.get("speaker_b")
        numbers = sorted(int(key.split("_")[1]) for key in conv
                         if re.fullmatch(r"session_\d+", key))
        if selected:
            for n in sorted(selected - set(numbers)):
                have = f"{numbers[0]}-{numbers[-1]}" if numbers else "none"
                errors.append(IngestError(file, n, "", f"no session {n} in this conversation "
                                          f"(sessions: {have})", "record"))
        for n in numbers:
            if selected and n not in selected:
                continue
            key = f"session_{n}"
            turns = conv[key]
            if not isinstance(turns, list):
                errors.append(IngestError(file, n, key, "expected a list of turns", "record"))
                continue
            if not turns:
                if selected:
                    errors.append(IngestError(file, n, key, "the session has no turns", "record"))
                continue
            try:
                started = parse_locomo_datetime(conv.get(f"{key}_date_time"))
            except (ValueError, TypeError) as exc:
                errors.append(IngestError(file, n, f"{key}_date_time", str(exc), "record"))
                continue
            messages, bad = [], False
            for i, raw in enumerate(turns):
                try:
                    t = _LocomoTurn.model_validate(raw)
                except ValidationError as exc:
                    errors.extend(_errors_from(exc, file, n, "record", (key, i)))
                    bad = True
                    continue
                if t.speaker == a:
                    role = "user"
                elif t.speaker == b:
                    role = "assistant"
                else:
                    errors.append(IngestError(file, n, f"{key}.{i}.speaker", f"{t.speaker!r} is "
                                              f"neither speaker_a ({a!r}) nor speaker_b ({b!r})",
                                              "record"))
                    bad = True
                    continue
                text = t.text
                if t.blip_caption:
                    text = f"{text} [image: {t.blip_caption}]".strip()
                messages.append(Message(turn_id=t.dia_id, role=role, content=text))
            if bad:
                continue
            sessions.append(Session(session_id=f"locomo-{name}-s{n}", user_id=user_id,
                                    started_at=started, source=f"locomo:{path.name}",
                                    messages=messages))
    return sessions, errors


def read_sessions(path: str | Path, user_id: str, fmt: Optional[str] = None,
                  sessions: Optional[set[int]] = None) -> tuple[list[Session], list[IngestError]]:
    """Read one file into sessions for ``user_id``.

    Args:
        path: the file.
        user_id: the Reverie user the sessions belong to (must be safe as a folder name).
        fmt: one of ``FORMATS``, or ``None`` to detect it.
        sessions: LoCoMo session numbers to keep (1-based); only for LoCoMo files.

    Returns:
        (valid sessions in file order, errors). A bad record gives errors naming file,
        line/record and field; the records around it are still returned. A file that cannot
        be read, or whose format is unknown, gives one error and no session.

    Raises:
        ValueError: ``user_id`` is not safe or ``fmt`` is not a known format.
    """
    validate_user_id(user_id)
    path = Path(path)
    file = str(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        fmt = fmt or detect_format(path)
        if sessions and fmt != "locomo":
            return [], [IngestError(file, None, "", f"session numbers select LoCoMo sessions; "
                                    f"this file is {fmt}")]
        if fmt == "locomo":
            doc, problem = _load_json(path)
            if doc is None or not (_is_locomo(doc) or (isinstance(doc, list) and doc
                                                        and all(_is_locomo(x) for x in doc))):
                return [], [IngestError(file, None, "", problem and f"invalid JSON: {problem}"
                                        or "not a LoCoMo conversation (speaker_a, speaker_b, "
                                        "session_N)")]
            return _read_locomo(path, file, user_id, doc, set(sessions) if sessions else None)
        records, unit, errors = _records(path)
    except IngestError as exc:
        return [], [exc]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [IngestError(file, None, "", f"cannot read: {exc}")]
    reader = {"reverie": _read_reverie, "openai": _read_openai, "sharegpt": _read_sharegpt}[fmt]
    found, more = reader(path, file, user_id, records, unit)
    errors = sorted(errors + more, key=lambda e: e.line or 0)
    return found, errors


def ingest(paths: list[str | Path], daylog: DayLog, user_id: str, fmt: Optional[str] = None,
           sessions: Optional[set[int]] = None, force: bool = False) -> IngestReport:
    """Import files into the day log, file by file.

    Each file's valid sessions are appended (atomically) even when other records of it are
    bad. A session already in the log is skipped (``skipped_duplicates``). A session
    already consumed by a night is skipped (``skipped_consumed``) unless ``force``: then its
    hash is removed from ``consumed.jsonl`` (``requeued``) so the next night processes it
    again, and it is written if it is not in the log.

    Raises:
        ValueError: ``user_id`` is not safe as a folder name or ``fmt`` is unknown.
    """
    validate_user_id(user_id)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    report = IngestReport()
    for path in paths:
        path = Path(path)
        fr = FileReport(file=str(path))
        report.files.append(fr)
        try:
            fr.format = fmt or detect_format(path)
        except IngestError as exc:
            fr.errors.append(exc)
            continue
        found, errors = read_sessions(path, user_id, fr.format, sessions)
        fr.errors.extend(errors)
        fr.read = len(found)
        consumed = daylog.consumed()
        fresh = []
        for s in found:
            if s.content_hash in consumed and not force:
                fr.skipped_consumed += 1
            else:
                fresh.append(s)
        try:
            written = daylog.append(fresh)
            if force:
                fr.requeued = daylog.unmark_consumed(
                    {s.content_hash for s in found if s.content_hash in consumed})
        except OSError as exc:
            fr.errors.append(IngestError(path, None, "", f"cannot write the day log: {exc}"))
            continue
        fr.imported = len(written)
        fr.skipped_duplicates = len(fresh) - len(written)
        report.imported_sessions.extend(written)
    return report
