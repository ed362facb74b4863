"""mlx-lm model folders: write a model and its tokenizer so that ``mlx_lm.load`` reads them.

Used by the GGUF converter (:func:`reverie.runtime.gguf.convert_gguf`) and by the forge's
model versions (:mod:`reverie.training.versions`). Weights are float32 by default: fusing into a
quantized base and re-quantizing would erase small LoRA updates (FINDINGS, "Fusing").
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

WEIGHTS_FILE = "model.safetensors"


def _dequantized_weight(module: nn.Module, dtype) -> mx.array:
    mode = getattr(module, "mode", "affine")
    scales = module.scales.astype(mx.float32) if mode == "affine" else module.scales
    biases = getattr(module, "biases", None)
    if biases is not None and mode == "affine":
        biases = biases.astype(mx.float32)
    # float16 scales would make the product float16 (reverie/runtime/gguf.py)
    weight = mx.dequantize(module.weight, scales, biases, group_size=module.group_size,
                           bits=module.bits, mode=mode)
    return weight.astype(dtype)


def float_weights(model: nn.Module, dtype=mx.float32) -> dict[str, mx.array]:
    """The model's parameters as a flat ``{name: array}`` dict with every floating tensor in
    ``dtype``; quantized layers (``QuantizedLinear``/``QuantizedEmbedding``) are dequantized
    in float32 first. The model is not modified.

    Raises:
        ValueError: the model still has LoRA (or other fusable) layers: :func:`fuse` first.
    """
    unfused = [name for name, m in model.named_modules() if hasattr(m, "fuse")]
    if unfused:
        raise ValueError(f"model has unfused adapter layers ({unfused[0]}, ...): fuse() first")
    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            prefix = f"{name}." if name else ""
            for key in ("weight", "scales", "biases"):
                weights.pop(prefix + key, None)
            weights[prefix + "weight"] = _dequantized_weight(module, dtype)
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def model_config(model: nn.Module, tokenizer=None) -> dict:
    """``config.json`` for mlx-lm from ``model.args`` (every ModelArgs field, including
    ``rope_traditional``); ``None`` values are dropped (transformers 5 rejects nulls in
    config.json when loading a tokenizer: FINDINGS). With a tokenizer, ``eos_token_id`` lists
    its end-of-sequence ids (mlx-lm reads them back from here).

    Raises:
        ValueError: the model has no dataclass ``args`` with a ``model_type``.
    """
    args = getattr(model, "args", None)
    if args is None or not is_dataclass(args) or not getattr(args, "model_type", None):
        raise ValueError("model has no mlx-lm ModelArgs (model.args with model_type)")
    config = {k: v for k, v in asdict(args).items() if v is not None}
    if tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_ids", None) or (
            [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None
            else [])
        if eos:
            config["eos_token_id"] = sorted(int(i) for i in eos)
    return dict(sorted(config.items()))


def save_model_dir(model: nn.Module, tokenizer, out_dir: Path, dtype=mx.float32) -> Path:
    """Write ``model`` and ``tokenizer`` as an mlx-lm model folder that ``mlx_lm.load`` reads.

    Files: ``config.json`` (:func:`model_config`), ``model.safetensors`` (:func:`float_weights`,
    float32 by default, ``mx.save_safetensors`` with ``format: mlx`` metadata) and the
    tokenizer's ``save_pretrained`` files (``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``; for a ``TokenizerWrapper`` its wrapped transformers tokenizer).
    Write into a staging folder (:meth:`Versions.stage`), not into a live version.

    Args:
        model: an mlx-lm model (LoRA layers fused, see :func:`fuse`).
        tokenizer: an mlx-lm ``TokenizerWrapper`` or a transformers tokenizer.
        out_dir: the folder (created if missing).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: unfused LoRA layers, or no ``model.args``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model_config(model, tokenizer)
    weights = float_weights(model, dtype)
    mx.save_safetensors(str(out_dir / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    hf_tokenizer.save_pretrained(str(out_dir))
    return out_dir
