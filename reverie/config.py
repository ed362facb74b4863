"""Reverie's configuration: one pydantic model, loaded from ``config.yaml``.

Every key is documented in the project's ``config.yaml``; a key that is not known is an
error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from reverie.paths import Paths

ROLES = ("notetaker", "dreamer", "verifier", "reshaper", "persona", "student")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeConfig(_Strict):
    """How local MLX models run."""

    openblas: Literal["auto", "off"] = "auto"
    weights: Literal["auto", "float32", "quantized"] = "auto"
    completion_batch_size: int = Field(32, ge=1)
    prefill_batch_size: int = Field(8, ge=1)
    prefill_step_size: int = Field(512, ge=16)
    prefix_cache_tokens: int = Field(16384, ge=0)


class LangChainSource(_Strict):
    """A chat model run by something other than Reverie's MLX runtime, through LangChain.

    ``langchain`` is either ``"provider:model"`` (LangChain's ``init_chat_model``, e.g.
    ``"ollama:qwen2.5:0.5b"`` or ``"openai:gpt-4o-mini"``; the provider's package must be
    installed) or a chat model class as ``"package.module.ClassName"`` (e.g.
    ``"langchain_openai.ChatOpenAI"``); ``args`` are passed to it as keyword arguments
    (``model``, ``base_url``, ``api_key``, ...). A role's ``temperature``, ``top_p`` and
    ``max_tokens`` are passed too unless ``args`` sets them.
    """

    langchain: str = Field(min_length=3)
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("langchain")
    @classmethod
    def _shape(cls, value: str) -> str:
        if ":" in value:
            provider, _, model = value.partition(":")
            if not provider or not model:
                raise ValueError(f"{value!r}: expected \"provider:model\", e.g. \"ollama:llama3.2\"")
        elif "." not in value.strip("."):
            raise ValueError(f"{value!r}: expected \"provider:model\" or a class as "
                             f"\"package.module.ClassName\", e.g. \"langchain_openai.ChatOpenAI\"")
        return value

    def describe(self) -> str:
        """One line naming the model, for tables and the diary (no secrets: ``args`` other
        than ``model``/``model_name``/``base_url`` are left out)."""
        shown = {k: v for k, v in self.args.items() if k in ("model", "model_name", "base_url")}
        return self.langchain + (" " + " ".join(f"{k}={v}" for k, v in shown.items())
                                 if shown else "")


ModelSource = Union[str, LangChainSource]


def is_local(source: ModelSource) -> bool:
    """Whether ``source`` is a model Reverie loads itself (MLX): ``embedded:``, ``.gguf``, an
    mlx-lm folder or hub id; a :class:`LangChainSource` is not."""
    return isinstance(source, str)


class ModelsConfig(_Strict):
    """Named models and where fetched files are cached."""

    cache_dir: Path | None = None
    chat: dict[str, ModelSource] = Field(default_factory=lambda: {
        "default": "embedded:smollm2-135m-instruct",
        "sleep": "embedded:qwen2.5-coder-0.5b-instruct"})
    embedding: str = "embedded:all-minilm-l6-v2"


class RoleConfig(_Strict):
    """Which model an agent role uses and its default sampling settings. ``model`` unset:
    ``sleep`` for the night's readers (:data:`SLEEP_ROLES`) when ``models.chat`` has a
    ``sleep`` model, else ``default``."""

    model: str | None = None
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    max_tokens: int = Field(256, ge=1)


# The roles that read the day's text at night and run on the heavier sleep model.
SLEEP_ROLES = ("notetaker", "dreamer", "verifier", "reshaper")


def _default_roles() -> dict[str, RoleConfig]:
    return {
        "notetaker": RoleConfig(temperature=0.0, max_tokens=160),
        "dreamer": RoleConfig(temperature=0.8, top_p=1.0, min_p=0.1, max_tokens=200),
        "verifier": RoleConfig(temperature=0.0, max_tokens=96),
        "reshaper": RoleConfig(temperature=0.5, top_p=0.9, max_tokens=192),
        "persona": RoleConfig(temperature=0.2, max_tokens=256),
        "student": RoleConfig(temperature=0.0, max_tokens=256),
    }


class StructuredConfig(_Strict):
    """Structured output: tries before an agent's call fails."""

    attempts: int = Field(3, ge=1)


def refuse_keys(data, messages: dict[str, str]):
    """``data`` (a section's raw mapping) unchanged, or ``ValueError`` with the message of
    the first key of ``messages`` it holds: an old key is named, never silently ignored."""
    for key, message in messages.items():
        if isinstance(data, dict) and key in data:
            raise ValueError(message)
    return data


# Keys of the night's old reader (one JSON object of memories per window of turns), and
# what replaced them: an old config is told, not silently ignored.
RETIRED_NIGHT_KEYS = {
    "window_turns": "notes are taken per user turn (night.note_context_turns)",
    "max_candidates": "notes per turn are capped by night.max_notes",
    "phrasings": "the dreamer writes phrasings per note (night.max_phrasings)",
    "extractive_answers": "answers are the verified note said to the user",
}


class NightConfig(_Strict):
    """The night's agents: how much they read and dream, how strictly they verify."""

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        return refuse_keys(data, {k: f"night.{k} was retired: {why}"
                                  for k, why in RETIRED_NIGHT_KEYS.items()})

    note_context_turns: int = Field(2, ge=0, le=8)
    max_notes: int = Field(8, ge=1, le=32)
    dream_bursts: int = Field(2, ge=1)
    max_phrasings: int = Field(12, ge=1, le=32)
    neighbours: int = Field(5, ge=0, le=16)
    reshape_rounds: int = Field(2, ge=0)
    min_importance: float = Field(0.2, ge=0.0, le=1.0)
    min_novelty: float = Field(0.1, ge=0.0, le=1.0)
    duplicate_similarity: float = Field(0.92, ge=0.0, le=1.0)
    supersede_similarity: float = Field(0.75, ge=0.0, le=1.0)
    slot_similarity: float = Field(0.9, ge=0.0, le=1.0)
    forget_similarity: float = Field(0.45, ge=0.0, le=1.0)
    max_concurrency: int = Field(32, ge=1)
    verbatim_min_chars: int = Field(600, ge=50)
    park_nights: int = Field(3, ge=1)


class ForgeConfig(_Strict):
    """The forge: tonight's memories become weights, behind a validation gate. The LoRA
    hyper-parameters here are :class:`reverie.training.lora.LoraArgs`' fields of the same
    names (mlx-lm's terms) and their defaults."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        return refuse_keys(data, {k: f"forge.{k} is now forge.{new} (mlx-lm's name)"
                                  for k, new in RENAMED_FORGE_KEYS.items()})

    enabled: bool = True
    model: str = "default"
    phrasings: int = Field(5, ge=1)
    identity_share: float = Field(0.2, ge=0.0, lt=1.0)
    rehearsal_ratio: float = Field(1.0, ge=0.0)
    rehearsal_min: int = Field(40, ge=0)
    replay_max: int = Field(20, ge=0)
    rank: int = Field(16, ge=1)
    scale: float = Field(20.0, gt=0.0)
    num_layers: int = Field(4, ge=1)
    placement: Literal["last", "middle"] = "last"
    keys: list[str] | None = None
    kl_weight: float = Field(1.0, ge=0.0)
    context_weight: float = Field(0.0, ge=0.0)
    self_targets: bool = False
    learning_rate: float = Field(1e-4, gt=0.0)
    warmup: int = Field(10, ge=0)
    batch_size: int = Field(4, ge=1)
    epochs: float = Field(4.0, gt=0.0)
    min_iters: int = Field(20, ge=1)
    max_iters: int = Field(300, ge=1)
    max_seq_length: int = Field(512, ge=32)
    seed: int = 0
    select_every: int = Field(0, ge=0)
    keep_versions: int = Field(3, ge=1)
    min_new_recall: float = Field(0.0, ge=0.0, le=1.0)
    max_capability_loss: float = Field(0.03, ge=0.0, le=1.0)
    min_regression_keep: float = Field(0.9, ge=0.0, le=1.0)
    max_loss_increase: float = Field(0.25, ge=0.0)


# Keys renamed to mlx-lm's terms: an old config gets told the new name.
RENAMED_FORGE_KEYS = {"alpha": "scale", "lora_keys": "keys"}


class WakeConfig(_Strict):
    """The day side: chat, retrieval, sleep triggers, evaluation."""

    user: str = "me"
    role: str = "student"
    context_tokens: int = Field(2048, ge=256)
    compact_at: float = Field(0.75, gt=0.0, le=1.0)
    keep_turns: int = Field(4, ge=1)
    rag: bool = True
    rag_k: int = Field(4, ge=1)
    rag_max_distance: float = Field(0.75, ge=0.0, le=2.0)
    auto_sleep_turns: int = Field(0, ge=0)
    sunset_chars: int = Field(0, ge=0)
    night_at: str = Field("03:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    eval_max_tokens: int = Field(96, ge=1)


class PromptsConfig(_Strict):
    """Where the user's own prompt files live (searched before the shipped ones)."""

    dir: Path | None = None


class ServeConfig(_Strict):
    """``reverie serve``, the OpenAI-compatible chat server: where it listens and the API
    key it asks for (``--host``, ``--port``, ``--api-key`` / ``REVERIE_API_KEY`` override)."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None


class MemoryConfig(_Strict):
    """Where the fact store and the memory index live: the embedded Chroma under
    ``<data_dir>/chroma`` (``chroma_url`` unset) or a Chroma server at ``chroma_url``
    (``reverie.memory.facts.open_client`` opens either)."""

    chroma_url: AnyHttpUrl | None = None
    chroma_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Chroma's own two token transports (chromadb.auth.token_authn.TokenTransportHeader).
    chroma_token_header: Literal["Authorization", "X-Chroma-Token"] = "Authorization"
    chroma_tenant: str = Field("default_tenant", min_length=1)
    chroma_database: str = Field("default_database", min_length=1)

    @field_validator("chroma_url")
    @classmethod
    def _plain_url(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and (url.query or url.fragment or url.username or url.password):
            raise ValueError(f"{url}: expected scheme://host:port[/path] only (a token goes "
                             "in the environment variable named by memory.chroma_token_env)")
        return url


class Settings(_Strict):
    """The whole configuration (see ``config.yaml`` for each key's meaning)."""

    data_dir: Path = Path("data")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    roles: dict[str, RoleConfig] = Field(default_factory=_default_roles)
    structured: StructuredConfig = Field(default_factory=StructuredConfig)
    night: NightConfig = Field(default_factory=NightConfig)
    forge: ForgeConfig = Field(default_factory=ForgeConfig)
    wake: WakeConfig = Field(default_factory=WakeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    identity_file: Path | None = None

    @model_validator(mode="after")
    def _check_roles(self) -> "Settings":
        for name in ROLES:
            self.roles.setdefault(name, _default_roles()[name])
        for name, role in self.roles.items():
            if name not in ROLES:
                raise ValueError(f"roles.{name}: unknown role (known: {', '.join(ROLES)})")
            if role.model is None:
                role.model = ("sleep" if name in SLEEP_ROLES and "sleep" in self.models.chat
                              else "default")
            if role.model not in self.models.chat:
                raise ValueError(f"roles.{name}.model: {role.model!r} is not a key of models.chat "
                                 f"({', '.join(self.models.chat)})")
        forge_source = self.models.chat.get(self.forge.model)
        if forge_source is None:
            raise ValueError(f"forge.model: {self.forge.model!r} is not a key of models.chat "
                             f"({', '.join(self.models.chat)})")
        if not is_local(forge_source):
            raise ValueError(f"forge.model: {self.forge.model!r} is a LangChain model; the forge "
                             "trains a local MLX model (embedded:, .gguf or an mlx-lm folder)")
        if self.wake.role not in ROLES:
            raise ValueError(f"wake.role: unknown role {self.wake.role!r} (known: {', '.join(ROLES)})")
        return self

    @property
    def paths(self) -> Paths:
        return Paths(self.data_dir, self.models.cache_dir)


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate; names file and key."""


def load_settings(path: str | Path | None = None, **overrides) -> Settings:
    """Load settings from a YAML file.

    Args:
        path: the YAML file; ``None`` uses ``./config.yaml`` when it exists, else defaults.
        **overrides: top-level keys that replace the file's (e.g. ``data_dir=tmp``).

    Relative ``data_dir`` and ``models.cache_dir`` are taken relative to the file's folder.

    Raises:
        ConfigError: the file is missing (when named), is not YAML, or a key is invalid;
            the message names the file and each bad key.
    """
    base = Path.cwd()
    raw: dict = {}
    if path is None and Path("config.yaml").exists():
        path = Path("config.yaml")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such configuration file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        base = path.resolve().parent
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "data_dir" in overrides:  # given on the command line: relative to the working folder
        overrides["data_dir"] = Path(overrides["data_dir"]).resolve()
    raw.update(overrides)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        where = path or "settings"
        lines = [f"{where}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc
    if not settings.data_dir.is_absolute():
        settings.data_dir = base / settings.data_dir
    if settings.models.cache_dir is not None and not settings.models.cache_dir.is_absolute():
        settings.models.cache_dir = base / settings.models.cache_dir
    if settings.prompts.dir is not None and not settings.prompts.dir.is_absolute():
        settings.prompts.dir = base / settings.prompts.dir
    if settings.identity_file is not None and not settings.identity_file.is_absolute():
        settings.identity_file = base / settings.identity_file
    return settings
