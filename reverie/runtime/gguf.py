"""Load a llama-architecture GGUF file (the embedded SmolLM2) into mlx-lm's llama model.

MLX reads GGUF natively (``mx.load(path, return_metadata=True)``): Q4_1 tensors arrive in
MLX's quantized layout (``weight`` uint32, ``scales``, ``biases``, group size 32), Q8_0 ones
as 8 bits. This module maps llama.cpp's tensor names to mlx-lm's, builds the model arguments
from the ``llama.*`` metadata and the tokenizer from the ``tokenizer.ggml.*`` metadata.

GGUF stores Q and K rows in Meta's interleaved rotary layout, so the model runs with
``rope_traditional=True``; with that, SmolLM2's next-token log-probs match transformers'
GGUF loader (float32) to 3 decimals (``tests/fixtures/smollm2_reference.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper

_NAMES = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"model.layers.\1.mlp.down_proj."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
]


class GGUFError(ValueError):
    """The GGUF file is not a llama model this loader understands; names file and key."""


def mlx_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to mlx-lm's llama name (``blk.0.attn_q.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``). Raises :class:`GGUFError` when unknown."""
    for pattern, repl in _NAMES:
        name, n = re.subn(pattern, repl, gguf_name)
        if n:
            return name
    raise GGUFError(f"unknown GGUF tensor {gguf_name!r}")


def _scalar(meta: dict, key: str, path: Path, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise GGUFError(f"{path}: metadata key {key!r} missing")
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def model_args(meta: dict, path: Path) -> llama.ModelArgs:
    """mlx-lm llama arguments from GGUF ``llama.*`` metadata (raises GGUFError if not llama)."""
    arch = _scalar(meta, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only llama)")
    heads = int(_scalar(meta, "llama.attention.head_count", path))
    hidden = int(_scalar(meta, "llama.embedding_length", path))
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(_scalar(meta, "llama.block_count", path)),
        intermediate_size=int(_scalar(meta, "llama.feed_forward_length", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_scalar(meta, "llama.attention.head_count_kv", path, heads)),
        rms_norm_eps=float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        head_dim=int(_scalar(meta, "llama.rope.dimension_count", path, hidden // heads)),
        max_position_embeddings=int(_scalar(meta, "llama.context_length", path, 2048)),
        rope_theta=float(_scalar(meta, "llama.rope.freq_base", path, 10000.0)),
        rope_traditional=True,
        tie_word_embeddings="output.weight" not in meta.get("_tensor_names", ()),
    )


def _group(tensors: dict[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    """``{'blk.0.attn_q': {'weight': .., 'scales': .., 'biases': ..}, ...}``."""
    modules: dict[str, dict[str, mx.array]] = {}
    for name, value in tensors.items():
        module, _, part = name.rpartition(".")
        modules.setdefault(module, {})[part] = value
    return modules


def _bits(parts: dict[str, mx.array], group_size: int = 32) -> int:
    # A uint32 row packs 32 // bits values; scales hold one value per group.
    return parts["weight"].shape[1] * 32 // (parts["scales"].shape[1] * group_size)


def load_gguf(path: str | Path, quantized: bool) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a llama GGUF file into mlx-lm's llama ``Model`` and a tokenizer.

    Args:
        path: the ``.gguf`` file.
        quantized: keep quantized tensors quantized (fast on Metal) or dequantize them to
            float32 (fast on the CPU). Measured on a 2-core x86-64 with OpenBLAS,
            SmolLM2-135M: 4-bit ~10 tok/s prefill and ~8 tok/s decode, float32 ~200 tok/s
            prefill and ~20 tok/s decode: MLX's CPU quantized matmul does not use BLAS
            (see ``benchmarks/`` for the current figures).

    Returns:
        ``(model, tokenizer)``; the model is evaluated and in eval mode.

    Raises:
        GGUFError: not a llama GGUF, or a tensor or metadata key is missing or unknown.
    """
    path = Path(path)
    tensors, meta = mx.load(str(path), return_metadata=True)
    meta = dict(meta)
    meta["_tensor_names"] = set(tensors)
    args = model_args(meta, path)
    model = llama.Model(args)

    weights, qbits = {}, {}
    for module, parts in _group(tensors).items():
        target = mlx_name(module + ".weight").rpartition(".")[0]
        if "scales" in parts:
            bits = _bits(parts)
            if quantized:
                qbits[target] = bits
                weights.update({f"{target}.{k}": v for k, v in parts.items()})
            else:
                # float16 scales would make the product float16: dequantize in float32
                weights[f"{target}.weight"] = mx.dequantize(
                    parts["weight"], parts["scales"].astype(mx.float32),
                    parts["biases"].astype(mx.float32), group_size=32, bits=bits)
        else:
            weights.update({f"{target}.{k}": v.astype(mx.float32) for k, v in parts.items()})
    if qbits:
        nn.quantize(model, class_predicate=lambda p, m: (
            {"group_size": 32, "bits": qbits[p]} if p in qbits else False))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, TokenizerWrapper(build_tokenizer(meta, path))


def build_tokenizer(meta: dict, path: Path | str = "<gguf>"):
    """A transformers fast tokenizer from GGUF ``tokenizer.ggml.*`` metadata.

    Supports byte-level BPE (``tokenizer.ggml.model == "gpt2"``), the tokenizer of SmolLM2,
    Llama 3 and most recent models. Special tokens are those of ``token_type == 3``
    (llama.cpp's CONTROL); the chat template is ``tokenizer.chat_template``. The
    ``smollm`` pre-tokenizer splits digits one by one before the GPT-2 byte-level split
    (llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``).

    Raises:
        GGUFError: another tokenizer model (SentencePiece GGUFs load through mlx-lm
            from a Hugging Face folder instead).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {kind!r} not supported (only gpt2 BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == 3])

    def special(key):
        return tokens[int(meta[key].item())] if key in meta else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
