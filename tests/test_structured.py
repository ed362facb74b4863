"""Structured output: grammar-constrained decoding, validation, retries and errors."""

import json
from typing import Literal

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from pydantic import BaseModel, ConfigDict, Field

from reverie.runtime.chat_model import MLXChatModel
from reverie.runtime.structured import StructuredOutputError, structured

from conftest import tiny_loaded


class Verdict(BaseModel):
    verdict: Literal["pass", "fail"]
    grounded: bool
    reason: str = Field(max_length=40)


class Score(BaseModel):
    score: int = Field(ge=0, le=10)


@pytest.fixture(scope="module")
def loaded(smollm2_tokenizer):
    with tiny_loaded(smollm2_tokenizer, seed=2) as model:
        yield model


def test_grammar_mask_only_lets_valid_json_through(loaded):
    # Sample the most likely allowed token under random logits: every completion is valid.
    import mlx.core as mx
    import numpy as np

    from reverie.runtime.structured import json_schema

    rng = np.random.default_rng(0)
    for _ in range(30):
        processor = loaded.grammar_processor(json_schema(Verdict))
        tokens = [0]
        for _ in range(150):
            logits = mx.array(rng.normal(size=(1, 49152)).astype(np.float32) * 3)
            tokens.append(int(mx.argmax(processor(mx.array(tokens), logits), axis=-1).item()))
            if tokens[-1] == 2:
                break
        assert tokens[-1] == 2  # the grammar closed the object and allowed only the end
        Verdict.model_validate_json(loaded.tokenizer.decode(tokens[1:-1]))


def test_a_random_model_returns_valid_objects_through_the_engine(loaded):
    # A random model never writes JSON by itself; under the grammar (and the retries that
    # back it up) every call returns a valid object.
    chat = MLXChatModel(loaded=loaded, role="verifier", max_tokens=120, temperature=1.0)
    results = chat.with_structured_output(Verdict, attempts=3).batch(["Judge this."] * 4)
    assert all(isinstance(r, Verdict) for r in results)


def test_include_raw_gives_the_text_and_the_object(loaded):
    chat = MLXChatModel(loaded=loaded, max_tokens=120)
    out = chat.with_structured_output(Verdict, include_raw=True).invoke("Judge this.")
    assert out["parsing_error"] is None
    assert out["parsed"] == Verdict.model_validate_json(out["raw"].content)


def test_dict_schema_gives_a_dict(loaded):
    schema = {"title": "Pair", "type": "object", "properties": {"a": {"type": "boolean"}},
              "required": ["a"], "additionalProperties": False}
    out = MLXChatModel(loaded=loaded, max_tokens=30).with_structured_output(schema).invoke("x")
    assert set(out) == {"a"} and isinstance(out["a"], bool)


def test_other_chat_models_are_retried_then_succeed():
    fake = FakeListChatModel(responses=["not json", '{"score": 11}', '{"score": 7}'])
    assert structured(fake, Score, role="verifier", attempts=3).invoke("rate it") == Score(score=7)


def test_error_names_role_schema_and_output_after_last_attempt():
    fake = FakeListChatModel(responses=["nope", '{"score": 99}'])
    with pytest.raises(StructuredOutputError) as info:
        structured(fake, Score, role="verifier", attempts=2).invoke("rate it")
    err = info.value
    assert (err.role, err.schema, err.raw, err.attempts) == ("verifier", "Score", '{"score": 99}', 2)
    assert "verifier" in str(err) and "Score" in str(err) and "99" in str(err)


def test_bounds_the_grammar_cannot_enforce_are_still_validated(loaded):
    # Integer bounds are not in the grammar: a random model overshoots and pydantic catches it.
    chat = MLXChatModel(loaded=loaded, role="verifier", max_tokens=12, temperature=2.0)
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(chat.with_structured_output(Score, attempts=1).invoke("rate"))
        except StructuredOutputError as exc:
            assert exc.role == "verifier" and exc.schema == "Score"
            outcomes.append(exc)
    assert all(isinstance(o, (Score, StructuredOutputError)) for o in outcomes)
    assert all(0 <= o.score <= 10 for o in outcomes if isinstance(o, Score))


@pytest.mark.e2e
def test_default_model_fills_a_schema(default_runtime):
    class City(BaseModel):
        name: str = Field(max_length=40)
        country: str = Field(max_length=40)

    chat = default_runtime.chat_model("verifier")
    city = chat.with_structured_output(City).invoke("What is the capital of France? Answer as JSON.")
    assert isinstance(city, City)
    assert "paris" in city.name.lower()


class Note(BaseModel):
    # closed by pydantic itself, so the loose (strict=False) grammar is bounded too
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=30)
    tag: str = Field("", max_length=10)  # optional: only a strict schema forces it


def test_standard_method_and_strict_arguments(loaded):
    # bounded strings and room to close them: a random model under any of these grammars
    # ends its object within max_tokens (greedy, so the same way on every run)
    chat = MLXChatModel(loaded=loaded, role="verifier", max_tokens=120, temperature=0.0)
    for method in ("json_schema", "function_calling"):
        assert isinstance(chat.with_structured_output(Verdict, method=method).invoke("Judge."),
                          Verdict)
    # strict (the default): every property required; strict=False: the schema as given
    strict = chat.with_structured_output(Note, include_raw=True, strict=True)
    loose = chat.with_structured_output(Note, strict=False)
    assert '"tag"' in strict.invoke("Note it.")["raw"].content
    assert isinstance(loose.invoke("Note it."), Note)
    # json_mode: any JSON object, validated against the schema afterwards
    got = chat.with_structured_output(Score, method="json_mode", include_raw=True).invoke("Score.")
    assert got["raw"].content.lstrip().startswith("{")
    with pytest.raises(ValueError, match="method"):
        chat.with_structured_output(Verdict, method="tools")
