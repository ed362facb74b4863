"""Wiring the day side to the configured models and the data directory (used by the CLI).

:class:`Day` holds the runtime (the active model version), the user's retriever and the
``sleep`` callable the CLI hands it; :meth:`Day.chat` builds a
:class:`~reverie.wake.chat.ChatSession` on them.
"""

from __future__ import annotations

from typing import Callable

from reverie.memory.daylog import DayLog
from reverie.memory.identity import load_identity
from reverie.prompts import load_prompt
from reverie.config import Settings
from reverie.training.versions import Versions, learned_folders
from reverie.wake.chat import CHAT_VARIABLES, COMPACT_VARIABLES, ChatSession


def night_report(summary: dict) -> str:
    """One line about a finished night: memories and what happened to the model."""
    forge = summary.get("forge", {})
    if forge.get("promoted"):
        model = f"promoted {forge['version']}"
    elif forge.get("pre"):
        model = f"kept {forge.get('parent')} ({'; '.join(forge.get('reasons', []))})"
    else:
        model = f"unchanged ({forge.get('skipped') or 'nothing to learn'})"
    return (f"night {summary['night_id']}: {summary['memories_added']} memories added, "
            f"{summary['superseded']} superseded, {summary['deleted']} deleted; model {model}")


class Day:
    """The day model and the user's stores.

    Args:
        settings: the configuration.
        user_id: whose chat this is.
        runtime: a :class:`~reverie.runtime.models.Runtime` (default: one on the active
            version's folder).
        sleep: ``sleep(user_id)`` runs the night for that user and returns its summary
            (the CLI hands one in: the day never imports the night); ``None``: the chat's
            ``/sleep`` says it cannot.

    Call :meth:`close` when done (stops the model's engine thread).
    """

    def __init__(self, settings: Settings, user_id: str, runtime=None,
                 sleep: Callable[[str], dict] | None = None):
        from reverie.runtime.models import Runtime

        self.settings, self.user_id = settings, user_id
        self.runtime = runtime or Runtime(settings, learned_folders(settings))
        self._sleep = sleep
        self.last_night: dict | None = None
        self._retriever = None

    @property
    def role(self) -> str:
        return self.settings.wake.role

    def chat_model(self):
        """The ``wake.role`` chat model on the active version (a langchain-core model)."""
        return self.runtime.chat_model(self.role)

    def count_tokens(self, messages) -> int:
        """Prompt tokens as the model's chat template renders ``messages`` (a LangChain
        model's own estimate for a model Reverie does not run)."""
        from reverie.config import is_local
        from reverie.runtime.chat_model import to_chat_messages

        name = self.settings.roles[self.role].model
        if not is_local(self.settings.models.chat[name]):
            return self.chat_model().get_num_tokens_from_messages(messages)
        loaded = self.runtime.load(name)
        return len(loaded.encode_chat(to_chat_messages(messages)))

    def version(self) -> str:
        """The active model version ("base" before any night promoted one)."""
        return Versions(self.settings.paths.versions).active() or "base"

    def stale(self) -> bool:
        """Whether the active version is not the one the runtime loads (a night in another
        process promoted or rolled back one); :meth:`load_active` then catches up."""
        return learned_folders(self.settings) != self.runtime.folders

    def load_active(self) -> None:
        """Unload the chat models so that their next use loads the active version (waits
        for generations in flight on the old weights: their engines finish them)."""
        self.runtime.reload(learned_folders(self.settings))

    def retriever(self):
        """This user's :class:`~reverie.wake.retrieval.MemoryRetriever` (opened once)."""
        if self._retriever is None:
            from reverie.wake.retrieval import open_retriever

            self._retriever = open_retriever(self.settings, self.runtime.embedder(), self.user_id)
        return self._retriever

    def memory_counts(self) -> dict[str, int]:
        """This user's memories per status (the retriever's store: one connection)."""
        return self.retriever().store.counts(self.user_id)

    def sleep(self):
        """Run the night for this user; afterwards the chat goes on with the active
        version (a new one when the night promoted it). Returns ``(chat model, report)``.

        Raises:
            RuntimeError: this day was given no ``sleep`` callable."""
        if self._sleep is None:
            raise RuntimeError("this chat has no night to run (start it with `reverie chat`)")
        before = self.version()
        summary = self._sleep(self.user_id)
        self.last_night = summary
        if self.version() != before:  # load the promoted weights
            self.runtime.reload(learned_folders(self.settings))
        else:  # the night's sleep model goes back; the chat keeps the day model
            self.runtime.release(keep=[self.settings.roles[self.role].model])
        return self.chat_model(), night_report(summary)

    def chat(self, rag: bool | None = None) -> ChatSession:
        """A chat session for this user on the active model version."""
        s = self.settings
        identity = load_identity(s.identity_file or s.paths.identity)
        return ChatSession(
            self.chat_model(), load_prompt("chat", CHAT_VARIABLES, s.prompts.dir),
            load_prompt("compact", COMPACT_VARIABLES, s.prompts.dir), identity.system_prompt(),
            DayLog(s.paths.days), self.user_id, s.wake, retriever=self.retriever(),
            rag=s.wake.rag if rag is None else rag, count_tokens=self.count_tokens,
            sleep=self.sleep,
            status_info=lambda: {"model version": self.version(),
                                 "memories": ", ".join(f"{n} {k}" for k, n in
                                                       self.memory_counts().items()) or "none"})

    def close(self) -> None:
        self.runtime.close()
