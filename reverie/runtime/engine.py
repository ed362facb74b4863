"""Continuous batching of generation requests over one loaded MLX model.

The night makes hundreds of small agent calls; on a CPU, running them one at a time leaves
most of each forward pass's matrix work unused. An :class:`Engine` owns one mlx-lm
``BatchGenerator`` on a worker thread: callers from any thread (or event loop) submit token
prompts and receive tokens as they are produced, while requests that overlap in time share
forward passes. Each request keeps its own sampler (temperature, top_p, min_p) and logits
processors (e.g. a grammar mask for structured output).

All MLX work happens on the worker thread, so callers never touch MLX state concurrently.

**Shared prefixes.** The night's agent calls share long prompt heads (a role's
instructions, then a session window's transcript; only the tail is particular to one
candidate). With ``prefix_cache_tokens > 0`` the engine finds the longest token prefix a new
prompt shares with another prompt in flight or seen recently, prefills that prefix once into
a KV cache (mlx-lm's ``make_prompt_cache``), and starts every request that shares it from a
copy of that cache, so only its own tail is prefilled (mlx-lm's ``BatchGenerator.insert``
takes per-request caches; the same idea as vLLM's automatic prefix caching and
``mlx_lm.server``'s prompt cache). Cached prefixes are kept least-recently-used first out,
within ``prefix_cache_tokens`` tokens in all.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import queue
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class Token:
    """One generated token: ``finish_reason`` is ``None``, ``"stop"`` (an end-of-sequence
    token, not part of the text) or ``"length"`` (``max_tokens`` reached)."""

    id: int
    finish_reason: str | None = None


@dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    sampler: Any
    processors: list[LogitsProcessor]
    deliver: Callable[[Token | BaseException], None]
    uid: int | None = None
    cancelled: bool = False


class GenerationError(RuntimeError):
    """Generation failed inside the engine (the original exception is the ``__cause__``)."""


@dataclass
class SamplingParams:
    """Per-request sampling settings (mlx-lm's ``make_sampler``); ``temperature`` 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0

    def key(self) -> tuple[float, float, float]:
        return (float(self.temperature), float(self.top_p), float(self.min_p))


class Handle:
    """A submitted request: iterate it for :class:`Token` objects; ``cancel()`` stops it."""

    def __init__(self, engine: "Engine", request: _Request, source):
        self._engine, self._request, self._source = engine, request, source

    def cancel(self) -> None:
        self._engine._cancel(self._request)

    def __iter__(self) -> Iterator[Token]:
        while True:
            item = self._source.get()
            if isinstance(item, BaseException):
                raise GenerationError(str(item)) from item
            yield item
            if item.finish_reason is not None:
                return

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        while True:
            item = await self._source.get()
            if isinstance(item, BaseException):
                raise GenerationError(str(item)) from item
            yield item
            if item.finish_reason is not None:
                return


@dataclass(eq=False)
class Engine:
    """Owns a model and a worker thread that batches every request submitted to it.

    Args:
        model: an mlx-lm model (``nn.Module`` returning logits of shape (B, L, vocab)).
        eos_token_ids: token ids that end a sequence (finish reason ``"stop"``).
        completion_batch_size: most sequences decoded together (mlx-lm's default 32).
        prefill_batch_size: most prompts prefilled together.
        prefill_step_size: prompt tokens per prefill chunk (bounds peak memory).
        prefix_cache_tokens: most prompt tokens held in cached shared prefixes (0: off).
        min_prefix_tokens: shortest shared prefix worth a cache of its own.
    """

    model: Any
    eos_token_ids: Sequence[int]
    completion_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
    prefix_cache_tokens: int = 0
    min_prefix_tokens: int = 48
    _inbox: "queue.Queue[_Request | None]" = field(default_factory=queue.Queue, repr=False)
    _prefixes: "OrderedDict[tuple[int, ...], list]" = field(default_factory=OrderedDict, repr=False)
    _recent: deque = field(default_factory=lambda: deque(maxlen=64), repr=False)
    _samplers: dict = field(default_factory=dict, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _live: set = field(default_factory=set, repr=False)  # ids of requests the engine holds
    stats: dict = field(default_factory=lambda: {"prompt_tokens": 0, "generated_tokens": 0,
                                                 "steps": 0, "max_batch": 0,
                                                 "cached_prompt_tokens": 0,
                                                 "prefix_prefill_tokens": 0}, repr=False)

    # -- submitting -------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None,
               processors: Sequence[LogitsProcessor] = ()) -> Handle:
        """Queue a prompt (token ids) for generation; returns a blocking-iterable handle."""
        source: queue.Queue = queue.Queue()
        return self._submit(prompt, max_tokens, sampling, processors, source, source.put)

    def asubmit(self, prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None,
                processors: Sequence[LogitsProcessor] = ()) -> Handle:
        """Like :meth:`submit`, for the running event loop: iterate with ``async for``."""
        loop = asyncio.get_running_loop()
        source: asyncio.Queue = asyncio.Queue()
        return self._submit(prompt, max_tokens, sampling, processors, source,
                            lambda item: loop.call_soon_threadsafe(source.put_nowait, item))

    def generate(self, prompt: list[int], max_tokens: int,
                 sampling: SamplingParams | None = None,
                 processors: Sequence[LogitsProcessor] = ()) -> list[Token]:
        """Blocking: all tokens of one request, the last one carrying the finish reason."""
        return list(self.submit(prompt, max_tokens, sampling, processors))

    def _submit(self, prompt, max_tokens, sampling, processors, source, deliver) -> Handle:
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        request = _Request(list(prompt), int(max_tokens), self._sampler(sampling or SamplingParams()),
                           list(processors), deliver)
        self._ensure_thread()
        with self._lock:
            self._live.add(id(request))
        self._inbox.put(request)
        return Handle(self, request, source)

    def _sampler(self, sampling: SamplingParams):
        # One sampler object per setting: rows sharing it are sampled in one batched call.
        key = sampling.key()
        with self._lock:
            if key not in self._samplers:
                temp, top_p, min_p = key
                self._samplers[key] = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0,
                                                   min_p=min_p)
            return self._samplers[key]

    def _cancel(self, request: _Request) -> None:
        request.cancelled = True
        self._inbox.put(None)  # wake the worker

    def in_flight(self) -> int:
        """Requests the engine still holds: submitted and neither finished, failed, nor
        cancelled *and* dropped from the batch by the worker (a cancelled request counts
        until the worker's next step removes it)."""
        with self._lock:
            return len(self._live)

    def _done(self, *requests: _Request) -> None:
        with self._lock:
            for r in requests:
                self._live.discard(id(r))

    def close(self) -> None:
        """Stop the worker thread after the requests in flight (idempotent)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._inbox.put(_STOP)
            thread.join()
        self._thread = None

    # -- the worker -------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reverie-engine",
                                                daemon=True)
                self._thread.start()
                _ENGINES.add(self)

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(self.model, max_tokens=1,
                              stop_tokens=[[t] for t in self.eos_token_ids],
                              completion_batch_size=self.completion_batch_size,
                              prefill_batch_size=self.prefill_batch_size,
                              prefill_step_size=self.prefill_step_size,
                              # this thread's own stream: MLX streams are thread-local
                              stream=mx.default_stream(mx.default_device()))

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX keeps streams and compiled-function caches per thread; leaving them for
            # process exit to destroy aborts the process now and then (MLX issue #3126).
            mx.clear_streams()

    def _loop(self) -> None:
        gen = self._new_generator()
        active: dict[int, _Request] = {}
        while True:
            # Block only when idle; otherwise take whatever arrived since the last step.
            incoming = [self._inbox.get()] if not active else []
            while True:
                try:
                    incoming.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if any(r is _STOP for r in incoming) and not active:
                gen.close()
                return
            self._done(*(r for r in incoming if isinstance(r, _Request) and r.cancelled))
            new = [r for r in incoming if isinstance(r, _Request) and not r.cancelled]
            if new:
                try:
                    heads = [self._shared_prefix(r.prompt, [o.prompt for o in new if o is not r])
                             for r in new]
                except Exception as exc:  # a failed prefix prefill: these requests fail
                    self._done(*new)  # before delivering: a caller may check in_flight() next
                    for r in new:
                        r.deliver(exc)
                    continue
                uids = gen.insert([r.prompt[len(h):] for r, (h, _) in zip(new, heads)],
                                  max_tokens=[r.max_tokens for r in new],
                                  caches=[c for _, c in heads],
                                  all_tokens=[list(h) for h, _ in heads],
                                  samplers=[r.sampler for r in new],
                                  logits_processors=[r.processors for r in new])
                for uid, r in zip(uids, new):
                    r.uid = uid
                    active[uid] = r
                    self.stats["prompt_tokens"] += len(r.prompt)
                for h, _ in heads:
                    self.stats["cached_prompt_tokens"] += len(h)
            gone = [uid for uid, r in active.items() if r.cancelled]
            if gone:
                gen.remove(gone)
                for uid in gone:
                    self._done(active.pop(uid))
            if not active:
                if any(r is _STOP for r in incoming):
                    gen.close()
                    return
                continue
            try:
                responses = gen.next_generated()
            except Exception as exc:  # a processor or the model failed: fail the batch, go on
                self._done(*active.values())
                for r in active.values():
                    r.deliver(exc)
                active.clear()
                gen.close()
                gen = self._new_generator()
                continue
            self.stats["steps"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(responses))
            for resp in responses:
                r = active.get(resp.uid)
                if r is None:
                    continue
                self.stats["generated_tokens"] += 1
                if resp.finish_reason is not None:
                    self._done(active.pop(resp.uid))
                r.deliver(Token(int(resp.token), resp.finish_reason))
            if any(r is _STOP for r in incoming):
                self._inbox.put(_STOP)  # stop once the requests in flight are done


    # -- shared prefixes (worker thread only) -------------------------------------------
    def _shared_prefix(self, prompt: list[int], others: list[list[int]]) -> tuple[tuple[int, ...], Any]:
        """``(prefix, cache)``: a KV cache holding ``prefix`` (a head of ``prompt`` shared
        with another prompt) for this request to start from, or ``((), None)``."""
        if self.prefix_cache_tokens <= 0:
            return (), None
        # at least one token must stay for the request itself to prefill
        best = max((k for k in self._prefixes if len(k) < len(prompt) and _starts(prompt, k)),
                   key=len, default=())
        shared = max((_common(prompt, o) for o in [*others, *self._recent]), default=0)
        shared = min(shared, len(prompt) - 1)
        self._recent.append(prompt)
        if shared >= self.min_prefix_tokens and shared > len(best) + self.min_prefix_tokens // 2:
            prefix = tuple(prompt[:shared])
            cache = self._prefill(prefix, best)
            # a prefix over the whole budget is not kept: this request alone uses it
            return prefix, copy.deepcopy(cache) if prefix in self._prefixes else cache
        if not best:
            return (), None
        self._prefixes.move_to_end(best)
        return best, copy.deepcopy(self._prefixes[best])

    def _prefill(self, prefix: tuple[int, ...], start: tuple[int, ...]) -> list:
        """The KV cache of ``prefix``, continuing from the cached ``start`` (a head of it);
        kept among the cached prefixes, oldest out first, within the token budget."""
        cache = copy.deepcopy(self._prefixes[start]) if start else make_prompt_cache(self.model)
        rest = prefix[len(start):]
        for i in range(0, len(rest), self.prefill_step_size):
            self.model(mx.array(rest[i:i + self.prefill_step_size])[None], cache=cache)
            mx.eval([c.state for c in cache])
        self.stats["prefix_prefill_tokens"] += len(rest)
        self._prefixes[prefix] = cache
        while sum(map(len, self._prefixes)) > self.prefix_cache_tokens:
            self._prefixes.popitem(last=False)
        return cache


def _starts(seq: list[int], head: tuple[int, ...]) -> bool:
    return len(seq) >= len(head) and tuple(seq[:len(head)]) == head


def _common(a: list[int], b: list[int]) -> int:
    """Length of the longest common head of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_STOP: Any = object()
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    # Worker threads must end (and free their MLX state) before the interpreter does.
    for engine in list(_ENGINES):
        engine.close()
