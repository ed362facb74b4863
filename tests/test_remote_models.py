"""Any LangChain chat model per role: the config, the builder, the checks made after the
call for models that cannot be grammar-constrained, and one night with the verifier on
``ChatOpenAI`` against a real ``mlx_lm.server`` on 127.0.0.1."""

import asyncio
import ctypes.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from reverie.config import ConfigError, LangChainSource, RoleConfig, load_settings
from reverie.graphs.run import run_night
from reverie.memory.daylog import DayLog
from reverie.memory.store import MemoryStore
from reverie.memory.diary import read_steps
from reverie.memory.records import Message, Session
from reverie.runtime.remote import build_chat_model
from reverie.runtime.sources import ModelSourceError

from conftest import REPO

langchain_openai = pytest.importorskip("langchain_openai")


def write_config(tmp_path, chat: dict, roles: dict | None = None, **extra) -> object:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                    "models": {"chat": chat}, "roles": roles or {}, **extra}))
    return load_settings(path)


SERVER = {"langchain": "langchain_openai.ChatOpenAI",
          "args": {"base_url": "http://127.0.0.1:9/v1", "api_key": "none",
                   "model": "default_model"}}


def test_a_role_on_a_langchain_model_from_config(tmp_path):
    from reverie.runtime.models import Runtime

    settings = write_config(tmp_path, {"default": "embedded:smollm2-135m-instruct",
                                       "server": SERVER},
                            {"verifier": {"model": "server", "temperature": 0.3,
                                          "max_tokens": 77}})
    assert isinstance(settings.models.chat["server"], LangChainSource)
    runtime = Runtime(settings)
    model = runtime.chat_model("verifier")
    assert isinstance(model, langchain_openai.ChatOpenAI)
    assert (model.temperature, model.max_tokens, model.model_name) == (0.3, 77, "default_model")
    assert str(model.openai_api_base) == "http://127.0.0.1:9/v1"
    assert runtime.chat_model("verifier", max_tokens=5).max_tokens == 5  # per-call overrides
    with pytest.raises(ModelSourceError, match="models.chat.server is a LangChain model"):
        runtime.load("server")
    assert runtime._models == {}  # nothing local was loaded for it


def test_args_win_over_the_role_and_provider_strings_go_through_init_chat_model():
    role = RoleConfig(temperature=0.9, top_p=0.5, max_tokens=12)
    model = build_chat_model(LangChainSource(langchain="langchain_openai.ChatOpenAI",
                                             args={"api_key": "x", "temperature": 0.1}), role)
    assert (model.temperature, model.top_p, model.max_tokens) == (0.1, 0.5, 12)
    pytest.importorskip("langchain")
    model = build_chat_model(LangChainSource(
        langchain="openai:default_model",
        args={"base_url": "http://127.0.0.1:9/v1", "api_key": "x"}), role)
    assert isinstance(model, langchain_openai.ChatOpenAI)
    assert (model.model_name, model.temperature, model.max_tokens) == ("default_model", 0.9, 12)


@pytest.mark.parametrize("spec, message", [
    ("nosuchpkg.Chat", "cannot import 'nosuchpkg'"),
    ("langchain_openai.NoSuchChat", "has no 'NoSuchChat'"),
    ("pathlib.Path", "is not a LangChain chat model class"),
])
def test_a_bad_class_is_a_clear_error_naming_the_field(spec, message):
    with pytest.raises(ModelSourceError, match=message) as err:
        build_chat_model(LangChainSource(langchain=spec), RoleConfig(), field="models.chat.x")
    assert str(err.value).startswith("models.chat.x: ")


def test_config_rejects_a_malformed_source_and_a_remote_forge_model(tmp_path):
    with pytest.raises(ConfigError, match=r"models\.chat\.server.*provider:model"):
        write_config(tmp_path, {"default": "embedded:smollm2-135m-instruct",
                                "server": {"langchain": "ChatOpenAI"}})
    with pytest.raises(ConfigError, match="forge.model: 'default' is a LangChain model"):
        write_config(tmp_path, {"default": SERVER})


def session(*user_turns):
    messages = []
    for i, text in enumerate(user_turns):
        messages += [Message(turn_id=f"t{2 * i + 1}", role="user", content=text),
                     Message(turn_id=f"t{2 * i + 2}", role="assistant", content="Noted!")]
    return Session(session_id="s1", user_id="me", messages=messages)


def test_the_plain_text_agents_read_any_chat_models_lines(tmp_path, embedder):
    # The note-taker and the dreamer answer in plain lines, so any chat model serves: no
    # format instructions, and what is not a note (chatter, a courtesy) is dropped with why.
    settings = write_config(tmp_path, {"default": "embedded:smollm2-135m-instruct"})
    DayLog(settings.paths.days).append([session("I moved to Lisbon, Portugal last May.")])
    notes = ("Sure! Here are the notes:\n1. The user moved to Lisbon, Portugal last May\n"
             "* user's home is in Lisbon\n- The user thanks the assistant.")
    dream = ("Q: Where did I move last May?\n2) Q: When did I move to Lisbon?\n"
             "S: Remind me where I moved.\nN: What is the capital of Portugal?")
    judgement = json.dumps({"reason": "stated", "grounded": True, "importance": 4, "utility": 4})
    keep = json.dumps({"keep": True, "note": "fine", "reinforce": []})
    models = {"notetaker": FakeListChatModel(responses=[notes]),
              "dreamer": FakeListChatModel(responses=[dream]),
              "verifier": FakeListChatModel(responses=[judgement]),
              "reshaper": FakeListChatModel(responses=["none"]),
              "persona": FakeListChatModel(responses=[keep])}
    summary = asyncio.run(run_night(settings, models=models, embedder=embedder, learner=None))
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    read = next(s for s in steps if s.agent == "notetaker")
    assert "JSON" not in read.prompt[-1]["content"]  # plain lines: no format instructions
    assert read.parsed == ["The user moved to Lisbon, Portugal last May.",
                           "The user's home is in Lisbon."]
    assert read.checks == ["not a note about the user: 'Sure! Here are the notes:'",
                           "a request or courtesy, not a fact: 'The user thanks the assistant.'"]
    memories = {m.text: m for m in MemoryStore(settings.paths.memories_db).list(user_id="me")}
    moved = memories["The user moved to Lisbon, Portugal last May."]
    assert moved.question == "Where did I move last May?"
    assert moved.phrasings == ["When did I move to Lisbon?", "Remind me where I moved."]
    assert moved.neighbours == []  # the capital of Portugal names the note's Portugal
    assert moved.answer == "You moved to Lisbon, Portugal last May."


# -- one night with the verifier behind mlx_lm.server ---------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_server(smollm2_dir, model_cache, tmp_path_factory):
    """``mlx_lm.server`` serving the default model (the embedded SmolLM2 GGUF converted once
    into an mlx-lm folder in the model cache: the server loads only such folders) on a free
    port of 127.0.0.1; stopped at the end."""
    from reverie.runtime.sources import converted_gguf

    folder = converted_gguf(next(smollm2_dir.glob("*.gguf")), model_cache)
    port = _free_port()
    env = dict(os.environ)
    blas = ctypes.util.find_library("openblas")
    if sys.platform.startswith("linux") and blas:  # as Reverie itself loads it (blas.py)
        env["LD_PRELOAD"] = "libopenblas.so.0"
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlx_lm.server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.e2e
def test_a_night_with_the_verifier_on_chatopenai_against_mlx_lm_server(tmp_path, model_cache,
                                                                       mlx_server):
    from reverie.runtime.models import Runtime

    url, log = mlx_server
    settings = write_config(
        tmp_path, {"default": "embedded:smollm2-135m-instruct",
                   "server": {"langchain": "langchain_openai.ChatOpenAI",
                              "args": {"base_url": url, "api_key": "none",
                                       "model": "default_model", "max_retries": 0}}},
        {"notetaker": {"model": "default", "max_tokens": 96},
         "dreamer": {"model": "default", "temperature": 1.0, "min_p": 0.1, "max_tokens": 128},
         "verifier": {"model": "server", "temperature": 0.0, "max_tokens": 96},
         "reshaper": {"model": "default", "max_tokens": 96}},
        night={"max_notes": 2, "reshape_rounds": 1, "dream_bursts": 1})
    settings.models.cache_dir = model_cache
    DayLog(settings.paths.days).append([session(
        "Hi! My name is Ana and my cat is called Miso.", "I work as a nurse in Porto.")])
    runtime = Runtime(settings)
    # the note-taker is a fake (SmolLM2 may write no note at all): what is tested is the
    # verifier behind the server, which then judges each note
    reader = FakeListChatModel(responses=["- The user's cat is called Miso.\n"
                                          "- The user works as a nurse in Porto."])
    try:
        summary = asyncio.run(run_night(settings, models={"notetaker": reader},
                                        runtime=runtime, learner=None))
    finally:
        runtime.close()
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    verifies = [s for s in steps if s.agent == "verifier"]
    assert summary["sessions"] == 1 and summary["candidates"] >= 1
    assert summary["candidates"] == summary["rejected"] + summary["approved"] + summary["vetoed"]
    assert verifies and all(s.model == "default_model" for s in verifies)  # ChatOpenAI's name
    assert all(s.raw_output and not s.error.startswith("models.") for s in verifies)
    assert all("JSON schema" in s.prompt[-1]["content"] for s in verifies)
    served = log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert served >= len(verifies)  # every verifier call went through the server
    assert all(s.model.startswith("default") and "smollm2" in s.model
               for s in steps if s.agent == "dreamer")
    assert (settings.paths.diary / summary["night_id"] / "summary.json").exists()
