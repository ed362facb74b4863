"""The embedded default model loads from its GGUF and matches an independent reference."""

import json

import mlx.core as mx
import pytest

from reverie.runtime.gguf import GGUFError, load_gguf, mlx_name

from conftest import FIXTURES

REFERENCE = json.loads((FIXTURES / "smollm2_reference.json").read_text())


@pytest.fixture(scope="module", params=[False, True], ids=["float32", "quantized"])
def smollm2(request, smollm2_dir):
    return load_gguf(next(smollm2_dir.glob("*.gguf")), quantized=request.param)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["prompt"][:24])
def test_matches_transformers_reference(smollm2, case):
    model, tokenizer = smollm2
    ids = tokenizer.encode(case["prompt"], add_special_tokens=False)
    assert ids == case["input_ids"]
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits)
    assert mx.argsort(-logprobs)[:10].tolist() == case["top10_ids"]
    for token, expected in zip(case["top10_ids"], case["top10_logprobs"]):
        assert abs(logprobs[token].item() - expected) < 0.02


def test_float32_on_cpu_keeps_no_quantized_layers(smollm2_dir):
    model, _ = load_gguf(next(smollm2_dir.glob("*.gguf")), quantized=False)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    assert not hasattr(model.model.layers[0].mlp.up_proj, "scales")


def test_tokenizer_round_trips_and_splits_digits(smollm2_tokenizer):
    text = "In 2024 I paid $1234.56 for 3 cats — café ☕"
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids) == text
    digits = [smollm2_tokenizer.decode([i]) for i in smollm2_tokenizer.encode("1234", add_special_tokens=False)]
    assert digits == ["1", "2", "3", "4"]
    assert smollm2_tokenizer.eos_token_ids == {2}


def test_unknown_tensor_name_is_an_error():
    assert mlx_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(GGUFError, match="blk.0.ssm_conv"):
        mlx_name("blk.0.ssm_conv.weight")
