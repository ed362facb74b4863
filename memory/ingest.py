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
them from being imported: in JSON Lines every line stands alone (a line that is not JSON,
not UTF-8 or nested too deeply is one error); in a JSON document a record that parses but is
wrong is rejected alone, while a syntax error rejects the document (the error names its
line and column). Files are UTF-8 (a byte-order mark is skipped) or UTF-16/32 with a
byte-order mark. Text must be valid Unicode (no lone surrogates such as the JSON escape
``"\\ud800"``) and a message at most :data:`MAX_MESSAGE_CHARS` characters long.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from reverie.memory.daylog import DayLog, validate_user_id
from reverie.memory.records import Message, Session, Text

Format = Literal["reverie", "openai", "sharegpt", "locomo"]
FORMATS: tuple[str, ...] = ("reverie", "openai", "sharegpt", "locomo")
# The longest message imported, in characters (about 25,000 tokens): longer than any chat
# turn, shorter than a pasted book. The night reads sessions in windows of turns, so one
# giant turn would become one giant prompt.
MAX_MESSAGE_CHARS = 100_000
# JSON nested deeper than this is reported with the line where it got this deep (Python's
# json parser gives up at about 1,000 levels, with a RecursionError).
MAX_NESTING = 500


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


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 60, 60, 4, 4


def shown(value: Any) -> str:
    """A value as errors quote it: its repr, cut short (a 5 MB string or 10,000 nested
    lists come out as a few dozen characters)."""
    try:
        text = _repr.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= 80 else text[:77] + "..."


def shown_path(path: str | Path) -> str:
    """A path as text that can always be printed: bytes of a name that are not UTF-8 come
    out as ``\\xff`` (as ``ls -b`` shows them) instead of lone surrogates."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _message(err: dict) -> str:
    """A short message for one pydantic error."""
    kind, ctx = err["type"], err.get("ctx") or {}
    value = err.get("input")
    shown_value = shown(value)
    if kind in ("string_too_long", "too_long") and isinstance(value, str):
        return (f"{len(value):,} characters, more than the {ctx.get('max_length', 0):,} a "
                "message may have")
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"{shown_value} is not one of {expected}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {shown_value}"
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


# A message's text: valid Unicode, at most MAX_MESSAGE_CHARS characters.
_MessageText = Annotated[Text, Field(max_length=MAX_MESSAGE_CHARS)]
# The time fields each format may use, in order of preference (the first one not null).
_MESSAGE_TIME = ("timestamp", "created_at", "created", "time")
_START_TIME = ("started_at", "created_at", "created", "timestamp", "start_time")
_END_TIME = ("ended_at", "updated_at", "end_time")


def _drop_nulls(obj: Any, keys: tuple[str, ...]) -> Any:
    """``obj`` without the time keys that are null, so the first one that is set is read
    (and an error names the key the file has)."""
    if isinstance(obj, dict) and any(k in obj and obj[k] is None for k in keys):
        return {k: v for k, v in obj.items() if not (k in keys and v is None)}
    return obj


class _OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[_MessageText] = None
    timestamp: Optional[datetime] = Field(None, validation_alias=AliasChoices(*_MESSAGE_TIME))
    tool_calls: Optional[list] = None

    @model_validator(mode="before")
    @classmethod
    def _times(cls, v: Any) -> Any:
        return _drop_nulls(v, _MESSAGE_TIME)

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _text(v)

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in _OPENAI_ROLES and v not in _SKIPPED_ROLES:
            raise ValueError(f"{shown(v)} is not one of user, assistant, system")
        return v


class _OpenAIRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Optional[Union[Text, int]] = None
    user: Optional[Union[str, int]] = None
    started_at: Optional[datetime] = Field(None, validation_alias=AliasChoices(*_START_TIME))
    ended_at: Optional[datetime] = Field(None, validation_alias=AliasChoices(*_END_TIME))
    messages: list[_OpenAIMessage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _times(cls, v: Any) -> Any:
        return _drop_nulls(_drop_nulls(v, _START_TIME), _END_TIME)


class _ShareGPTTurn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    from_: str = Field(alias="from")
    value: _MessageText

    @field_validator("from_")
    @classmethod
    def _from(cls, v: str) -> str:
        if v not in _SHAREGPT_ROLES:
            raise ValueError(f"{shown(v)} is not one of human, gpt, system")
        return v


class _ShareGPTRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Optional[Union[Text, int]] = None
    conversations: list[_ShareGPTTurn] = Field(min_length=1)


class _LocomoTurn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    speaker: str
    dia_id: Text
    text: _MessageText
    blip_caption: Optional[_MessageText] = None


# -- reading files ----------------------------------------------------------------------


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _read_text(path: Path) -> tuple[str, list[IngestError]]:
    """The file's text and an error for each line that is not UTF-8 (its bad bytes read as
    U+FFFD; a reader skips such a line, or rejects a JSON document that has one). UTF-8
    with or without a byte-order mark; UTF-16 and UTF-32 with one.

    Raises:
        OSError: the file cannot be read (missing, a directory, no permission).
        IngestError: UTF-16/32 that does not decode, or what looks like UTF-16 without a
            byte-order mark (NUL bytes every other byte).
    """
    data = path.read_bytes()
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), []
            except UnicodeDecodeError as exc:
                raise IngestError(shown_path(path), None, "", f"not valid {encoding.upper()} "
                                  f"(byte {exc.start}): save the file as UTF-8") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    head = data[:8192]
    half = len(head) // 2
    if half >= 2 and max(head[0::2].count(0), head[1::2].count(0)) > half // 2:
        raise IngestError(shown_path(path), None, "", "looks like UTF-16 without a byte-order "
                          "mark (NUL bytes every other byte): save the file as UTF-8")
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError:
        pass
    errors = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(IngestError(shown_path(path), number, "", f"not UTF-8: byte "
                                      f"0x{raw[exc.start]:02x} at column {exc.start + 1} "
                                      "(save the file as UTF-8)"))
    return data.decode("utf-8", "replace"), errors


def _whole(errors: list[IngestError]) -> list[IngestError]:
    """Errors that reject a JSON document whole, saying so."""
    for e in errors:
        e.message += "; nothing of this JSON document was imported"
    return errors


def _lines(text: str) -> list[str]:
    """JSON Lines: split at ``\\n`` (and ``\\r\\n``) only, numbered as ``wc -l`` and editors
    count. ``str.splitlines`` would also split at U+2028, U+2029 and NEL, which JSON allows
    raw inside strings. A file with ``\\r`` alone (classic Mac OS) is split there."""
    if "\n" not in text:
        return text.split("\r")
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


@dataclass
class _Problem:
    """Why a text is not one JSON value: the message and where (1-based line and column,
    0-based position)."""

    message: str
    line: int
    column: int = 1
    pos: int = 0


def _nesting_line(text: str) -> int:
    """The line where ``text`` gets nested more than MAX_NESTING levels deep (1 if never)."""
    depth, in_string, escaped, line = 0, False, False, 1
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        elif ch in "]}":
            depth -= 1
    return 1


_NOTHING = object()


def _parse_json(text: str) -> tuple[Any, Optional[_Problem]]:
    """(the value, None), or (``_NOTHING``, the problem) when ``text`` is not one JSON
    value: a syntax error, or nesting too deep for the parser."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return _NOTHING, _Problem(exc.msg, exc.lineno, exc.colno, exc.pos)
    except RecursionError:
        return _NOTHING, _Problem(f"nested more than {MAX_NESTING} levels deep",
                                  _nesting_line(text))


def _invalid(path: Path, problem: _Problem, line: Optional[int] = None) -> IngestError:
    what = problem.message
    if problem.column > 1:   # json's "Unterminated string starting at" wants its column
        what += f" column {problem.column}" if what.endswith(" at") else \
            f" (column {problem.column})"
    return IngestError(shown_path(path), problem.line if line is None else line, "",
                       f"invalid JSON: {what}")


def _is_broken_document(text: str, problem: _Problem) -> bool:
    """Whether ``text``, which does not parse, is a JSON array (rejected whole) rather than
    JSON Lines whose first line is an array ("Extra data" at the start of line 2)."""
    if not text.lstrip().startswith("["):
        return False
    return not (problem.message == "Extra data"
                and text[:problem.pos].rstrip(" \t").endswith(("\n", "\r")))


# -- format detection -------------------------------------------------------------------


def _is_locomo(obj: Any) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("conversation"), dict):
        obj = obj["conversation"]
    return (isinstance(obj, dict) and "speaker_a" in obj and "speaker_b" in obj
            and any(re.fullmatch(r"session_\d+", k) for k in obj))


def _is_locomo_document(doc: Any) -> bool:
    return _is_locomo(doc) or (isinstance(doc, list) and bool(doc)
                               and all(_is_locomo(x) for x in doc))


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


def _most_common(records: list) -> Optional[Format]:
    """The kind most of ``records`` have (the first seen of a tie), None if none has one."""
    votes = Counter(k for k in map(_kind_of, records) if k)
    return votes.most_common(1)[0][0] if votes else None


def detect_format(path: str | Path) -> Format:
    """Tell a file's format from its content: ``"reverie"``, ``"openai"``, ``"sharegpt"`` or
    ``"locomo"`` (see the module docstring for each shape). JSON Lines and arrays go by the
    kind most of their first 50 records have.

    Raises:
        IngestError: the file cannot be read, is empty, is a JSON document with a syntax
            error (the error names its line), or matches none of the formats (the message
            says what each format looks like).
    """
    path = Path(path)
    try:
        text, _ = _read_text(path)
    except OSError as exc:
        raise IngestError(shown_path(path), None, "", f"cannot read: {exc.strerror or exc}") \
            from None
    if not text.strip():
        raise IngestError(shown_path(path), None, "", "empty file: nothing to import")
    doc, problem = _parse_json(text)
    if problem is None:
        if _is_locomo_document(doc):
            return "locomo"
        kind = _kind_of(doc) or _most_common(doc[:50] if isinstance(doc, list) else [])
        if kind:
            return kind
    else:
        records = []
        for line in [ln for ln in _lines(text) if ln.strip()][:50]:
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError):
                continue
        kind = _most_common(records)
        if kind:
            return kind
        if text.lstrip().startswith(("[", "{")):
            raise _whole([_invalid(path, problem)])[0]
    raise IngestError(shown_path(path), None, "", "unknown format: expected Reverie session "
                      "JSONL (session_id, messages), OpenAI JSONL (messages: role, content), "
                      "ShareGPT (conversations: from, value) or a LoCoMo conversation "
                      "(speaker_a, speaker_b, session_N)")


# -- readers ----------------------------------------------------------------------------


def _records(path: Path) -> tuple[list[tuple[int, Any]], str, list[IngestError]]:
    """The records of a JSON Lines file or a JSON array/object: ([(number, obj)], unit,
    errors for lines that are not UTF-8 or not JSON, or for a JSON array that does not
    parse: then no record)."""
    text, errors = _read_text(path)
    if not text.strip():
        return [], "line", errors or [IngestError(shown_path(path), None, "",
                                                  "empty file: nothing to import")]
    doc, problem = _parse_json(text)
    if problem is None and isinstance(doc, (list, dict)) and errors:
        return [], "line", _whole(errors)   # a document's bad bytes may sit inside any record
    if problem is None and isinstance(doc, list):
        if not doc:
            errors.append(IngestError(shown_path(path), None, "", "an empty JSON array: "
                                      "nothing to import"))
        return list(enumerate(doc, 1)), "record", errors
    if problem is None and isinstance(doc, dict):
        return [(1, doc)], "line" if not text.strip().count("\n") else "record", errors
    if problem is not None and _is_broken_document(text, problem):
        return [], "line", _whole(errors or [_invalid(path, problem)])
    out, undecodable = [], {e.line for e in errors}
    for number, line in enumerate(_lines(text), 1):
        if not line.strip() or number in undecodable:
            continue
        obj, problem = _parse_json(line)
        if problem is not None:
            errors.append(_invalid(path, problem, line=number))
            continue
        out.append((number, obj))
    return out, "line", errors


def _with_hash_id(session: Session, fmt: str) -> Session:
    return session.model_copy(update={"session_id": f"{fmt}-{session.content_hash[:12]}"})


def _span(messages: list[Message]) -> tuple[Optional[datetime], Optional[datetime]]:
    stamps = [m.timestamp for m in messages if m.timestamp is not None]
    return (stamps[0], stamps[-1]) if stamps else (None, None)


def _session(errors: list[IngestError], where: tuple, field: str = "",
             **fields: Any) -> Optional[Session]:
    """``Session(**fields)``, or None with an error at ``where`` (file, number, unit) when
    a value the file gave (an id) is not valid; ``field`` names it in the file's terms."""
    try:
        return Session(**fields)
    except ValidationError as exc:
        file, number, unit = where
        errors.extend(IngestError(file, number, field or _loc(e["loc"]), _message(e), unit)
                      for e in exc.errors())
        return None


def _read_reverie(path, file, user_id, records, unit):
    sessions, errors = [], []
    for number, obj in records:
        try:
            s = Session.model_validate(obj)
        except ValidationError as exc:
            errors.extend(_errors_from(exc, file, number, unit))
            continue
        long = [i for i, m in enumerate(s.messages) if len(m.content) > MAX_MESSAGE_CHARS]
        if long:
            errors.extend(IngestError(file, number, f"messages.{i}.content",
                                      f"{len(s.messages[i].content):,} characters, more than "
                                      f"the {MAX_MESSAGE_CHARS:,} a message may have", unit)
                          for i in long)
            continue
        sessions.append(s.model_copy(update={
            "user_id": user_id, "source": s.source or f"reverie:{shown_path(path.name)}"}))
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
    for number, rec in _validated(records, _OpenAIRecord.model_validate, file, unit, errors):
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
        s = _session(errors, (file, number, unit), "id" if rec.id is not None else "",
                     session_id=str(rec.id) if rec.id is not None else "pending",
                     user_id=user_id, started_at=rec.started_at or first,
                     ended_at=rec.ended_at or last, source=f"openai:{shown_path(path.name)}",
                     messages=messages)
        if s is not None:
            sessions.append(s if rec.id is not None else _with_hash_id(s, "openai"))
    return sessions, errors


def _read_sharegpt(path, file, user_id, records, unit):
    sessions, errors = [], []
    for number, rec in _validated(records, _ShareGPTRecord.model_validate, file, unit, errors):
        messages = [Message(turn_id=f"t{i}", role=_SHAREGPT_ROLES[t.from_], content=t.value)
                    for i, t in enumerate(rec.conversations, 1)]
        s = _session(errors, (file, number, unit), "id" if rec.id is not None else "",
                     session_id=str(rec.id) if rec.id is not None else "pending",
                     user_id=user_id, source=f"sharegpt:{shown_path(path.name)}",
                     messages=messages)
        if s is not None:
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
        raise ValueError(f"{shown(text)} is not a date like '4:04 pm on 20 January, 2023'")
    hour, minute = int(m.group(1)) % 12, int(m.group(2))
    if m.group(3).lower() == "p":
        hour += 12
    return datetime(int(m.group(6)), month, int(m.group(4)), hour, minute, tzinfo=timezone.utc)


def _read_locomo(path, file, user_id, doc, selected: Optional[set[int]]):
    sessions, errors = [], []
    samples = doc if isinstance(doc, list) else [doc]
    stem = shown_path(path.stem)
    for k, sample in enumerate(samples):
        conv = sample["conversation"] if isinstance(sample.get("conversation"), dict) else sample
        name = str(sample.get("sample_id") or (stem if len(samples) == 1 else f"{stem}-{k + 1}"))
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
                    errors.append(IngestError(file, n, f"{key}.{i}.speaker", f"{shown(t.speaker)} "
                                              f"is neither speaker_a ({shown(a)}) nor speaker_b "
                                              f"({shown(b)})", "record"))
                    bad = True
                    continue
                text = t.text
                if t.blip_caption:
                    text = f"{text} [image: {t.blip_caption}]".strip()
                messages.append(Message(turn_id=t.dia_id, role=role, content=text))
            if bad:
                continue
            s = _session(errors, (file, n, "record"), "sample_id",
                         session_id=f"locomo-{name}-s{n}", user_id=user_id, started_at=started,
                         source=f"locomo:{shown_path(path.name)}", messages=messages)
            if s is not None:
                sessions.append(s)
    return sessions, errors


def _read_locomo_file(path: Path, file: str, user_id: str, selected: Optional[set[int]]):
    text, errors = _read_text(path)
    if errors:      # a document's bad bytes may sit inside any session
        return [], _whole(errors)
    if not text.strip():
        return [], [IngestError(file, None, "", "empty file: nothing to import")]
    doc, problem = _parse_json(text)
    if problem is not None:
        return [], _whole([_invalid(path, problem)])
    if not _is_locomo_document(doc):
        return [], [IngestError(file, None, "", "not a LoCoMo conversation (speaker_a, "
                                "speaker_b, session_N)")]
    return _read_locomo(path, file, user_id, doc, selected)


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
        be read, is empty, or whose format is unknown gives one error and no session, and
        so does a JSON document (array, LoCoMo) with a syntax error (the error names the
        line). Bad input never raises.

    Raises:
        ValueError: ``user_id`` is not safe or ``fmt`` is not a known format.
    """
    validate_user_id(user_id)
    path = Path(path)
    file = shown_path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        fmt = fmt or detect_format(path)
        if sessions and fmt != "locomo":
            return [], [IngestError(file, None, "", f"session numbers select LoCoMo sessions; "
                                    f"this file is {fmt}")]
        if fmt == "locomo":
            return _read_locomo_file(path, file, user_id, set(sessions) if sessions else None)
        records, unit, errors = _records(path)
    except IngestError as exc:
        return [], [exc]
    except OSError as exc:
        return [], [IngestError(file, None, "", f"cannot read: {exc.strerror or exc}")]
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

    Whatever a file holds, its problems come back as :class:`IngestError` s in the report
    (one that should never happen, a bug, as ``unexpected <exception>``), so the other files
    are still imported.

    Raises:
        ValueError: ``user_id`` is not safe as a folder name or ``fmt`` is unknown.
    """
    validate_user_id(user_id)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    report = IngestReport()
    for path in paths:
        path = Path(path)
        fr = FileReport(file=shown_path(path))
        report.files.append(fr)
        try:
            fr.format = fmt or detect_format(path)
            found, errors = read_sessions(path, user_id, fr.format, sessions)
        except IngestError as exc:
            fr.errors.append(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the other files
            fr.errors.append(IngestError(fr.file, None, "", f"unexpected {type(exc).__name__}: "
                                         f"{shown(str(exc))} (a bug in Reverie: please "
                                         "report it)"))
            continue
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
            fr.errors.append(IngestError(fr.file, None, "", f"cannot write the day log: {exc}"))
            continue
        fr.imported = len(written)
        fr.skipped_duplicates = len(fresh) - len(written)
        report.imported_sessions.extend(written)
    return report
