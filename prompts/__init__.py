"""Agent prompts as data files (YAML: ``system`` and ``user`` templates with ``{variables}``,
and optionally ``examples``: worked examples as literal user/assistant turns between them).

A user customises an agent by copying its file into the folder named by ``prompts.dir`` in
``config.yaml`` and editing it; :func:`load_prompt` prefers that copy, and checks that it
still uses every variable the agent fills in.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from langchain_core.prompts import ChatPromptTemplate

DEFAULT_DIR = Path(__file__).resolve().parent
CHAT_VARIABLES = frozenset({"identity", "memories", "summary", "message"})
"""The variables of ``chat.yaml``, the day chat's prompt."""


class PromptError(ValueError):
    """A prompt file is missing, malformed, or lacks a variable its agent fills in."""


@dataclass(frozen=True)
class PromptFile:
    """A prompt's source: which file, and whether it overrides the shipped default."""

    name: str
    path: Path
    override: bool


def names() -> list[str]:
    """Names of the shipped prompts (file stems)."""
    return sorted(p.stem for p in DEFAULT_DIR.glob("*.yaml"))


def locate(name: str, override_dir: Path | None = None) -> PromptFile:
    """The file used for prompt ``name``: ``override_dir/name.yaml`` if present, else the default."""
    if override_dir is not None:
        candidate = Path(override_dir) / f"{name}.yaml"
        if candidate.is_file():
            return PromptFile(name, candidate, True)
    default = DEFAULT_DIR / f"{name}.yaml"
    if not default.is_file():
        raise PromptError(f"no prompt named {name!r} (known: {', '.join(names())})")
    return PromptFile(name, default, False)


def variables(template: str) -> set[str]:
    """The ``{variable}`` names used in a template (``{{`` and ``}}`` are literal braces)."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def load_prompt(name: str, required: set[str] | frozenset[str] = frozenset(),
                override_dir: Path | None = None) -> ChatPromptTemplate:
    """Load prompt ``name`` as a langchain-core ``ChatPromptTemplate``.

    Args:
        name: file stem (``dreamer``, ``verifier``, ...).
        required: variables the agent fills in; each must appear in the file.
        override_dir: the user's prompt folder (config ``prompts.dir``), searched first.

    Raises:
        PromptError: names the file and what is wrong (not YAML, no ``user`` template, an
            unknown or missing variable).
    """
    source = locate(name, override_dir)
    try:
        data = yaml.safe_load(source.path.read_text())
    except yaml.YAMLError as exc:
        raise PromptError(f"{source.path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        raise PromptError(f"{source.path}: needs a 'user' template (and optionally 'system')")
    system = data.get("system") or ""
    used = variables(system) | variables(data["user"])
    missing = set(required) - used
    unknown = used - set(required) if required else set()
    if missing:
        raise PromptError(f"{source.path}: missing variable(s) {', '.join(sorted(missing))} "
                          f"that the {name} agent fills in")
    if unknown:
        raise PromptError(f"{source.path}: unknown variable(s) {', '.join(sorted(unknown))}; "
                          f"the {name} agent fills in only {', '.join(sorted(required))}")
    messages = ([("system", system)] if system else []) + examples(data, source.path)
    return ChatPromptTemplate.from_messages(messages + [("user", data["user"])])


def examples(data: dict, path: Path) -> list:
    """A prompt file's ``examples`` (a list of ``{user, assistant}`` mappings) as literal
    langchain-core messages: worked examples shown as earlier turns of the conversation,
    which a small model follows more closely than examples described in the instructions.
    Their text is not a template (braces are kept as written).

    Raises:
        PromptError: ``examples`` is not a list of mappings with ``user`` and ``assistant``
            strings (names the file and the example's number, from 1).
    """
    from langchain_core.messages import AIMessage, HumanMessage

    items = data.get("examples") or []
    if not isinstance(items, list):
        raise PromptError(f"{path}: 'examples' must be a list of {{user, assistant}} mappings")
    out = []
    for n, item in enumerate(items, 1):
        if not (isinstance(item, dict) and isinstance(item.get("user"), str)
                and isinstance(item.get("assistant"), str)):
            raise PromptError(f"{path}: example {n} needs 'user' and 'assistant' strings")
        out += [HumanMessage(item["user"]), AIMessage(item["assistant"])]
    return out


@dataclass(frozen=True)
class ChatFrame:
    """How the day chat frames a turn: ``chat.yaml`` around the identity's system prompt.

    One place for the prompt the user's questions arrive in, so that what the night trains
    on (fact, identity and rehearsal rows), what the gate and ``reverie eval`` ask, and what
    the chat sends are the same text. Closed book: no memories, no summary.

    Args:
        template: the loaded ``chat`` prompt (:data:`CHAT_VARIABLES`).
        identity: the identity's system prompt (``Identity.system_prompt()``).
    """

    template: ChatPromptTemplate
    identity: str

    def render(self, message: str, memories: str = "", summary: str = "") -> list:
        """langchain-core messages of one turn; an empty system turn is left out, so the
        chat template's own default applies."""
        rendered = self.template.format_messages(identity=self.identity, memories=memories,
                                                 summary=summary, message=message)
        return [m for m in rendered if not (m.type == "system" and not str(m.content).strip())]

    def messages(self, question: str, remembered: Sequence[str] = ()) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` of one turn, for a tokenizer's chat template: closed
        book, or with ``remembered`` lines in the system prompt as retrieval puts them."""
        from reverie.runtime.chat_model import to_chat_messages

        return to_chat_messages(self.render(question, memories=memories_section(remembered)))

    def reframe(self, rows: Sequence[dict]) -> list[dict]:
        """Chat rows (``{"messages": [user, assistant]}``) with their user turn framed."""
        out = []
        for row in rows:
            turns = row["messages"]
            out.append({**row, "messages": self.messages(turns[-2]["content"]) + turns[-1:]})
        return out


def question_turns(question: str, frame: ChatFrame | None = None) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` of a closed-book question: framed as the chat frames it, or
    with ``frame`` None a bare user turn (the chat template's own default system prompt)."""
    return frame.messages(question) if frame is not None else [{"role": "user", "content": question}]


def memories_section(lines: Sequence[str]) -> str:
    """The system prompt's memories part, as the chat writes it ("" for none)."""
    block = "\n".join(f"- {line}" for line in lines)
    return f"\n\nWhat you remember about the user:\n{block}" if block else ""


def load_chat_frame(identity: str, override_dir: Path | None = None) -> ChatFrame:
    """The chat's frame from ``chat.yaml`` (the user's copy first) and an identity's system
    prompt. Raises :class:`PromptError` as :func:`load_prompt`."""
    return ChatFrame(load_prompt("chat", CHAT_VARIABLES, override_dir), identity)


def chat_frame(settings) -> ChatFrame:
    """The day chat's frame for a :class:`reverie.config.Settings`: its prompt file (the
    user's copy first) around the identity file's system prompt. What the chat asks in,
    the night trains in and the gate asks in."""
    from reverie.memory.identity import load_identity

    identity = load_identity(settings.identity_file or settings.paths.identity)
    return load_chat_frame(identity.system_prompt(), settings.prompts.dir)
