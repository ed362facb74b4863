"""A langchain-core chat model over a local MLX model and its batching engine.

``MLXChatModel`` renders messages through the model's chat template, generates on the
shared :class:`~reverie.runtime.engine.Engine` (concurrent calls, sync or async, share
forward passes), supports per-call ``temperature``, ``top_p``, ``min_p``, ``max_tokens`` and
``stop``, streaming, token counts in ``usage_metadata``, and ``with_structured_output``
through grammar-constrained decoding. Agents only see LangChain's ``BaseChatModel``, so any
other LangChain chat model can stand in for it.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, ClassVar, Iterator, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableLambda
from pydantic import ConfigDict, Field

from reverie.runtime.engine import SamplingParams, Token
from reverie.runtime import structured as so

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> ``[{"role", "content"}]`` for a chat template (text parts only)."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p if isinstance(p, str) else p.get("text", "") for p in content)
        out.append({"role": _ROLES.get(m.type, "user"), "content": content})
    return out


class _StopScanner:
    """Finds stop strings in streamed text, holding back a tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit now, whether a stop string was found)."""
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - self.hold))
                                for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._flush(len(self.text)), True
        return self._flush(max(self.emitted, len(self.text) - self.hold)), False

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        out, self.emitted = self.text[self.emitted: upto], max(self.emitted, upto)
        return out


class _Decoder:
    """Token ids -> text pieces, ending at end-of-sequence, ``max_tokens`` or a stop string."""

    def __init__(self, detokenizer, stops: Sequence[str]):
        self.detok, self.scanner = detokenizer, _StopScanner(stops)
        self.n, self.done = 0, False

    def feed(self, token: Token) -> list[tuple[str, int, str | None]]:
        """Returns ``[(piece, tokens so far, finish reason or None)]``; sets ``done`` at the end."""
        self.n += 1
        reason = token.finish_reason
        if reason != "stop":  # an end-of-sequence token is not part of the text
            self.detok.add_token(token.id)
        if reason is not None:
            self.detok.finalize()
        piece, stopped = self.scanner.push(self.detok.last_segment)
        if stopped:
            self.done = True
            return [(piece, self.n, "stop")]
        if reason is not None:
            self.done = True
            return [(piece + self.scanner.finish(), self.n, reason)]
        return [(piece, self.n, None)] if piece else []


class MLXChatModel(BaseChatModel):
    """LangChain chat model on a loaded MLX model (see :class:`reverie.runtime.models.LoadedModel`).

    Args:
        loaded: the model, tokenizer and engine (several chat models may share one).
        role: the agent role using it, named in errors and the diary.
        temperature, top_p, min_p: sampling defaults (mlx-lm's ``make_sampler``).
        max_tokens: generated-token limit per call.
        stop: stop strings (the text is cut before the first match).
        structured_attempts: tries for ``with_structured_output`` before it raises.

    Every call may override these with keyword arguments of the same names.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    loaded: Any = Field(exclude=True)
    role: Optional[str] = None
    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 256
    stop: Optional[list[str]] = None
    structured_attempts: int = 3
    # structured.py binds a JSON schema as a decoding grammar on models that say so
    constrains_decoding: ClassVar[bool] = True

    @property
    def _llm_type(self) -> str:
        return "reverie-mlx"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.loaded.name, "role": self.role, "temperature": self.temperature,
                "top_p": self.top_p, "min_p": self.min_p, "max_tokens": self.max_tokens}

    # -- request building -------------------------------------------------------------
    def _request(self, messages, stop, kwargs):
        params = {k: kwargs.pop(k, getattr(self, k)) for k in ("temperature", "top_p", "min_p",
                                                               "max_tokens")}
        schema = kwargs.pop("json_schema", None)
        if kwargs:
            raise TypeError(f"unexpected generation arguments: {', '.join(kwargs)}")
        prompt = self.loaded.encode_chat(to_chat_messages(messages))
        processors = [self.loaded.grammar_processor(schema)] if schema is not None else []
        sampling = SamplingParams(params["temperature"], params["top_p"], params["min_p"])
        stops = list(stop or self.stop or [])
        return prompt, params["max_tokens"], sampling, processors, stops

    def _finish(self, text: str, prompt: list[int], n_tokens: int, reason: str) -> dict:
        return {
            "usage_metadata": {"input_tokens": len(prompt), "output_tokens": n_tokens,
                               "total_tokens": len(prompt) + n_tokens},
            "response_metadata": {"model_name": self.loaded.name, "finish_reason": reason,
                                  "role": self.role},
        }

    # -- sync -------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None,
                  **kwargs: Any) -> ChatResult:
        chunks = list(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        return self._result(chunks)

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        prompt, max_tokens, sampling, processors, stops = self._request(messages, stop, kwargs)
        handle = self.loaded.engine.submit(prompt, max_tokens, sampling, processors)
        decoder = _Decoder(self.loaded.tokenizer.detokenizer, stops)
        try:
            for token in handle:
                for piece, n, reason in decoder.feed(token):
                    chunk = self._chunk(piece, prompt, n, reason)
                    if run_manager and piece:
                        run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
                if decoder.done:
                    break
        finally:
            handle.cancel()

    # -- async ------------------------------------------------------------------------
    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                         **kwargs: Any) -> ChatResult:
        chunks = [c async for c in self._astream(messages, stop=stop, run_manager=run_manager,
                                                 **kwargs)]
        return self._result(chunks)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        prompt, max_tokens, sampling, processors, stops = self._request(messages, stop, kwargs)
        handle = self.loaded.engine.asubmit(prompt, max_tokens, sampling, processors)
        decoder = _Decoder(self.loaded.tokenizer.detokenizer, stops)
        try:
            async for token in handle:
                for piece, n, reason in decoder.feed(token):
                    chunk = self._chunk(piece, prompt, n, reason)
                    if run_manager and piece:
                        await run_manager.on_llm_new_token(piece, chunk=chunk)
                    yield chunk
                if decoder.done:
                    break
        finally:
            handle.cancel()

    # -- helpers ----------------------------------------------------------------------
    def _chunk(self, piece: str, prompt: list[int], n: int, reason: str | None) -> ChatGenerationChunk:
        if reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=piece))
        meta = self._finish("", prompt, n, reason)
        return ChatGenerationChunk(message=AIMessageChunk(
            content=piece, usage_metadata=meta["usage_metadata"],
            response_metadata=meta["response_metadata"], chunk_position="last"),
            generation_info={"finish_reason": reason})

    @staticmethod
    def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
        final = chunks[-1].message
        text = "".join(c.message.content for c in chunks)
        message = AIMessage(content=text, usage_metadata=final.usage_metadata,
                            response_metadata=final.response_metadata)
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info=chunks[-1].generation_info)])

    def with_structured_output(self, schema, *, include_raw: bool = False,
                               method: str = "json_schema", strict: bool | None = None,
                               role: str | None = None, attempts: int | None = None,
                               **kwargs: Any):
        """A runnable returning a validated ``schema`` object (pydantic class or JSON schema),
        with LangChain's standard arguments.

        Decoding is constrained to a JSON grammar; the text is validated with pydantic and
        retried up to ``attempts`` times (default ``structured_attempts``). With
        ``include_raw`` the result is ``{"raw", "parsed", "parsing_error"}`` and nothing is
        retried or raised.

        Args:
            method: ``"json_schema"`` (default) and ``"function_calling"`` decode under the
                schema's grammar (a local model has no tool-calling protocol to go through;
                the grammar gives the same object); ``"json_mode"`` decodes any JSON object
                and validates it against ``schema`` afterwards.
            strict: ``True`` or ``None``: every property required and no other keys (what
                small models need, :func:`~reverie.runtime.structured.json_schema`);
                ``False``: the schema as given (optional fields may be left out).

        Raises:
            ValueError: an unknown ``method`` (at once).
            StructuredOutputError: (when invoked) no valid object after every attempt;
                names the role, the schema and the last output.
        """
        if kwargs:
            raise TypeError(f"unsupported arguments: {', '.join(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method must be json_schema, function_calling or json_mode, "
                             f"got {method!r}")
        if method == "json_mode":
            grammar = {"type": "object"}
        elif strict is False and isinstance(schema, type):
            grammar = schema.model_json_schema()
        else:
            grammar = so.json_schema(schema)
        bound = self.bind(json_schema=grammar)
        role = role or self.role
        attempts = attempts or self.structured_attempts
        name = f"structured[{so.schema_name(schema)}]"
        if include_raw:
            def raw(messages):
                return _raw_result(bound.invoke(messages), schema)

            async def araw(messages):
                return _raw_result(await bound.ainvoke(messages), schema)

            return RunnableLambda(raw, afunc=araw, name=name)

        def call(messages):
            return so.invoke_with_retries(lambda: bound.invoke(messages), schema, role, attempts)

        async def acall(messages):
            return (await so.acall_structured(self, schema, messages, role, attempts,
                                              grammar=grammar)).parsed

        return RunnableLambda(call, afunc=acall, name=name)


def _raw_result(message: AIMessage, schema) -> dict:
    try:
        return {"raw": message, "parsed": so.parse(schema, message.content), "parsing_error": None}
    except ValueError as exc:
        return {"raw": message, "parsed": None, "parsing_error": exc}
