"""Structured output: pydantic objects from chat models, valid even from a 135M model.

For MLX models, decoding is constrained by a JSON-schema grammar (llguidance computes the
allowed-token mask for each step; the mask is applied on the CPU with NumPy + ``mx.where``,
since llguidance's own MLX kernel is Metal-only). The text is then validated with pydantic:
grammars do not enforce every constraint (e.g. numeric bounds), and generation can stop at
``max_tokens`` mid-object. A failed attempt is retried (tenacity); after the last attempt a
:class:`StructuredOutputError` names the role, the schema and what came back.

Any other LangChain chat model goes through its own ``with_structured_output``, with the
same retries and error.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ValidationError
from tenacity import Retrying, AsyncRetrying, retry_if_exception_type, stop_after_attempt

# Compact separators with no free whitespace: small models otherwise pad JSON with
# newlines until max_tokens runs out.
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class StructuredOutputError(RuntimeError):
    """A model did not return a valid object after every attempt.

    Attributes:
        role: the agent role that asked (e.g. ``"verifier"``), or ``None``.
        schema: the schema's name.
        raw: the last text the model returned.
        attempts: how many attempts were made.
    """

    def __init__(self, role: str | None, schema: str, raw: str, attempts: int, reason: str):
        self.role, self.schema, self.raw, self.attempts = role, schema, raw, attempts
        shown = raw if len(raw) <= 400 else raw[:400] + f"... ({len(raw)} chars)"
        super().__init__(f"role {role or '?'}: no valid {schema} after {attempts} attempt(s): "
                         f"{reason}; last output: {shown!r}")


class _Invalid(Exception):
    def __init__(self, raw: str, reason: str):
        super().__init__(reason)
        self.raw, self.reason = raw, reason


def schema_name(schema: Any) -> str:
    if isinstance(schema, type):
        return schema.__name__
    return str(schema.get("title", "object")) if isinstance(schema, dict) else repr(schema)


def json_schema(schema: type[BaseModel] | dict) -> dict:
    """The JSON schema of a pydantic model class, or a JSON-schema dict unchanged.

    A pydantic model's objects get ``additionalProperties: false`` and every property
    required (pydantic ignores extra keys and fills defaults, but a grammar that allows
    either lets a small model invent keys or skip content until max_tokens).
    """
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return _closed(schema.model_json_schema())
    if isinstance(schema, dict):
        return schema
    raise TypeError(f"schema must be a pydantic model class or a JSON-schema dict, got {schema!r}")


def _closed(node: Any) -> Any:
    # Every object closed and every property required: a grammar that allows the model to
    # skip fields or add its own lets a small model wander off the schema.
    if isinstance(node, dict):
        node = {k: _closed(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
            node["required"] = list(node["properties"])
    elif isinstance(node, list):
        node = [_closed(v) for v in node]
    return node


def parse(schema: type[BaseModel] | dict, text: str) -> Any:
    """Validate ``text`` (JSON) against ``schema``: a model instance, or a dict for a dict schema.

    Raises:
        ValueError: not JSON, or not valid for the schema (pydantic's message).
    """
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        try:
            return schema.model_validate_json(text)
        except ValidationError as exc:
            raise ValueError(str(exc)) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc


class GrammarProcessor:
    """An mlx-lm logits processor that masks every token the grammar does not allow next.

    Called once per generated token with ``(tokens, logits)``, logits of shape (1, vocab);
    from the second call on, ``tokens[-1]`` is the token sampled after the previous call,
    which advances the grammar. Once the grammar is complete only end-of-sequence is allowed.

    Args:
        ll_tokenizer: an ``llguidance.LLTokenizer`` for the model's tokenizer.
        grammar: an llguidance grammar (e.g. from ``LLMatcher.grammar_from_json_schema``).

    Raises:
        ValueError: the grammar does not compile.
    """

    def __init__(self, ll_tokenizer, grammar: str):
        import llguidance
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"grammar does not compile: {self.matcher.get_error()}")
        self.n_vocab = ll_tokenizer.vocab_size
        self.mask = allocate_token_bitmask(1, self.n_vocab)
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        if self.started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        fill_next_token_bitmask(self.matcher, self.mask, 0)
        allowed = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: self.n_vocab]
        vocab = logits.shape[-1]
        if vocab > self.n_vocab:  # padded embedding rows are never allowed
            allowed = np.concatenate([allowed, np.zeros(vocab - self.n_vocab, np.uint8)])
        return mx.where(mx.array(allowed[:vocab].astype(bool)), logits,
                        mx.array(-float("inf"), logits.dtype))



def _check(result: Any, schema) -> Any:
    # MLXChatModel returns an AIMessage; other models' with_structured_output(include_raw=True)
    # return {"raw", "parsed", "parsing_error"}.
    if isinstance(result, dict) and "raw" in result:
        raw = getattr(result["raw"], "content", "") or ""
        if result.get("parsing_error") is not None or result.get("parsed") is None:
            raise _Invalid(str(raw), str(result.get("parsing_error") or "no object returned"))
        parsed = result["parsed"]
        if isinstance(schema, type) and not isinstance(parsed, schema):
            try:
                parsed = schema.model_validate(parsed)
            except ValidationError as exc:
                raise _Invalid(str(raw), str(exc)) from exc
        return parsed
    text = getattr(result, "content", result)
    try:
        return parse(schema, text)
    except ValueError as exc:
        raise _Invalid(text, str(exc)) from exc


def invoke_with_retries(invoke: Callable[[], Any], schema, role: str | None, attempts: int) -> Any:
    """Call ``invoke()`` up to ``attempts`` times until its result validates against ``schema``.

    Raises:
        StructuredOutputError: every attempt failed; names role, schema and the last output.
    """
    try:
        for attempt in Retrying(stop=stop_after_attempt(attempts), reraise=True,
                                retry=retry_if_exception_type(_Invalid)):
            with attempt:
                try:
                    result = invoke()
                except Exception as exc:
                    raise _invalid(exc) from exc
                return _check(result, schema)
    except _Invalid as exc:
        raise StructuredOutputError(role, schema_name(schema), exc.raw, attempts, exc.reason) from exc


def structured(model, schema: type[BaseModel] | dict, role: str | None = None, attempts: int = 3):
    """A runnable that turns messages into a validated ``schema`` object, for any chat model.

    MLX chat models decode under a grammar; any other LangChain chat model uses its own
    ``with_structured_output(schema, include_raw=True)``. Both retry ``attempts`` times and
    then raise :class:`StructuredOutputError`.
    """
    from langchain_core.runnables import RunnableLambda

    if constrains_decoding(model):
        return model.with_structured_output(schema, role=role, attempts=attempts)
    try:
        inner = model.with_structured_output(schema, include_raw=True)
    except NotImplementedError:  # no tool calling or JSON mode: validate the plain text
        inner = model

    def call(messages):
        return invoke_with_retries(lambda: inner.invoke(messages), schema, role, attempts)

    async def acall(messages):
        return (await acall_structured(model, schema, messages, role, attempts)).parsed

    return RunnableLambda(call, afunc=acall, name=f"structured[{schema_name(schema)}]")


class StructuredReply:
    """The outcome of :func:`acall_structured`: the object, the raw text of the last attempt,
    how many attempts it took and the token usage summed over attempts."""

    def __init__(self, parsed: Any, raw: str, attempts: int, usage: dict):
        self.parsed, self.raw, self.attempts, self.usage = parsed, raw, attempts, usage


def violations(schema: dict, obj: Any) -> list[str]:
    """Where ``obj`` (JSON data: dicts, lists, strings, numbers) breaks the JSON ``schema``:
    one message per error, prefixed with its path (``"turns.0: 't9' is not one of [...]"``),
    ``[]`` when it conforms. The check a grammar makes while decoding, made after the call
    for a model that cannot be constrained (jsonschema, draft 2020-12)."""
    from jsonschema import Draft202012Validator

    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {_short(e.message)}"
            for e in sorted(Draft202012Validator(schema).iter_errors(obj), key=str)]


def _short(message: str, limit: int = 200) -> str:
    # an enum of 600 answer spans would otherwise fill the diary
    return message if len(message) <= limit else message[:limit] + " ..."


def format_instructions(schema: type[BaseModel]) -> str:
    """LangChain's instructions for answering as a ``schema`` object (its
    ``PydanticOutputParser``'s), for a model that cannot be constrained and may not honour
    an API's JSON-schema option (``mlx_lm.server`` ignores ``response_format``)."""
    from langchain_core.output_parsers import PydanticOutputParser

    return PydanticOutputParser(pydantic_object=schema).get_format_instructions()


def _invalid(exc: Exception) -> Exception:
    """What to raise for a model's exception: an invalid answer (retried), or ``exc``."""
    return _Invalid(_text_of(exc), f"{type(exc).__name__}: {exc}") if answer_error(exc) else exc


def _text_of(exc: Exception) -> str:
    # the answer's text, for the diary, where the exception carries it: LangChain's
    # OutputParserException.llm_output, openai's finish-reason errors' .completion
    text = getattr(exc, "llm_output", None)
    if text is None:
        choices = getattr(getattr(exc, "completion", None), "choices", None) or []
        text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
    return str(text or "")


def answer_error(exc: BaseException) -> bool:
    """Whether a chat model's exception is about its answer (retry it, then report the
    role's answer as invalid) rather than about reaching the model (let it stop the call):
    LangChain's output-parser errors, validation errors (``ValueError``), and clients'
    finish-reason errors, e.g. openai's ``LengthFinishReasonError`` when an answer is cut
    at ``max_tokens`` before its JSON closes."""
    from langchain_core.exceptions import OutputParserException

    return (isinstance(exc, (OutputParserException, ValueError))
            or type(exc).__name__.endswith("FinishReasonError"))


def constrains_decoding(model) -> bool:
    """Whether ``model`` decodes under a JSON-schema grammar bound as ``json_schema=``
    (:class:`~reverie.runtime.chat_model.MLXChatModel` does; other LangChain models use their
    own ``with_structured_output``)."""
    return bool(getattr(model, "constrains_decoding", False))


def _raw_runnable(model, schema, grammar: dict | None):
    if constrains_decoding(model):
        return model.bind(json_schema=grammar or json_schema(schema))
    try:
        return model.with_structured_output(schema, include_raw=True)
    except NotImplementedError:  # no tool calling or JSON mode: validate the plain text
        return model


async def acall_structured(model, schema: type[BaseModel], messages, role: str | None,
                           attempts: int = 3, grammar: dict | None = None) -> StructuredReply:
    """Ask any chat model for a ``schema`` object, keeping the raw text for the diary.

    Args:
        model: an :class:`MLXChatModel` (decoding constrained by ``grammar``, default the
            schema's own JSON schema) or any LangChain chat model.
        grammar: a JSON schema narrower than ``schema``'s (e.g. cited turn ids as an enum).

    Raises:
        StructuredOutputError: no valid object after ``attempts`` tries.
    """
    runnable = _raw_runnable(model, schema, grammar)
    usage = {"input_tokens": 0, "output_tokens": 0}
    try:
        async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), reraise=True,
                                           retry=retry_if_exception_type(_Invalid)):
            with attempt:
                try:
                    result = await runnable.ainvoke(messages)
                except Exception as exc:
                    raise _invalid(exc) from exc
                message = result["raw"] if isinstance(result, dict) and "raw" in result else result
                for key in usage:
                    usage[key] += (getattr(message, "usage_metadata", None) or {}).get(key, 0)
                raw = str(getattr(message, "content", message))
                try:
                    parsed = _check(result, schema)
                except _Invalid as exc:
                    raise _Invalid(raw, exc.reason) from exc
                return StructuredReply(parsed, raw, attempt.retry_state.attempt_number, usage)
    except _Invalid as exc:
        raise StructuredOutputError(role, schema_name(schema), exc.raw, attempts, exc.reason) from exc
