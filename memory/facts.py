"""Verbatim material and memory embeddings in ChromaDB.

* :func:`is_verbatim` says why a conversation turn should be kept word for word (code, URLs,
  JSON, long pastes, numbers-heavy text) rather than only summarised into memories;
  :func:`chunk_verbatim` cuts such a turn into retrieval-sized chunks (code blocks kept
  whole when they fit, URLs never cut); :func:`fact_chunks` does both for one message.
* :class:`FactStore` is the night's *route* target: chunks with their user, session, turn and
  time, in the ``facts`` collection. Chunk ids are deterministic
  (``user:session:turn:index``), so adding a chunk again is a no-op.
* :class:`MemoryIndex` holds one embedding per memory (of :meth:`Memory.statement`) in the
  ``memories`` collection, for the novelty and contradiction checks of *consolidate*.

Both use the Chroma client that :func:`open_client` opens for the settings: the embedded,
persistent one (``Paths.chroma``) or, when ``memory.chroma_url`` is set, a Chroma server
(:class:`ChromaUnavailable` when it cannot be reached). Reverie computes the embeddings
either way, with the embedding function passed in (normally
:class:`reverie.runtime.embeddings.MiniLMEmbeddingFunction`); collections use the cosine
space. Chroma's default embedding function downloads a model, so an embedding
function is required. Every record carries ``user_id`` metadata and every query filters on
it: a query for one user never returns another user's data.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from reverie.memory.records import Memory, Message

if TYPE_CHECKING:  # pragma: no cover
    from chromadb.api import ClientAPI

    from reverie.config import MemoryConfig, Settings
    from reverie.memory.store import MemoryStore

_COSINE = {"hnsw": {"space": "cosine"}}
_BATCH = 1000  # ids per Chroma call (well under its max batch size, 5461 in chromadb 1.5)

# --------------------------------------------------------------------------------------
# Detecting and chunking verbatim material
# --------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(```+|~~~+)(.*)$", re.M)
_URL = re.compile(r"(?:https?|ftp)://[^\s<>\"']+|www\.[^\s<>\"']+\.[^\s<>\"']+", re.I)
_CODE_LINE = re.compile("|".join([
    r"^\s*(?:async\s+)?(?:def|fn|func|function)\s+\w+\s*\(",  # definitions
    r"^\s*class\s+\w+\s*(?:[(:{]|$)",
    r"^\s*(?:import\s+[\w.]+(?:\s+as\s+\w+)?\s*;?\s*$|from\s+[\w.]+\s+import\s)",
    r"^\s*(?:const|let|var)\s+\w+\s*=",
    r"^\s*#\s*(?:include|define)\b",
    r"^\s*(?:if|for|while|switch|catch)\s*\(",
    r"^\s*(?:\$|>>>)\s+\S",                                    # shell prompt, REPL
    r"^\s*(?:SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE\s+TABLE)\b",
    r"[;{]\s*$",                                                # C-family statement/block
    r"^\s*[}\])]+[;,)]*\s*$",                                   # closing brackets
    r"^\s*[A-Za-z_][\w.\[\]'\"]*\s*(?:[-+*/]?=|:=)\s*\S",        # x = 1, a.b += c
    r"\w\([^()]*\)\s*[;:{]?\s*$",                                # ends with a call
    r"^(?:\t| {4,})\S.*[(){}\[\]=;:]",                           # indented, with code syntax
]), re.M)
"""A line that looks like code. Prose rarely has three such lines; see ``code_lines``."""


def _code_blocks(text: str) -> list[tuple[int, int]]:
    """Spans (start, end) of fenced code blocks; an unclosed fence runs to the end."""
    spans, pos = [], 0
    while True:
        m = _FENCE.search(text, pos)
        if m is None:
            return spans
        fence = m.group(1)
        close = re.compile(rf"^[ \t]*{re.escape(fence[0]) * len(fence)}{re.escape(fence[0])}*"
                           rf"[ \t]*$", re.M)
        c = close.search(text, m.end())
        end = c.end() if c else len(text)
        spans.append((m.start(), end))
        pos = end


def is_verbatim(text: str, *, long_chars: int = 1000, numbers_share: float = 0.3,
                min_number_tokens: int = 4, json_min_chars: int = 30,
                code_lines: int = 3) -> list[str]:
    """Why a turn counts as verbatim material (worth storing word for word), if it does.

    Args:
        text: the turn's content.
        long_chars: a turn longer than this is a paste ("long"). Chat turns are mostly a
            few hundred characters; one over ~1000 is pasted material (a letter, logs, an
            article) whose details a summary would lose, and it does not fit in one
            800-character chunk.
        numbers_share: "numbers" when at least this share of the whitespace-separated
            tokens contain a digit. 0.3 catches flight details, measurements, tables and
            account numbers ("BA 2490 on 12 May at 14:35, seat 23C") but not chat that
            mentions a number or two ("I have 2 kids and 3 cats": 2 of 7).
        min_number_tokens: and at least this many digit tokens, so a short reply such as
            "at 5" or "2 please" is not numbers-heavy.
        json_min_chars: "json" when a JSON object or array at least this long (re-serialised)
            parses from the text, so bracketed asides or ``[]`` / ``{"a": 1}`` do not count.
        code_lines: "code" without a fence when at least this many lines look like code
            (statements, assignments, braces, keywords, shell prompts); one or two such lines
            occur in ordinary prose.

    Returns:
        A subset of ``["code", "url", "json", "long", "numbers"]`` in that order; empty
        when the turn is plain chat.
    """
    reasons = []
    if _code_blocks(text) or \
            sum(1 for line in text.splitlines() if _CODE_LINE.search(line)) >= code_lines:
        reasons.append("code")
    if _URL.search(text):
        reasons.append("url")
    if _has_json(text, json_min_chars):
        reasons.append("json")
    if len(text) > long_chars:
        reasons.append("long")
    tokens = text.split()
    digits = sum(1 for t in tokens if any(ch.isdigit() for ch in t))
    if tokens and digits >= min_number_tokens and digits / len(tokens) >= numbers_share:
        reasons.append("numbers")
    return reasons


def _has_json(text: str, min_chars: int, max_starts: int = 50) -> bool:
    """A JSON object/array of at least ``min_chars`` (re-serialised) parses from the text,
    starting at one of the first ``max_starts`` ``{`` / ``[``."""
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch in "{["][:max_starts]
    for i in starts:
        try:
            value, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(value, (dict, list)) and value and \
                len(json.dumps(value, ensure_ascii=False)) >= min_chars:
            return True
    return False


def _hard_split(token: str, max_chars: int) -> list[str]:
    """A token longer than ``max_chars``: a URL stays whole (one oversize piece), anything
    else is cut every ``max_chars`` characters."""
    if _URL.search(token):
        return [token]
    return [token[i:i + max_chars] for i in range(0, len(token), max_chars)]


def _split_prose(text: str, max_chars: int, seps: tuple[str, ...] = ("\n\n", "\n", " ")
                 ) -> list[str]:
    """Recursively split at the coarsest separator that works, merging neighbours greedily
    up to ``max_chars``. Splitting only at whitespace means a URL is never cut."""
    text = text.strip()
    if not text:
        return []
    if len(text) <= max_chars:
        return [text]
    if not seps:
        return _hard_split(text, max_chars)
    sep, rest = seps[0], seps[1:]
    pieces: list[str] = []
    for part in text.split(sep):
        if not part.strip():
            continue
        pieces.extend([part.strip()] if len(part.strip()) <= max_chars
                      else _split_prose(part, max_chars, rest))
    return _merge(pieces, sep, max_chars)


def _merge(pieces: list[str], sep: str, max_chars: int) -> list[str]:
    out: list[str] = []
    for p in pieces:
        if out and len(out[-1]) + len(sep) + len(p) <= max_chars:
            out[-1] = out[-1] + sep + p
        else:
            out.append(p)
    return out


def _split_code(block: str, max_chars: int) -> list[str]:
    """An oversize fenced block cut between lines; each piece is re-fenced (same opening
    line, so the language tag is kept) and so is itself a valid block."""
    lines = block.strip("\n").split("\n")
    opening = lines[0].strip()
    fence = re.match(r"(`+|~+)", opening).group(1)
    body = lines[1:]
    if body and re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", body[-1]):
        body = body[:-1]
    room = max(1, max_chars - len(opening) - len(fence) - 2)  # two newlines
    pieces: list[str] = []
    for line in body:
        parts = [line] if len(line) <= room else _split_prose(line, room, (" ",)) or [""]
        for part in parts:
            if pieces and len(pieces[-1]) + 1 + len(part) <= room:
                pieces[-1] += "\n" + part
            else:
                pieces.append(part)
    return [f"{opening}\n{p}\n{fence}" for p in pieces] or [block.strip()]


def chunk_verbatim(text: str, max_chars: int = 800) -> list[str]:
    """Split text into chunks of at most ``max_chars`` characters for the fact store.

    Fenced code blocks (```` ``` ```` or ``~~~``) are kept whole when they fit, and are
    merged with neighbouring text when the result fits; an oversize block is cut between
    lines, each piece re-fenced with the block's opening line. Other text is cut at blank
    lines, then line breaks, then spaces, so a URL is never cut: a single URL longer than
    ``max_chars`` becomes one oversize chunk. Any other single token longer than
    ``max_chars`` is cut every ``max_chars`` characters. Chunks are stripped; blank text
    gives ``[]``.

    Raises:
        ValueError: ``max_chars`` < 20 (too small to hold a fence and a line).
    """
    if max_chars < 20:
        raise ValueError(f"max_chars must be >= 20, got {max_chars}")
    units: list[str] = []
    pos = 0
    for start, end in _code_blocks(text):
        units.extend(_split_prose(text[pos:start], max_chars))
        block = text[start:end].strip("\n")
        units.extend([block.strip()] if len(block.strip()) <= max_chars
                     else _split_code(block, max_chars))
        pos = end
    units.extend(_split_prose(text[pos:], max_chars))
    return _merge(units, "\n", max_chars)


# --------------------------------------------------------------------------------------
# Fact store
# --------------------------------------------------------------------------------------


def fact_id(user_id: str, session_id: str, turn_id: str, index: int) -> str:
    """The deterministic id of a chunk: ``f"{user_id}:{session_id}:{turn_id}:{index}"``."""
    return f"{user_id}:{session_id}:{turn_id}:{index}"


class FactChunk(BaseModel):
    """A chunk of verbatim material from one turn.

    ``id`` defaults to :func:`fact_id` of the user, session, turn and ``index`` (the chunk's
    position within its turn). ``kinds`` are :func:`is_verbatim`'s reasons."""

    model_config = ConfigDict(extra="forbid")

    id: str = ""
    user_id: str = Field(min_length=1)
    session_id: str
    turn_id: str
    index: int = 0
    time: Optional[datetime] = None
    kinds: list[str] = Field(default_factory=list)
    text: str

    @model_validator(mode="after")
    def _default_id(self) -> FactChunk:
        if not self.id:
            self.id = fact_id(self.user_id, self.session_id, self.turn_id, self.index)
        return self

    def metadata(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "session_id": self.session_id,
                "turn_id": self.turn_id, "index": self.index,
                "time": self.time.isoformat() if self.time else "",
                "kinds": ",".join(self.kinds)}

    @classmethod
    def from_chroma(cls, chunk_id: str, text: str, meta: dict[str, Any]) -> FactChunk:
        return cls(id=chunk_id, user_id=meta["user_id"], session_id=meta["session_id"],
                   turn_id=meta["turn_id"], index=int(meta.get("index", 0)),
                   time=datetime.fromisoformat(meta["time"]) if meta.get("time") else None,
                   kinds=[k for k in str(meta.get("kinds", "")).split(",") if k],
                   text=text)


def fact_chunks(user_id: str, session_id: str, message: Message,
                kinds: Optional[list[str]] = None, max_chars: int = 800,
                **thresholds: Any) -> list[FactChunk]:
    """The fact chunks of one turn: ``[]`` if it is not verbatim material.

    Args:
        kinds: the turn's reasons, if already known; otherwise :func:`is_verbatim` is run
            with ``thresholds`` (its keyword arguments).
        max_chars: passed to :func:`chunk_verbatim`.
    """
    kinds = is_verbatim(message.content, **thresholds) if kinds is None else kinds
    if not kinds:
        return []
    return [FactChunk(user_id=user_id, session_id=session_id, turn_id=message.turn_id,
                      index=i, time=message.timestamp, kinds=kinds, text=text)
            for i, text in enumerate(chunk_verbatim(message.content, max_chars))]


# --------------------------------------------------------------------------------------
# The Chroma client: embedded or a server
# --------------------------------------------------------------------------------------

_TRIES = 3  # a server restarting or a dropped connection: tries per operation before failing


class ChromaUnavailable(RuntimeError):
    """The Chroma server of ``memory.chroma_url`` cannot be used: it does not answer (at
    open, or it stopped answering mid-operation after :data:`_TRIES` tries), refuses the
    token, lacks the tenant, or the token's environment variable is unset. The message
    names ``memory.chroma_url`` and the URL."""


def _server_url(client: Any) -> Optional[str]:
    """The server URL of an HTTP client (as :func:`open_client` passed it); None for an
    embedded one."""
    try:
        settings = client.get_settings()
    except AttributeError:
        return None
    if not str(settings.chroma_api_impl).endswith("fastapi.FastAPI"):
        return None
    host = str(settings.chroma_server_host)
    if host.startswith(("http://", "https://")):
        return host
    scheme = "https" if settings.chroma_server_ssl_enabled else "http"
    return f"{scheme}://{host}:{settings.chroma_server_http_port}"


def _reason(exc: BaseException) -> str:
    """The innermost connection error of ``exc`` (chromadb wraps httpx's in a ValueError)."""
    seen = exc
    while seen is not None and not isinstance(seen, httpx.TransportError):
        seen = seen.__cause__ or seen.__context__
    inner = seen or exc
    return f"{type(inner).__name__}: {inner}"


def open_client(config: "Settings | MemoryConfig | None" = None,
                path: str | Path | None = None) -> "ClientAPI":
    """The Chroma client for the settings: every Chroma client Reverie makes comes from here.

    Args:
        config: :class:`reverie.config.Settings` (its ``memory`` section, and
            ``paths.chroma`` as the default ``path``), a
            :class:`reverie.config.MemoryConfig`, or None (embedded).
        path: the embedded store's folder; created if missing. Not used (and not
            created) when ``memory.chroma_url`` is set.

    Returns:
        ``chromadb.HttpClient`` on ``memory.chroma_url`` (its tenant; its database,
        created if missing; the token from ``memory.chroma_token_env`` in
        ``memory.chroma_token_header``), else ``chromadb.PersistentClient(path)``.

    Raises:
        ChromaUnavailable: the server cannot be used (see the class).
        ValueError: embedded, but no ``path`` (and ``config`` is not a Settings).
    """
    import chromadb

    memory = getattr(config, "memory", config)
    url = getattr(memory, "chroma_url", None)
    if url is None:
        if path is None:
            if not hasattr(config, "paths"):
                raise ValueError("an embedded Chroma needs its folder: pass path")
            path = config.paths.chroma
        Path(path).mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(path))

    # The whole URL as the host: chromadb keeps its path (a server behind a proxy prefix).
    base = f"{url.scheme}://{url.host}:{url.port}{(url.path or '').rstrip('/')}"
    where = f"memory.chroma_url: the Chroma server at {base}"
    headers = {}
    if memory.chroma_token_env:
        token = os.environ.get(memory.chroma_token_env)
        if not token:
            raise ChromaUnavailable(f"{where}: memory.chroma_token_env names "
                                    f"${memory.chroma_token_env}, which is not set")
        headers[memory.chroma_token_header] = (
            f"Bearer {token}" if memory.chroma_token_header == "Authorization" else token)
    from chromadb.config import Settings as ChromaSettings
    from chromadb.errors import ChromaError, NotFoundError

    def connect():
        return chromadb.HttpClient(host=base, port=url.port, ssl=url.scheme == "https",
                                   headers=dict(headers), tenant=memory.chroma_tenant,
                                   database=memory.chroma_database)

    try:
        try:
            return connect()
        except NotFoundError:  # no such tenant, or (first use) no such database
            admin = chromadb.AdminClient(ChromaSettings(
                chroma_api_impl="chromadb.api.fastapi.FastAPI", chroma_server_host=base,
                chroma_server_http_port=url.port, chroma_server_ssl_enabled=url.scheme == "https",
                chroma_server_headers=dict(headers)))
            admin.get_tenant(memory.chroma_tenant)  # a missing tenant is the user's to create
            admin.create_database(memory.chroma_database, tenant=memory.chroma_tenant)
            return connect()
    except (httpx.TransportError, ChromaError, ValueError) as exc:
        # chromadb turns some connection errors into a ValueError ("Could not connect ...")
        if isinstance(exc, httpx.TransportError) or \
                isinstance(exc.__cause__ or exc.__context__, httpx.TransportError):
            raise ChromaUnavailable(f"{where} cannot be reached ({_reason(exc)}); start it "
                                    f"(`chroma run --path DIR --port {url.port}`) or set "
                                    "memory.chroma_url to null for the embedded store") from exc
        raise ChromaUnavailable(f"{where} refused (tenant {memory.chroma_tenant!r}, database "
                                f"{memory.chroma_database!r}): {type(exc).__name__}: {exc}"
                                ) from exc


def _client(client_or_path: Any):
    if isinstance(client_or_path, (str, Path)):
        return open_client(None, client_or_path)
    return client_or_path


def _remote(method):
    """A store operation against a server: retried on a transient connection error
    (tenacity; every wrapped operation is idempotent as a whole, so a retry after a
    partly applied try does no harm), then :class:`ChromaUnavailable` naming the URL. An
    embedded client raises no httpx error, so this changes nothing there."""
    tried = retry(retry=retry_if_exception_type(httpx.TransportError),
                  stop=stop_after_attempt(_TRIES), wait=wait_exponential(multiplier=0.25, max=2),
                  reraise=True)(method)

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return tried(self, *args, **kwargs)
        except httpx.TransportError as exc:
            raise ChromaUnavailable(
                f"memory.chroma_url: the Chroma server at {self.url} stopped answering "
                f"({_reason(exc)}; {_TRIES} tries of {type(self).__name__}.{method.__name__})"
            ) from exc
    return run


def _where(*clauses: dict[str, Any]) -> dict[str, Any]:
    clauses = tuple(c for c in clauses if c)
    return clauses[0] if len(clauses) == 1 else {"$and": list(clauses)}


class _Collection:
    def __init__(self, client_path_or_client: Any, embedding_function: Any, collection: str):
        if embedding_function is None:
            raise ValueError("an embedding function is required (Chroma's default one "
                             "downloads a model)")
        self.client = _client(client_path_or_client)
        self.url = _server_url(self.client)
        self.embedding_function = embedding_function
        self.collection = self._open(collection)

    @_remote
    def _open(self, collection: str):
        # a copy: chromadb writes the embedding function into the dict it is given
        return self.client.get_or_create_collection(
            collection, embedding_function=self.embedding_function,
            configuration={"hnsw": dict(_COSINE["hnsw"])})

    def _existing(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), _BATCH):
            found.update(self.collection.get(ids=ids[i:i + _BATCH], include=[])["ids"])
        return found

    @_remote
    def count(self, user_id: Optional[str] = None) -> int:
        """Records stored, for one user or all."""
        if user_id is None:
            return self.collection.count()
        return len(self.collection.get(where={"user_id": user_id}, include=[])["ids"])


class FactStore(_Collection):
    """Verbatim chunks in a Chroma collection.

    Args:
        client_path_or_client: a Chroma client, or the folder of a persistent one
            (``Paths.chroma``).
        embedding_function: a Chroma embedding function (e.g.
            ``MiniLMEmbeddingFunction(model_dir)``); required.
        collection: the collection's name (3-512 characters of ``[a-zA-Z0-9._-]``).

    Raises:
        ValueError: ``embedding_function`` is None, or the collection was created with a
            different embedding function.
    """

    def __init__(self, client_path_or_client: Any, embedding_function: Any,
                 collection: str = "facts"):
        super().__init__(client_path_or_client, embedding_function, collection)

    @_remote
    def add(self, chunks: Iterable[FactChunk]) -> int:
        """Store chunks; ids already stored (or repeated in ``chunks``) are skipped, so
        adding the same chunks again is a no-op (nothing is re-embedded or overwritten).

        Returns:
            how many chunks were new.
        """
        new: dict[str, FactChunk] = {}
        for c in chunks:
            new.setdefault(c.id, c)
        for existing in self._existing(list(new)):
            new.pop(existing, None)
        items = list(new.values())
        for i in range(0, len(items), _BATCH):
            batch = items[i:i + _BATCH]
            self.collection.add(ids=[c.id for c in batch], documents=[c.text for c in batch],
                                metadatas=[c.metadata() for c in batch])
        return len(items)

    @_remote
    def query(self, text: str, user_id: str, k: int = 5,
              session_id: Optional[str] = None) -> list[tuple[FactChunk, float]]:
        """The ``k`` chunks of ``user_id`` nearest to ``text``, nearest first, with their
        cosine distance (0 identical, up to 2); only this user's chunks, and only this
        session's if ``session_id`` is given.

        Raises:
            ValueError: ``k`` < 1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        res = self.collection.query(
            query_texts=[text], n_results=k,
            where=_where({"user_id": user_id}, {"session_id": session_id} if session_id else {}),
            include=["documents", "metadatas", "distances"])
        return [(FactChunk.from_chroma(i, d, m), float(dist)) for i, d, m, dist in
                zip(res["ids"][0], res["documents"][0], res["metadatas"][0],
                    res["distances"][0])]

    @_remote
    def get(self, chunk_id: str) -> Optional[FactChunk]:
        """The chunk with this id, or None."""
        res = self.collection.get(ids=[chunk_id], include=["documents", "metadatas"])
        if not res["ids"]:
            return None
        return FactChunk.from_chroma(res["ids"][0], res["documents"][0], res["metadatas"][0])


# --------------------------------------------------------------------------------------
# Memory index
# --------------------------------------------------------------------------------------


class MemoryIndex(_Collection):
    """One embedding per memory (its :meth:`Memory.statement`), for novelty and
    contradiction checks. Metadata: ``user_id``, ``kind``, ``status`` and ``superseded``
    (bool).

    The index is derived data: SQLite (:class:`reverie.memory.store.MemoryStore`) is the record.
    After a crash between the two writes, :meth:`sync` brings the index back in line.

    Args: as :class:`FactStore` (default collection ``"memories"``).
    """

    def __init__(self, client_path_or_client: Any, embedding_function: Any,
                 collection: str = "memories"):
        super().__init__(client_path_or_client, embedding_function, collection)

    @staticmethod
    def _meta(memory: Memory) -> dict[str, Any]:
        return {"user_id": memory.user_id, "kind": memory.kind, "status": memory.status,
                "superseded": memory.superseded_by is not None}

    def upsert(self, memory: Memory) -> None:
        """Index (or re-index) a memory. Only the metadata is rewritten when the statement
        did not change, so the text is not embedded again."""
        self.upsert_many([memory])

    @_remote
    def upsert_many(self, memories: Iterable[Memory]) -> None:
        """:meth:`upsert` for several memories (embedded in one batch)."""
        by_id = {m.id: m for m in memories}
        ids = list(by_id)
        for i in range(0, len(ids), _BATCH):
            batch = ids[i:i + _BATCH]
            have = self.collection.get(ids=batch, include=["documents"])
            same = {j for j, doc in zip(have["ids"], have["documents"])
                    if doc == by_id[j].statement()}
            if same:
                self.collection.update(ids=list(same),
                                       metadatas=[self._meta(by_id[j]) for j in same])
            changed = [j for j in batch if j not in same]
            if changed:
                self.collection.upsert(ids=changed,
                                       documents=[by_id[j].statement() for j in changed],
                                       metadatas=[self._meta(by_id[j]) for j in changed])

    @_remote
    def remove(self, memory_id: str) -> None:
        """Drop a memory from the index (no error if it is not there)."""
        self.collection.delete(ids=[memory_id])

    @_remote
    def nearest(self, text: str, user_id: str, k: int = 5, exclude_superseded: bool = True,
                status: Optional[str | Iterable[str]] = None) -> list[tuple[str, float]]:
        """The ``k`` memories of ``user_id`` most similar to ``text``, most similar first.

        Args:
            exclude_superseded: leave out memories that were superseded.
            status: only memories with this status (or one of these); None for any.

        Returns:
            (memory id, cosine similarity in [-1, 1]) pairs; only this user's memories.

        Raises:
            ValueError: ``k`` < 1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        statuses = [status] if isinstance(status, str) else list(status or [])
        res = self.collection.query(
            query_texts=[text], n_results=k,
            where=_where({"user_id": user_id},
                         {"superseded": False} if exclude_superseded else {},
                         {"status": {"$in": statuses}} if statuses else {}),
            include=["distances"])
        # Chroma's cosine distance is 1 - cosine similarity.
        return [(i, max(-1.0, min(1.0, 1.0 - float(d))))
                for i, d in zip(res["ids"][0], res["distances"][0])]

    @_remote
    def sync(self, store: MemoryStore, user_id: Optional[str] = None) -> dict[str, int]:
        """Make the index match the store (for one user or all): every stored memory,
        superseded ones included, is upserted; indexed ids the store no longer has
        (deleted memories) are removed.

        Holds :meth:`MemoryStore.exclusive`, so a concurrent forget or night does not
        change the store between the read and the index writes.

        Returns:
            ``{"indexed": n, "removed": n}``.
        """
        with store.exclusive():
            memories = store.list(user_id=user_id, include_superseded=True)
            self.upsert_many(memories)
            keep = {m.id for m in memories}
            have = self.collection.get(where={"user_id": user_id} if user_id else None,
                                       include=[])["ids"]
            stale = [i for i in have if i not in keep]
            for i in range(0, len(stale), _BATCH):
                self.collection.delete(ids=stale[i:i + _BATCH])
        return {"indexed": len(memories), "removed": len(stale)}

    @_remote
    def check(self, store: MemoryStore, user_id: Optional[str] = None) -> dict[str, list[str]]:
        """Compare the index with the store (one user's memories, or everyone's) without
        changing either: what :meth:`sync` would fix.

        Returns:
            ``{"missing": ids stored but not indexed, "stale": ids indexed but not stored
            (deleted), "differ": ids indexed with another text, user or superseded mark
            than the store's}``, each sorted; all empty when the two agree. (The index's
            ``status`` metadata is not compared: no query filters on it.)
        """
        with store.exclusive():  # a consistent view: no change of both half-done
            memories = {m.id: m for m in store.list(user_id=user_id, include_superseded=True)}
            have = self.collection.get(where={"user_id": user_id} if user_id else None,
                                       include=["documents", "metadatas"])
        indexed = dict(zip(have["ids"], zip(have["documents"], have["metadatas"])))
        differ = []
        for i in sorted(set(indexed) & set(memories)):
            doc, meta = indexed[i]
            m = memories[i]
            if (doc != m.statement() or (meta or {}).get("user_id") != m.user_id
                    or bool((meta or {}).get("superseded")) != (m.superseded_by is not None)):
                differ.append(i)
        return {"missing": sorted(set(memories) - set(indexed)),
                "stale": sorted(set(indexed) - set(memories)), "differ": differ}


__all__ = ["ChromaUnavailable", "FactChunk", "FactStore", "MemoryIndex", "chunk_verbatim",
           "fact_chunks", "fact_id", "is_verbatim", "open_client"]
