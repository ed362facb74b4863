"""GGUF files (llama.cpp's format) into mlx-lm models: llama and qwen2 architectures.

Two paths:

- **Native** (:func:`load_gguf`, llama only): MLX reads GGUF itself
  (``mx.load(path, return_metadata=True)``); Q4_0/Q4_1 tensors arrive in MLX's quantized
  layout (``weight`` uint32, ``scales``, ``biases``, group size 32), Q8_0 ones as 8 bits.
  The embedded SmolLM2 loads this way.
- **Converted** (:func:`convert_gguf`): MLX's reader refuses K-quants (Q4_K, Q6_K, ...), so
  every tensor is dequantized to float32 with ggml-org's own reader (the ``gguf`` package,
  ``gguf.quants.dequantize``) once, into an mlx-lm model folder that ``mlx_lm.load`` reads.
  The embedded Qwen2.5-Coder sleep models load this way.

Both map llama.cpp's tensor names to mlx-lm's, build the model arguments from the
``<arch>.*`` metadata and the tokenizer from ``tokenizer.ggml.*``. llama GGUFs store Q and K
rows in Meta's interleaved rotary layout, so llama runs with ``rope_traditional=True`` (with
that, SmolLM2's log-probs match transformers' GGUF loader to 3 decimals:
``tests/fixtures/smollm2_reference.json``); llama.cpp does not permute qwen2's rows, so
qwen2 keeps mlx-lm's default rotary layout.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from reverie.runtime import blas  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2
from mlx_lm.tokenizer_utils import TokenizerWrapper

ARCHITECTURES = {"llama": llama, "qwen2": qwen2}

# llama.cpp's pre-tokenizer regexes (tokenizer.ggml.pre), as in the models' own
# tokenizer.json files: Qwen2's splits digits one by one, Llama 3's in runs of up to three.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "qwen2", "llama-bpe")

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
    """The GGUF file is not a model this loader understands; names file and key."""


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


def model_args(meta: dict, path: Path, tensor_names=()):
    """mlx-lm model arguments from GGUF ``<arch>.*`` metadata: ``llama.ModelArgs`` (with
    ``rope_traditional=True``) or ``qwen2.ModelArgs``. ``tensor_names`` decides
    ``tie_word_embeddings`` (no ``output.weight``: the embedding is the output layer).

    Raises:
        GGUFError: another architecture, or a required metadata key is missing.
    """
    arch = _scalar(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    heads = int(_scalar(meta, f"{arch}.attention.head_count", path))
    hidden = int(_scalar(meta, f"{arch}.embedding_length", path))
    common = dict(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=int(_scalar(meta, f"{arch}.block_count", path)),
        intermediate_size=int(_scalar(meta, f"{arch}.feed_forward_length", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_scalar(meta, f"{arch}.attention.head_count_kv", path, heads)),
        rms_norm_eps=float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        max_position_embeddings=int(_scalar(meta, f"{arch}.context_length", path, 2048)),
        tie_word_embeddings="output.weight" not in set(tensor_names),
    )
    if arch == "qwen2":
        return qwen2.ModelArgs(rope_theta=float(_scalar(meta, "qwen2.rope.freq_base", path,
                                                        1000000.0)), **common)
    return llama.ModelArgs(
        head_dim=int(_scalar(meta, "llama.rope.dimension_count", path, hidden // heads)),
        rope_theta=float(_scalar(meta, "llama.rope.freq_base", path, 10000.0)),
        rope_traditional=True, **common)


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
    """Load a GGUF file that MLX reads natively (Q4_0/Q4_1/Q8_0/F16/F32 tensors) into an
    mlx-lm ``Model`` and a tokenizer; K-quant files go through :func:`convert_gguf`.

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
        GGUFError: an unsupported architecture, or a tensor or metadata key is missing or
            unknown (MLX itself raises on tensor types it cannot read, e.g. K-quants).
    """
    path = Path(path)
    tensors, meta = mx.load(str(path), return_metadata=True)
    meta = dict(meta)
    args = model_args(meta, path, tensors)
    model = ARCHITECTURES[args.model_type].Model(args)

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


def _values(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _pre_tokenizer(pre: str, path):
    from tokenizers import Regex, pre_tokenizers

    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: digits one by one first
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("qwen2", "llama-bpe"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                    f"{', '.join(PRE_TOKENIZERS)}); its split rules decide the token ids, so "
                    f"guessing one would give silently wrong ids")


def build_tokenizer(meta: dict, path: Path | str = "<gguf>"):
    """A transformers fast tokenizer from GGUF ``tokenizer.ggml.*`` metadata.

    Supports byte-level BPE (``tokenizer.ggml.model == "gpt2"``), the tokenizer of SmolLM2,
    Qwen2, Llama 3 and most recent models, with the pre-tokenizers of
    :data:`PRE_TOKENIZERS` (``tokenizer.ggml.pre``; llama.cpp's ``llama-vocab.cpp`` names
    them). Special tokens are those of ``token_type == 3`` (llama.cpp's CONTROL); tokens of
    ``token_type == 4`` (USER_DEFINED, e.g. Qwen2.5's ``<tool_call>``) are matched whole too,
    as llama.cpp and the model's own tokenizer do, but are not special (decoding without
    special tokens keeps them). The chat template is ``tokenizer.chat_template``. ``meta``
    values may be MLX arrays (from ``mx.load``) or plain Python values (from
    ``gguf.GGUFReader``).

    Raises:
        GGUFError: another tokenizer model (SentencePiece GGUFs load through mlx-lm from a
            Hugging Face folder instead) or an unknown pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {kind!r} not supported (only gpt2 BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), path)
    tok.decoder = decoders.ByteLevel()
    types = _values(meta["tokenizer.ggml.token_type"])
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == 4])

    def special(key):
        return tokens[int(_values([meta[key]])[0])] if key in meta else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


# -- the converted path: any GGUF ggml-org's reader dequantizes -------------------------

# Tensor types MLX's own GGUF reader loads (the rest, K-quants among them, it refuses).
NATIVE_TYPES = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q8_0"})


def read_metadata(path: Path | str) -> tuple[dict, dict[str, str]]:
    """``(metadata, {tensor name: ggml type name})`` of a GGUF file, read with ggml-org's
    ``gguf`` package (memory-mapped; the tensors are not loaded).

    Raises:
        GGUFError: not a GGUF file (bad magic or truncated header).
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from exc
    return _fields(reader), {t.name: t.tensor_type.name for t in reader.tensors}


def _fields(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001  (exotic field types: not needed here)
            continue
    return meta


def needs_conversion(path: Path | str) -> bool:
    """Whether MLX's reader cannot load ``path`` natively: an architecture other than llama,
    or a tensor type outside :data:`NATIVE_TYPES` (K-quants)."""
    meta, types = read_metadata(path)
    return meta.get("general.architecture") != "llama" or not set(types.values()) <= NATIVE_TYPES


def convert_gguf(path: Path | str, out_dir: Path | str,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Dequantize every tensor of a GGUF file to float32 and write an mlx-lm model folder.

    Dequantization is ggml-org's (``gguf.quants.dequantize``, numpy), so every type llama.cpp
    writes (Q4_K, Q5_0, Q6_K, ...) is read exactly as llama.cpp reads it. Weights are kept in
    float32 on disk: on the CPU, float32 in memory is the fastest MLX path (FINDINGS), and a
    float16 copy would round the dequantized values. The folder is written beside
    ``out_dir`` and renamed into place, so an interrupted conversion leaves nothing behind.

    Args:
        path: the ``.gguf`` file.
        out_dir: the model folder to create (``config.json``, ``model.safetensors``,
            tokenizer files); replaced if it exists.
        progress: ``(tensors done, tensors total)`` callback.

    Returns:
        ``out_dir``.

    Raises:
        GGUFError: unsupported architecture, tokenizer or tensor name.
    """
    import gguf
    from gguf import GGUFReader

    from reverie.runtime.folders import save_model_dir

    path, out_dir = Path(path), Path(out_dir)
    reader = GGUFReader(str(path))
    meta = _fields(reader)
    names = [t.name for t in reader.tensors]
    args = model_args(meta, path, names)
    tokenizer = build_tokenizer(meta, path)  # fail on an unknown tokenizer before the work
    model = ARCHITECTURES[args.model_type].Model(args)
    weights = []
    for n, t in enumerate(reader.tensors, 1):
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        weights.append((mlx_name(t.name), mx.array(values.reshape(shape).astype("float32"))))
        if progress:
            progress(n, len(names))
    model.load_weights(weights, strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        save_model_dir(model, TokenizerWrapper(tokenizer), staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
