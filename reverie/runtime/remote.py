"""Chat models that Reverie does not run itself: any LangChain chat model, named in config.

A ``models.chat`` entry may be a :class:`~reverie.config.LangChainSource` instead of a local
source: ``{langchain: "ollama:qwen2.5:0.5b"}`` goes through LangChain's ``init_chat_model``,
``{langchain: "langchain_openai.ChatOpenAI", args: {base_url: ..., model: ...}}`` builds that
class. Agents talk to either through langchain-core's ``BaseChatModel``; such models cannot
be grammar-constrained, so the agents check their answers after the call instead
(:func:`reverie.runtime.structured.violations`).
"""

from __future__ import annotations

import importlib
from typing import Any

from langchain_core.language_models import BaseChatModel

from reverie.config import LangChainSource, RoleConfig
from reverie.runtime.sources import ModelSourceError

# The sampling settings of a role that LangChain chat models commonly take as fields
# (min_p has no common name: left out).
SAMPLING = ("temperature", "top_p", "max_tokens")


def _class(path: str, field: str) -> type[BaseChatModel]:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ModelSourceError(f"{field}: cannot import {module!r} for {path!r} ({exc}); "
                               f"install the package that provides it") from exc
    except AttributeError as exc:
        raise ModelSourceError(f"{field}: module {module!r} has no {name!r}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseChatModel)):
        raise ModelSourceError(f"{field}: {path!r} is not a LangChain chat model class")
    return cls


def _sampling(cls: type, role: RoleConfig, args: dict[str, Any]) -> dict[str, Any]:
    """The role's sampling values for the fields ``cls`` has (by name or alias) and
    ``args`` does not set."""
    fields = getattr(cls, "model_fields", {})
    names = set(fields) | {f.alias for f in fields.values() if getattr(f, "alias", None)}
    return {k: getattr(role, k) for k in SAMPLING if k in names and k not in args}


def build_chat_model(source: LangChainSource, role: RoleConfig,
                     field: str = "models.chat") -> BaseChatModel:
    """The LangChain chat model ``source`` names, with ``role``'s sampling settings
    (``temperature``, ``top_p``, ``max_tokens``) where the model has such fields and
    ``source.args`` does not set them.

    Args:
        source: ``"provider:model"`` (``init_chat_model``) or ``"package.module.Class"``,
            and the keyword arguments to build it with.
        role: the agent role's settings.
        field: the config field, named in errors.

    Raises:
        ModelSourceError: the class or provider package cannot be imported, the class is
            not a chat model, or the model rejects its arguments; names ``field``.
    """
    args = dict(source.args)
    try:
        if ":" in source.langchain:
            try:
                from langchain.chat_models import init_chat_model
            except ImportError as exc:
                raise ModelSourceError(f"{field}: {source.langchain!r} needs LangChain's "
                                       "init_chat_model (pip install langchain)") from exc
            probe = init_chat_model(source.langchain, **args)
            extra = _sampling(type(probe), role, args)
            return init_chat_model(source.langchain, **args, **extra) if extra else probe
        cls = _class(source.langchain, field)
        return cls(**args, **_sampling(cls, role, args))
    except ModelSourceError:
        raise
    except (ImportError, ValueError, TypeError) as exc:  # pydantic's ValidationError too
        raise ModelSourceError(f"{field}: cannot build {source.langchain!r}: {exc}") from exc
