"""The day chat: turns with retrieval, every turn logged, a context window that compacts
itself, and the commands that put the model to sleep.

A :class:`ChatSession` owns one conversation with one user. Each turn:

1. retrieval (if on): the user's nearest memories and verbatim chunks
   (:class:`~reverie.wake.retrieval.MemoryRetriever`) go into the system prompt;
2. the chat model answers (any langchain-core chat model; streamed when asked);
3. the turn is logged: the session, user id on it, is rewritten in the day log
   (:meth:`reverie.memory.daylog.DayLog.save`), so a crash loses at most the turn in flight;
4. when the prompt passes ``compact_at`` of ``context_tokens``, the older turns are
   summarised by the same model and the summary kept in the prompt; the day log keeps
   every turn word for word (the night learns from the log, not from the prompt).

Commands (:meth:`ChatSession.handle`): ``/sleep``, ``/status``, ``/compact``,
``/forget TEXT``, ``/quit``. ``/sleep`` and the automatic triggers (after
``auto_sleep_turns`` turns, or when the unslept log passes ``sunset_chars``) call the
``sleep`` function the caller gives, which runs the night and returns the chat model to go
on with (the new version when the night promoted one); the chat then starts a new session,
so the next night reads only what was said after this one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from reverie.locks import NightLocked
from reverie.memory.daylog import DayLog
from reverie.memory.records import Message, Session, new_id, now
from reverie.prompts import CHAT_VARIABLES, ChatFrame, memories_section  # noqa: F401  (re-exported)

COMPACT_VARIABLES = frozenset({"summary", "conversation"})
COMMANDS = {
    "/sleep": "run the night now, then go on with the new model version",
    "/status": "model version, turns, context use, memories",
    "/compact": "summarise older turns now to free the context",
    "/forget TEXT": "ask the night to forget something",
    "/quit": "leave (every turn is already logged)",
}

SleepFn = Callable[[], tuple[Optional[BaseChatModel], str]]
"""``sleep() -> (chat model to go on with or None to keep the current one, a one-line
report)``: runs the night for this user."""


def turn_messages(frame: ChatFrame, text: str, docs: Sequence[Document] = (),
                  history: Sequence[BaseMessage] = (), summary: str = "",
                  instructions: str = "") -> list[BaseMessage]:
    """The prompt of one chat turn, as the chat builds it (``reverie serve`` too).

    Args:
        frame: the chat frame (``chat.yaml`` around the identity).
        text: the user's new turn (rendered through the frame's user template).
        docs: retrieved documents; their texts become the system prompt's memories part.
        history: earlier turns kept word for word, between the system prompt and ``text``.
        summary: the summary of older turns ("" for none).
        instructions: a client's own system text (``reverie serve``), appended to the
            system prompt after identity, memories and summary ("" for none).

    Returns:
        langchain-core messages: system (when not empty), ``history``, the new user turn.
    """
    memories = memories_section([d.page_content for d in docs])
    summary = f"\n\nEarlier in this conversation: {summary}" if summary else ""
    rendered = frame.render(text, memories=memories, summary=summary)
    if instructions.strip():
        if rendered[0].type == "system":
            rendered[0] = SystemMessage(f"{rendered[0].content}\n\n{instructions.strip()}")
        else:
            rendered.insert(0, SystemMessage(instructions.strip()))
    return rendered[:-1] + list(history) + rendered[-1:]


def log_turn(daylog: DayLog, session: Session | None, user_id: str, user_text: str,
             answer: str, session_id: str | None = None, source: str = "chat") -> Session:
    """Append one exchange (user turn, answer) to ``session`` and rewrite it in the day log
    (:meth:`~reverie.memory.daylog.DayLog.save`: one line per session, replaced in place).

    Args:
        session: the conversation's session so far; None starts one (``session_id``, or a
            new ``chat-…`` id; ``source`` on it). It is changed in place.
        user_id: whose session a new one is.

    Returns:
        The session with the two turns (ids ``t<n>``) appended.

    Raises:
        ValueError: an unsafe user id (nothing written).
        OSError: the day file could not be written (the old file stays).
    """
    at = now()
    if session is None:
        session = Session(session_id=session_id or new_id("chat"), user_id=user_id,
                          started_at=at, source=source,
                          messages=[Message(turn_id="t1", role="user", content=user_text,
                                            timestamp=at)])
    else:
        session.messages.append(Message(turn_id=f"t{len(session.messages) + 1}",
                                        role="user", content=user_text, timestamp=at))
    session.messages.append(Message(turn_id=f"t{len(session.messages) + 1}",
                                    role="assistant", content=answer, timestamp=now()))
    session.ended_at = now()
    daylog.save(session)
    return session


def approx_tokens(messages: list[BaseMessage]) -> int:
    """A tokenizer-free estimate: 4 characters per token (plus 4 per message for the chat
    template's markers). Used when no tokenizer is given."""
    return sum(len(str(m.content)) // 4 + 4 for m in messages)


@dataclass
class Reply:
    """What :meth:`ChatSession.handle` did.

    Attributes:
        kind: "reply" (the model answered), "info" (a command's output), "quit".
        text: the answer or the command's output.
        retrieved: documents put in the prompt for this turn (retrieval on).
        compacted: the context was compacted before answering.
        slept: a night ran after this turn (command or trigger), with ``sleep_report``.
        interrupted: the user stopped the streamed answer (Ctrl-C); ``text`` is the part
            that was shown, which is what was logged and kept in the context.
    """

    kind: str
    text: str
    retrieved: list[Document] = field(default_factory=list)
    compacted: bool = False
    slept: bool = False
    sleep_report: str = ""
    interrupted: bool = False


class ChatSession:
    """One user's chat with the day model.

    Args:
        model: a langchain-core chat model (the active model version, or any other).
        prompt: the chat prompt (``prompts/chat.yaml``: variables :data:`CHAT_VARIABLES`).
        compact_prompt: the summary prompt (``prompts/compact.yaml``).
        identity_text: who the assistant is (``Identity.system_prompt()``).
        daylog: where turns are logged.
        user_id: whose conversation this is (on the session and every retrieval).
        cfg: the ``wake`` config (context_tokens, compact_at, keep_turns, auto_sleep_turns,
            sunset_chars).
        retriever: a retriever for this user (None: no retrieval).
        rag: retrieval on or off at start.
        count_tokens: ``count(messages) -> tokens`` of a prompt; default :func:`approx_tokens`.
        sleep: runs the night (see :data:`SleepFn`); None: ``/sleep`` says it cannot.
        status_info: extra ``/status`` lines, e.g. ``lambda: {"model version": ...}``.
    """

    def __init__(self, model: BaseChatModel, prompt: ChatPromptTemplate,
                 compact_prompt: ChatPromptTemplate, identity_text: str, daylog: DayLog,
                 user_id: str, cfg, retriever: Any = None, rag: bool = True,
                 count_tokens: Callable[[list[BaseMessage]], int] | None = None,
                 sleep: SleepFn | None = None,
                 status_info: Callable[[], dict[str, Any]] | None = None):
        self.model, self.prompt, self.compact_prompt = model, prompt, compact_prompt
        self.frame = ChatFrame(prompt, identity_text)  # the gate and training use the same
        self.identity_text, self.daylog, self.user_id, self.cfg = identity_text, daylog, user_id, cfg
        self.retriever, self.rag = retriever, rag
        self.count_tokens = count_tokens or approx_tokens
        self.sleep_fn, self.status_info = sleep, status_info
        self.summary = ""
        self.history: list[BaseMessage] = []   # turns still in the prompt, word for word
        self.session: Session | None = None
        self.turns = 0                          # exchanges in this chat (all sessions)
        self.turns_since_sleep = 0
        self.nights = 0

    # -- prompt ---------------------------------------------------------------------------

    def messages_for(self, text: str, docs: list[Document]) -> list[BaseMessage]:
        """The prompt of one turn: system (identity, memories, summary), the turns kept in
        the context, the new user turn."""
        return turn_messages(self.frame, text, docs, self.history, self.summary)

    def context_used(self, pending: str = "") -> int:
        """Tokens the prompt takes now (with ``pending`` as the next user turn)."""
        return self.count_tokens(self.messages_for(pending, []))

    def retrieve(self, text: str) -> list[Document]:
        """Documents for the prompt of ``text``: [] with retrieval off or no retriever."""
        if not (self.rag and self.retriever is not None and text.strip()):
            return []
        return self.retriever.invoke(text)

    # -- compaction -----------------------------------------------------------------------

    def compact(self) -> bool:
        """Summarise the turns before the last ``keep_turns`` exchanges into
        :attr:`summary` (the previous summary is folded in). Returns False when there was
        nothing old enough to summarise."""
        keep = 2 * self.cfg.keep_turns
        old, recent = self.history[:-keep], self.history[-keep:]
        if not old:
            if not self.history:
                return False
            old, recent = self.history, []   # asked to compact a short chat: all of it
        conversation = "\n".join(f"{'User' if isinstance(m, HumanMessage) else 'Assistant'}: "
                                 f"{m.content}" for m in old)
        previous = f"Summary so far: {self.summary}\n\n" if self.summary else ""
        reply = self.model.invoke(self.compact_prompt.format_messages(
            summary=previous, conversation=conversation))
        self.summary = str(reply.content).strip() or self.summary
        self.history = recent
        return True

    def _over_budget(self, text: str, docs: list[Document]) -> bool:
        budget = self.cfg.compact_at * self.cfg.context_tokens
        return self.count_tokens(self.messages_for(text, docs)) > budget

    # -- turns ----------------------------------------------------------------------------

    def send(self, text: str, on_token: Callable[[str], None] | None = None,
             on_retrieved: Callable[[list[Document]], None] | None = None) -> Reply:
        """One exchange: retrieve, (compact if needed), answer, log.

        Args:
            text: the user's turn.
            on_token: called with each piece of the answer as it streams.
            on_retrieved: called with the documents going into the prompt, before answering.

        A ``KeyboardInterrupt`` while the answer streams (Ctrl-C, or raised by ``on_token``)
        stops that answer: the stream is closed, which cancels the generation on the model's
        engine, and the part already shown is logged and kept as the answer
        (``Reply.interrupted``), so the context holds what the user saw. An interrupt
        before the answer starts (retrieval, compaction) propagates and nothing is logged.

        Raises:
            ValueError: empty text.
        """
        if not text.strip():
            raise ValueError("empty message")
        docs = self.retrieve(text)
        compacted = False
        if self._over_budget(text, docs) and self.history:
            compacted = self.compact()
            # still too long (a huge paste): drop retrieved context before the turn itself
            while docs and self._over_budget(text, docs):
                docs = docs[:-1]
        if on_retrieved is not None:
            on_retrieved(docs)
        messages = self.messages_for(text, docs)
        interrupted = False
        if on_token is None:
            answer = str(self.model.invoke(messages).content)
        else:
            pieces = []
            # closing the stream runs the chat model's cleanup, which cancels the request
            with contextlib.closing(self.model.stream(messages)) as stream:
                try:
                    for chunk in stream:
                        piece = str(chunk.content)
                        pieces.append(piece)
                        on_token(piece)
                except KeyboardInterrupt:
                    interrupted = True
            answer = "".join(pieces)
        answer = answer.strip()
        self._log(text, answer)
        self.history += [HumanMessage(text), AIMessage(answer)]
        return Reply("reply", answer, retrieved=docs, compacted=compacted,
                     interrupted=interrupted)

    def _log(self, user_text: str, answer: str) -> None:
        self.session = log_turn(self.daylog, self.session, self.user_id, user_text, answer)
        self.turns += 1
        self.turns_since_sleep += 1

    # -- commands -------------------------------------------------------------------------

    def handle(self, line: str, on_token: Callable[[str], None] | None = None,
               on_retrieved: Callable[[list[Document]], None] | None = None) -> Reply:
        """A line typed by the user: a command (see :data:`COMMANDS`) or a chat turn.
        After a chat turn the sleep triggers are checked (``auto_sleep_turns``,
        ``sunset_chars``); if one fires the night runs before this returns
        (``Reply.slept``)."""
        stripped = line.strip()
        command, _, arg = stripped.partition(" ")
        if command == "/quit" or command == "/exit":
            return Reply("quit", "")
        if command == "/status":
            return Reply("info", "\n".join(f"{k}: {v}" for k, v in self.status().items()))
        if command == "/compact":
            done = self.compact()
            return Reply("info", f"compacted: {self.summary}" if done else "nothing to compact yet")
        if command == "/forget":
            if not arg.strip():
                return Reply("info", "usage: /forget TEXT")
            self.forget(arg.strip())
            return Reply("info", f"noted: tonight I will forget {arg.strip()!r}")
        if command == "/sleep":
            return self._sleep(Reply("info", ""), "")
        if command.startswith("/") and command not in ("/",):
            return Reply("info", "commands: " + ", ".join(COMMANDS))
        reply = self.send(stripped, on_token, on_retrieved)
        trigger = self.due()
        return self._sleep(reply, trigger) if trigger else reply

    def forget(self, text: str) -> None:
        """Log a deletion request the night honours (its router reads "forget ..." in
        user turns and deletes the user's memories that match)."""
        self._log(f"Please forget {text}", f"I will forget {text} tonight.")

    def due(self) -> str:
        """Which sleep trigger fires now ("" for none): ``auto_sleep_turns`` exchanges since
        the last night, or the user's unslept log past ``sunset_chars`` characters."""
        if self.cfg.auto_sleep_turns and self.turns_since_sleep >= self.cfg.auto_sleep_turns:
            return f"auto-sleep after {self.turns_since_sleep} turns"
        if self.cfg.sunset_chars and self.daylog.size(self.user_id) >= self.cfg.sunset_chars:
            return f"sunset: the day log passed {self.cfg.sunset_chars} characters"
        return ""

    def _sleep(self, reply: Reply, why: str) -> Reply:
        """Run the night (``why``: the trigger that fired, "" when asked by /sleep)."""
        if self.sleep_fn is None:
            reply.text = reply.text or "sleep is not available here"
            return reply
        try:
            model, report = self.sleep_fn()
        except NightLocked as exc:  # a cron night is on it: go on, the turns are logged
            if reply.kind == "info":
                reply.text = f"not sleeping now: {exc}"
            return reply
        if model is not None:
            self.model = model
        self.nights += 1
        self.turns_since_sleep = 0
        self.session = None          # the night consumed this session: start a new one
        reply.slept, reply.sleep_report = True, f"{why}: {report}" if why else report
        reply.text = reply.text or report
        return reply

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows: turns, context use, session, retrieval, nights, plus
        ``status_info()`` (model version, memories)."""
        used = self.context_used()
        info = {"user": self.user_id, "turns": self.turns,
                "context": f"{used} / {self.cfg.context_tokens} tokens "
                           f"({used / self.cfg.context_tokens:.0%})",
                "summary": "yes" if self.summary else "no",
                "session": self.session.session_id if self.session else "(new)",
                "retrieval": "on" if self.rag and self.retriever is not None else "off",
                "nights this chat": self.nights}
        if self.status_info is not None:
            info.update(self.status_info())
        return info
