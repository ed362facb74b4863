"""``reverie serve``: the day model behind an OpenAI-compatible chat-completions API.

Any client that speaks OpenAI's wire format (the ``openai`` package, Open WebUI, editors)
talks to the active model version as the chat does: the last user message is the
retrieval query, the user's memories go into the system prompt through the chat's own
prompt building (:func:`reverie.wake.chat.turn_messages`), and every exchange (that user
message and the answer) is logged to the day log, so the night sleeps on it.

Endpoints (FastAPI): ``POST /v1/chat/completions`` (``stream`` true: server-sent events of
``chat.completion.chunk`` objects ending in ``data: [DONE]``) and ``GET /v1/models`` (one
model, named as the day names the active version). Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``.

Whose conversation: the ``X-Reverie-User`` header, else the body's ``user``, else
``wake.user``. Which day-log session: conversations are keyed by user and the
``X-Reverie-Session`` header, else their first user message; a request continues the
key's session whose turns end the conversation it sends (see :class:`ConversationLog`).

Generation runs on the event loop without blocking it: ``astream`` of the chat model (the
MLX engine's async queue; a LangChain model's own async path, or its sync one in a
thread), so concurrent requests batch on the engine. Retrieval, token counts and day-log
writes run in worker threads. The chat's commands and nights are not served.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from reverie.config import Settings
from reverie.memory.daylog import DayLog, validate_user_id
from reverie.memory.records import Session, check_text, new_id
from reverie.prompts import chat_frame
from reverie.wake.app import Day
from reverie.wake.chat import approx_tokens, log_turn, turn_messages

USER_HEADER = "X-Reverie-User"
SESSION_HEADER = "X-Reverie-Session"
SOURCE = "serve"
_SESSION_ID = re.compile(r"(serve-[0-9a-f]{16})(?:-(\d+))?")


# -- errors -------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: ``status`` and ``{"error": {message, type,
    param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# -- the request --------------------------------------------------------------------------

class ChatMessage(BaseModel):
    """One message of a request: ``content`` a string, a list of parts (text parts are
    read, others ignored) or null (an assistant turn that only called tools)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: Any) -> Any:
        """Text the day log can write: a lone surrogate (the JSON escape ``"\\ud800"``) is
        the client's error (400), not a failure when the exchange is logged (500)."""
        for text in [v] if isinstance(v, str) else [p.get("text") for p in v or []]:
            if isinstance(text, str):
                check_text(text)
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content
                           if p.get("type", "text") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    """A chat-completions request. OpenAI's other parameters (``tools``, ``seed``,
    penalties, ...) are accepted and ignored; ``model`` is not checked (one model is
    served)."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    def sampling(self) -> dict[str, Any]:
        """The generation keyword arguments the client set (the role's config fills the
        rest): ``max_tokens``, ``temperature``, ``top_p``."""
        out = {"max_tokens": self.max_completion_tokens or self.max_tokens,
               "temperature": self.temperature, "top_p": self.top_p}
        return {k: v for k, v in out.items() if v is not None}

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


@dataclass
class Turn:
    """What one request asks, read from its messages.

    Attributes:
        text: the last user message (the retrieval query and the logged user turn).
        history: the earlier user and assistant turns, as langchain-core messages.
        instructions: the client's system (and developer) messages, joined.
    """

    text: str
    history: list[BaseMessage]
    instructions: str


def read_turn(messages: list[ChatMessage]) -> Turn:
    """Split a request's messages into :class:`Turn`. Tool and function messages are left
    out (no tools are served).

    Raises:
        APIError: 400 when the last message is not a non-empty user message, or a role is
            unknown.
    """
    last = messages[-1]
    if last.role != "user" or not last.text().strip():
        raise APIError(400, "the last message must be a non-empty user message",
                       param="messages")
    history, instructions = [], []
    for i, m in enumerate(messages[:-1]):
        if m.role in ("system", "developer"):
            instructions.append(m.text().strip())
        elif m.role == "user":
            history.append(HumanMessage(m.text()))
        elif m.role == "assistant":
            if m.text().strip():
                history.append(AIMessage(m.text()))
        elif m.role not in ("tool", "function"):
            raise APIError(400, f"messages.{i}.role: unknown role {m.role!r} (system, "
                                "developer, user, assistant)", param=f"messages.{i}.role")
    return Turn(last.text().strip(), history, "\n\n".join(t for t in instructions if t))


# -- the day log --------------------------------------------------------------------------

def conversation_key(user_id: str, header: str | None, history: list[BaseMessage],
                     text: str) -> str:
    """The base session id of a conversation, ``serve-<16 hex>``: a hash of the user and
    the ``X-Reverie-Session`` header, else of the user and the conversation's first user
    message."""
    first = header if header else next((str(m.content) for m in history
                                        if isinstance(m, HumanMessage)), text)
    kind = "header" if header else "first"
    digest = hashlib.sha256(json.dumps([user_id, kind, first], ensure_ascii=False).encode())
    return f"serve-{digest.hexdigest()[:16]}"


def _turns(messages) -> list[tuple[str, str]]:
    """(role, stripped text) of user and assistant messages, records or langchain ones."""
    out = []
    for m in messages:
        role = getattr(m, "role", None) or ("user" if isinstance(m, HumanMessage) else "assistant")
        out.append((role, str(m.content).strip()))
    return out


class ConversationLog:
    """The server's sessions in the day log: one per conversation, not one per turn.

    A conversation's sessions have ids ``<base>``, ``<base>-2``, ... (``base`` from
    :func:`conversation_key`). A request's exchange is appended to the session, not yet
    consumed by a night, whose turns are the last turns of the history the client sent
    (the client keeps the whole conversation, so a continued one always ends with the
    turns logged so far). With none, a new session starts with just this exchange: a
    first message, a conversation the night already consumed (as the chat starts anew
    after a night), or an edited or regenerated one (a fork). With the
    ``X-Reverie-Session`` header the newest open session is continued instead of forking,
    for clients that send only the last message.

    Thread-safe (one lock); the server is the only writer of its sessions, so they are
    read from the log once per user and then kept.

    Args:
        daylog: the day log.
    """

    def __init__(self, daylog: DayLog):
        self.daylog = daylog
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, list[Session]]] = {}   # user -> base -> sessions

    def _family(self, user_id: str, base: str) -> list[Session]:
        if user_id not in self._known:
            found: dict[str, list[tuple[int, Session]]] = {}
            for s in self.daylog.sessions(user_id):
                m = _SESSION_ID.fullmatch(s.session_id)
                if m:
                    found.setdefault(m.group(1), []).append((int(m.group(2) or 1), s))
            self._known[user_id] = {b: [s for _, s in sorted(v, key=lambda p: p[0])]
                                    for b, v in found.items()}
        return self._known[user_id].setdefault(base, [])

    def record(self, user_id: str, base: str, history: list[BaseMessage], text: str,
               answer: str, pinned: bool = False) -> Session:
        """Log one exchange; returns the session it went into.

        Args:
            base: the conversation's base session id (:func:`conversation_key`).
            history: the earlier turns the client sent.
            pinned: the client named the session (``X-Reverie-Session``).

        Raises:
            ValueError: an unsafe user id. OSError: the day file could not be written.
        """
        with self._lock:
            family = self._family(user_id, base)
            consumed = self.daylog.consumed()
            open_ = [s for s in family if s.content_hash not in consumed]
            earlier = _turns(history)
            matches = [s for s in open_ if len(s.messages) <= len(earlier)
                       and earlier[len(earlier) - len(s.messages):] == _turns(s.messages)]
            session = max(reversed(matches), key=lambda s: len(s.messages), default=None)
            if session is None and pinned and open_:
                session = open_[-1]
            if session is None:
                sid = base if not family else f"{base}-{len(family) + 1}"
                new = log_turn(self.daylog, None, user_id, text, answer, session_id=sid,
                               source=SOURCE)
                family.append(new)
                return new
            # on a copy: a failed write must not leave the turn in the kept session
            grown = log_turn(self.daylog, session.model_copy(deep=True), user_id, text, answer)
            family[family.index(session)] = grown
            return grown


# -- the server ---------------------------------------------------------------------------

class Server:
    """The model, retrieval and logging behind the HTTP endpoints.

    Args:
        settings: the configuration (``wake.role``'s model answers; ``wake.rag``,
            ``wake.rag_k``, ``wake.rag_max_distance``, ``wake.context_tokens`` and
            ``wake.compact_at`` as in the chat; ``wake.user`` by default).
        runtime: a :class:`~reverie.runtime.models.Runtime` on the active version.
        chat_model: a langchain-core chat model to answer instead of the runtime's (tests);
            then no version reload and token counts are estimated.

    The model is switched to a newly active version between requests: when a night in
    another process promoted one, the next request waits for the generations in flight
    and loads it.
    """

    def __init__(self, settings: Settings, runtime, chat_model: BaseChatModel | None = None):
        self.settings, self.runtime = settings, runtime
        self.frame = chat_frame(settings)
        self.log = ConversationLog(DayLog(settings.paths.days))
        self._fixed = chat_model
        self._days: dict[str, Day] = {}
        self._days_lock = threading.Lock()
        self._retrieve_lock = threading.Lock()   # one embedder: queries one at a time
        self._start = asyncio.Lock()              # a version switch holds new requests
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def day(self, user_id: str | None = None) -> Day:
        """The day of ``user_id`` (default ``wake.user``): its retriever; the shared runtime."""
        user_id = user_id or self.settings.wake.user
        with self._days_lock:
            if user_id not in self._days:
                self._days[user_id] = Day(self.settings, user_id, self.runtime)
            return self._days[user_id]

    def model_name(self) -> str:
        """The served model's name: the active version ("base" before any promotion)."""
        return self.day().version()

    def warm(self) -> str:
        """Load the chat model (and the embedder when retrieval is on) now rather than on
        the first request; returns :meth:`model_name`. Raises what loading raises
        (``FetchError``, ``ModelSourceError``, ...)."""
        if self._fixed is None:
            self.day().chat_model()
        if self.settings.wake.rag:
            self.runtime.embedder()
        return self.model_name()

    def user_of(self, header: str | None, body: str | None) -> str:
        """Whose turn this is: the header, else the body's ``user``, else ``wake.user``.

        Raises:
            APIError: 400 naming the bad id."""
        user_id = header or body or self.settings.wake.user
        try:
            return validate_user_id(user_id)
        except ValueError as exc:
            raise APIError(400, str(exc), param="user", code="invalid_user") from exc

    def retrieve(self, user_id: str, text: str) -> list:
        """The user's documents for ``text`` ([] with ``wake.rag`` off). Blocking."""
        if not self.settings.wake.rag:
            return []
        with self._retrieve_lock:
            return self.day(user_id).retriever().invoke(text)

    def prompt(self, turn: Turn, docs: list) -> list[BaseMessage]:
        """The chat's prompt for this turn, within the chat's budget (``compact_at`` of
        ``context_tokens``): the oldest history turns are left out first, then the
        farthest documents (nothing is summarised). Blocking (counts tokens)."""
        count = approx_tokens if self._fixed is not None else self.day().count_tokens
        budget = self.settings.wake.compact_at * self.settings.wake.context_tokens
        history, docs = list(turn.history), list(docs)

        def build():
            return turn_messages(self.frame, turn.text, docs, history,
                                 instructions=turn.instructions)

        while history and count(build()) > budget:
            history = history[1:]
            while history and not isinstance(history[0], HumanMessage):
                history = history[1:]   # chat templates want a user turn after the system
        while docs and count(build()) > budget:
            docs = docs[:-1]
        return build()

    async def _acquire(self) -> BaseChatModel:
        async with self._start:
            if self._fixed is not None:
                model = self._fixed
            else:
                day = self.day()
                if await asyncio.to_thread(day.stale):
                    await self._idle.wait()      # generations in flight end on the old weights
                    await asyncio.to_thread(day.load_active)
                model = await asyncio.to_thread(day.chat_model)
            self._busy += 1
            self._idle.clear()
            return model

    def _release(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def generate(self, messages: list[BaseMessage], request: ChatRequest
                       ) -> AsyncIterator[tuple[str, dict]]:
        """The answer as it streams: ``(piece, info)``; the last item's ``info`` has
        ``finish_reason`` ("stop" or "length") and ``usage`` (token counts, zeros when the
        model reports none)."""
        model = await self._acquire()
        try:
            last = None
            async for chunk in model.astream(messages, stop=request.stops(),
                                             **request.sampling()):
                last = chunk
                piece = str(chunk.content)
                if piece:
                    yield piece, {}
            usage = getattr(last, "usage_metadata", None) or {}
            meta = getattr(last, "response_metadata", None) or {}
            reason = "length" if meta.get("finish_reason") == "length" else "stop"
            prompt, completion = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
            yield "", {"finish_reason": reason, "usage": {
                "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}}
        finally:
            self._release()


# -- HTTP ---------------------------------------------------------------------------------

def _completion_id() -> str:
    return new_id("chatcmpl")


def _chunk(cid: str, created: int, model: str, delta: dict, reason: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The FastAPI application over ``server``.

    Args:
        api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (401
            otherwise); None: no authentication.
    """
    app = FastAPI(title="Reverie", description="The day model, OpenAI-compatible: every "
                  "conversation is logged to the day log and slept on at night.")
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)):
        if api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer "
                                "<key>' with the key `reverie serve` was started with",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(APIError(400, f"{where}: {first['msg']}" if where else first["msg"],
                                     param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception):
        return JSONResponse(APIError(500, f"{type(exc).__name__}: {exc}",
                                     type="server_error").body(), status_code=500)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "reverie"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        return {"object": "list", "data": [card(await asyncio.to_thread(server.model_name))]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorised)])
    async def model(model_id: str):
        name = await asyncio.to_thread(server.model_name)
        if model_id != name:
            raise APIError(404, f"no model {model_id!r}: this server serves {name!r}",
                           param="model", code="model_not_found")
        return card(name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatRequest, request: Request):
        if body.n not in (None, 1):
            raise APIError(400, "n: only 1 choice is served", param="n")
        user_id = server.user_of(request.headers.get(USER_HEADER), body.user)
        turn = read_turn(body.messages)
        pinned = request.headers.get(SESSION_HEADER)
        base = conversation_key(user_id, pinned, turn.history, turn.text)
        docs = await asyncio.to_thread(server.retrieve, user_id, turn.text)
        messages = await asyncio.to_thread(server.prompt, turn, docs)
        name = await asyncio.to_thread(server.model_name)
        cid, created = _completion_id(), int(time.time())

        async def log(answer: str) -> None:
            await asyncio.to_thread(server.log.record, user_id, base, turn.history, turn.text,
                                    answer.strip(), bool(pinned))

        if body.stream:
            usage_wanted = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                yield _chunk(cid, created, name, {"role": "assistant", "content": ""})
                pieces: list[str] = []
                final: dict = {}
                try:
                    async for piece, info in server.generate(messages, body):
                        piece = piece if pieces else piece.lstrip()   # as the log has it
                        if piece:
                            pieces.append(piece)
                            yield _chunk(cid, created, name, {"content": piece})
                        final = info or final
                    await log("".join(pieces))
                except Exception as exc:  # the status line is sent: report in the stream
                    error = APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                yield _chunk(cid, created, name, {}, final["finish_reason"])
                if usage_wanted:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": name, "choices": [], "usage": final["usage"]}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        pieces, final = [], {}
        async for piece, info in server.generate(messages, body):
            pieces.append(piece)
            final = info or final
        answer = "".join(pieces).strip()
        await log(answer)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "logprobs": None, "finish_reason": final["finish_reason"]}],
                "usage": final["usage"]}

    return app


# -- listening ----------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only: ``localhost`` or a loopback address
    (127.0.0.0/8, ::1). Any other name or address (``0.0.0.0`` too) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv4 or IPv6, as ``host`` resolves);
    port 0 picks a free one.

    Raises:
        OSError: the address cannot be resolved or bound (in use, not this machine's)."""
    family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host.strip("[]"), port), family=family)


def uvicorn_server(app: FastAPI, log_level: str = "warning"):
    """A ``uvicorn.Server`` for ``app`` (run it with ``.run(sockets=[listen(...)])``;
    ``should_exit = True`` stops it)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                         lifespan="off"))
