"""What every agent shares: a structured or plain-text call that also yields its diary
fields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from langchain_core.prompts import ChatPromptTemplate
from pydantic import BaseModel

from langchain_core.messages import HumanMessage
from tenacity import AsyncRetrying, stop_after_attempt

from reverie.runtime.structured import (StructuredOutputError, acall_structured,
                                        constrains_decoding, format_instructions)


@dataclass
class AgentCall:
    """A finished agent call: ``parsed`` is ``None`` when no valid object came back
    (``error`` says why); the rest goes to the diary."""

    parsed: Any
    raw: str
    prompt: list[dict]
    model: str
    temperature: float | None
    duration_s: float
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 1
    error: str = ""
    # what the checks made after the call dropped or changed (models not grammar-bound)
    checks: list[str] = field(default_factory=list)

    def diary_fields(self) -> dict:
        return {"model": self.model, "temperature": self.temperature, "prompt": self.prompt,
                "raw_output": self.raw, "duration_s": round(self.duration_s, 3),
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "attempts": self.attempts, "error": self.error, "checks": self.checks,
                "parsed": self.parsed.model_dump(mode="json") if isinstance(self.parsed, BaseModel)
                else self.parsed}


def model_name(model) -> str:
    loaded = getattr(model, "loaded", None)
    if loaded is not None:
        return f"{loaded.name} ({loaded.source})"
    return str(getattr(model, "model_name", None) or getattr(model, "model", None)
               or type(model).__name__)


async def call(model, prompt: ChatPromptTemplate, variables: dict, schema: type[BaseModel],
               role: str, attempts: int, grammar: dict | None = None) -> AgentCall:
    """Render ``prompt`` with ``variables`` and ask ``model`` for a ``schema`` object.

    Never raises for a bad model answer: after ``attempts`` tries the call comes back with
    ``parsed=None`` and the error, so one confused candidate cannot stop the night.

    A model that cannot be grammar-constrained (any LangChain model but ours) gets
    LangChain's format instructions for ``schema`` after the prompt, and the diary shows
    them; ``grammar``'s narrower checks are then the caller's to make on the answer
    (:func:`reverie.runtime.structured.violations`).
    """
    messages = prompt.format_messages(**variables)
    if not constrains_decoding(model):
        if messages and messages[-1].type == "human":
            messages[-1] = HumanMessage(f"{messages[-1].content}\n\n{format_instructions(schema)}")
        else:
            messages.append(HumanMessage(format_instructions(schema)))
    rendered = [{"role": m.type, "content": m.content} for m in messages]
    start = time.perf_counter()
    try:
        reply = await acall_structured(model, schema, messages, role, attempts, grammar)
        parsed, raw, tries, usage, error = reply.parsed, reply.raw, reply.attempts, reply.usage, ""
    except StructuredOutputError as exc:
        parsed, raw, tries, usage, error = None, exc.raw, exc.attempts, {}, str(exc)
    return AgentCall(parsed, raw, rendered, model_name(model), getattr(model, "temperature", None),
                     time.perf_counter() - start, usage.get("input_tokens", 0),
                     usage.get("output_tokens", 0), tries, error)


async def call_text(model, prompt: ChatPromptTemplate, variables: dict, role: str,
                    attempts: int = 2, parse: Callable[[str], Any] | None = None) -> AgentCall:
    """Render ``prompt`` with ``variables`` and ask ``model`` for plain text (no JSON: a small
    model reads and writes better in free lines, "Let Me Speak Freely?", arXiv 2408.02442).

    ``parse(text)`` turns the answer into the call's ``parsed`` value. A model error is
    retried (tenacity, ``attempts`` tries); the call never raises for one: it comes back
    with ``parsed=None`` and the error, so one failed turn cannot stop the night.
    """
    messages = prompt.format_messages(**variables)
    rendered = [{"role": m.type, "content": m.content} for m in messages]
    start = time.perf_counter()
    raw, usage, error, tries = "", {}, "", 0
    try:
        async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), reraise=True):
            with attempt:
                tries = attempt.retry_state.attempt_number
                reply = await model.ainvoke(messages)
                raw, usage = str(reply.content), getattr(reply, "usage_metadata", None) or {}
    except Exception as exc:  # noqa: BLE001 - any model failure is noted, not raised
        error = f"role {role}: {type(exc).__name__}: {exc}"
    parsed = parse(raw) if parse is not None and not error else (raw if not error else None)
    return AgentCall(parsed, raw, rendered, model_name(model), getattr(model, "temperature", None),
                     time.perf_counter() - start, usage.get("input_tokens", 0),
                     usage.get("output_tokens", 0), tries, error)
