"""`reverie serve`: the OpenAI-compatible server, started in-process on 127.0.0.1 and spoken
to with the `openai` package. A fake chat model (it echoes the user and keeps every prompt)
for the wire format, users, sessions, retrieval and auth; a tiny random llama on the real
MLX engine for concurrent generation and the switch to a newly promoted version; the real
default model end to end (e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httpx
import openai
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field
from typer.testing import CliRunner

from conftest import REPO, tiny_llama
from reverie.cli import app as cli
from reverie.cli.serve import bind_check
from reverie.config import load_settings
from reverie.memory.daylog import DayLog
from reverie.runtime.models import Runtime
from reverie.wake.chat import approx_tokens, turn_messages
from reverie.wake.serve import (ChatMessage, Server, create_app, is_loopback, listen, read_turn,
                                  uvicorn_server)


class Echo(BaseChatModel):
    """Answers "You said: <last message>" word by word; keeps each prompt and its
    generation arguments. With ``barrier`` every call waits there first."""

    seen: list = Field(default_factory=list)
    barrier: Any = None

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append((list(messages), kwargs))
        if self.barrier is not None:
            self.barrier.wait(timeout=60)
        for word in f"You said: {messages[-1].content}".split(" "):
            yield ChatGenerationChunk(message=AIMessageChunk(content=word + " "))

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        text = "".join(c.message.content for c in self._stream(messages, stop, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


@contextlib.contextmanager
def serving(app):
    """``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(url, key="unused", **kw):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_cache):
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path_factory.mktemp("data"))
    s.models.cache_dir = model_cache
    s.wake.user = "carol"
    return s


@pytest.fixture(scope="module")
def runtime(settings):
    runtime = Runtime(settings)      # the embedder for retrieval; the fake model answers
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def echo_server(settings, runtime):
    model = Echo()
    server = Server(settings, runtime, chat_model=model)
    with serving(create_app(server)) as url:
        yield url, model, settings


def test_two_users_streaming_and_not_sessions_and_models(echo_server):
    url, model, settings = echo_server
    assert [m.id for m in client(url).models.list().data] == ["base"]

    # ana names herself in the body's `user`, with her own system message
    ana = client(url)
    first = [{"role": "system", "content": "Answer in French."},
             {"role": "user", "content": "My dog is called Biscuit."}]
    reply = ana.chat.completions.create(model="base", messages=first, user="ana",
                                        max_tokens=7, temperature=0.3)
    answer = reply.choices[0].message.content
    assert answer == "You said: My dog is called Biscuit."
    assert reply.object == "chat.completion" and reply.model == "base"
    assert reply.choices[0].finish_reason == "stop"
    prompt, kwargs = model.seen[-1]
    assert kwargs == {"max_tokens": 7, "temperature": 0.3}
    # the chat's frame (identity first), the client's system text after it, one system turn
    assert [m.type for m in prompt] == ["system", "human"]
    identity = prompt[0].content.split("\n\nAnswer in French.")[0]
    assert identity.strip() and prompt[0].content.endswith("Answer in French.")
    assert prompt[1].content == "My dog is called Biscuit."

    # bob names himself in the header and streams
    bob = client(url, default_headers={"X-Reverie-User": "bob"})
    stream = bob.chat.completions.create(model="base", stream=True, messages=[
        {"role": "user", "content": "I live in Porto."}], stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() \
        == "You said: I live in Porto."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None

    # ana goes on (the client sends the whole conversation): the same day-log session
    ana.chat.completions.create(model="base", user="ana", messages=first + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "And a cat?"}])
    prompt, _ = model.seen[-1]
    assert [m.content for m in prompt[1:]] == ["My dog is called Biscuit.", answer, "And a cat?"]

    log = DayLog(settings.paths.days)
    (ana_s,) = log.sessions("ana")
    assert ana_s.user_id == "ana" and ana_s.source == "serve"
    assert [(m.role, m.content) for m in ana_s.messages] == [
        ("user", "My dog is called Biscuit."), ("assistant", answer),
        ("user", "And a cat?"), ("assistant", "You said: And a cat?")]
    assert [m.turn_id for m in ana_s.messages] == ["t1", "t2", "t3", "t4"]
    (bob_s,) = log.sessions("bob")
    assert [(m.role, m.content) for m in bob_s.messages] == [
        ("user", "I live in Porto."), ("assistant", "You said: I live in Porto.")]

    # a new conversation (and a regenerated first answer) are sessions of their own
    ana.chat.completions.create(model="base", user="ana",
                                messages=[{"role": "user", "content": "Hello again."}])
    ana.chat.completions.create(model="base", user="ana", messages=first)
    sessions = log.sessions("ana")
    assert len(sessions) == 3 and sessions[0].session_id == ana_s.session_id
    assert [len(s.messages) for s in sessions] == [4, 2, 2]
    # nobody named: wake.user
    client(url).chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])
    assert log.sessions(settings.wake.user)[0].messages[0].content == "Hi"


def test_the_session_header_keeps_one_session_for_last_message_clients(echo_server):
    url, _, settings = echo_server
    dan = client(url, default_headers={"X-Reverie-User": "dan", "X-Reverie-Session": "s1"})
    for text in ("One.", "Two.", "Three."):
        dan.chat.completions.create(model="base", messages=[{"role": "user", "content": text}])
    (session,) = DayLog(settings.paths.days).sessions("dan")
    assert [m.content for m in session.messages if m.role == "user"] == ["One.", "Two.", "Three."]


def test_a_session_the_night_consumed_is_not_grown(echo_server):
    url, _, settings = echo_server
    log = DayLog(settings.paths.days)
    eve = client(url, default_headers={"X-Reverie-User": "eve"})
    first = [{"role": "user", "content": "I play the cello."}]
    answer = eve.chat.completions.create(model="base", messages=first).choices[0].message.content
    log.mark_consumed(log.sessions("eve"), "night-1")
    eve.chat.completions.create(model="base", messages=first + [
        {"role": "assistant", "content": answer}, {"role": "user", "content": "Since 2019."}])
    old, new = log.sessions("eve")
    assert len(old.messages) == 2 and old.content_hash in log.consumed()
    assert [m.content for m in new.messages] == ["Since 2019.", "You said: Since 2019."]
    assert [s.content_hash for s in log.unconsumed("eve")] == [new.content_hash]


def test_retrieval_puts_the_users_memory_into_the_prompt(echo_server, runtime):
    import chromadb

    from reverie.memory.facts import MemoryIndex
    from reverie.memory.records import Memory
    from reverie.memory.store import MemoryStore
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction

    url, model, settings = echo_server
    store = MemoryStore(settings.paths.memories_db)
    index = MemoryIndex(chromadb.PersistentClient(path=str(settings.paths.chroma)),
                        MiniLMEmbeddingFunction(runtime.embedder()))
    for user, city in (("fay", "Lisbon"), ("gus", "Oslo")):
        memory = Memory(user_id=user, kind="fact", question="Which city does the user live in?",
                        answer=city, status="verified")
        store.add(memory)
        index.upsert(memory)
    client(url, default_headers={"X-Reverie-User": "fay"}).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Which city do I live in?"}])
    system = model.seen[-1][0][0]
    assert system.type == "system" and "Lisbon" in system.content
    assert "What you remember about the user" in system.content and "Oslo" not in system.content


def test_bad_user_id_gets_400_and_nothing_is_logged(echo_server):
    url, _, settings = echo_server
    with pytest.raises(openai.BadRequestError) as bad:
        client(url, default_headers={"X-Reverie-User": "../etc"}).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}])
    error = bad.value.body
    assert error["param"] == "user" and "invalid user id" in error["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(model="base", user=".hidden",
                                            messages=[{"role": "user", "content": "hi"}])
    assert "'.hidden'" in bad.value.body["message"]
    assert not (settings.paths.days / ".hidden").exists()
    # malformed requests are OpenAI-style 400s too
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(model="base", messages=[
            {"role": "assistant", "content": "I spoke last"}])
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(model="base", max_tokens=0,
                                            messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["param"] == "max_tokens"


def test_a_long_conversation_loses_its_oldest_turns_from_the_prompt_only(settings, runtime):
    small = settings.model_copy(deep=True)
    small.wake.context_tokens, small.wake.compact_at = 256, 1.0
    server = Server(small, runtime, chat_model=Echo())
    said = [ChatMessage(role=("user", "assistant")[i % 2], content=f"{i}: " + "words " * 40)
            for i in range(8)] + [ChatMessage(role="user", content="last")]
    turn = read_turn([ChatMessage(role="system", content="Be brief.")] + said)
    whole = turn_messages(server.frame, turn.text, [], turn.history, instructions="Be brief.")
    prompt = server.prompt(turn, docs=[])
    kept = [m.content for m in prompt[1:]]
    assert approx_tokens(prompt) <= 256 < approx_tokens(whole)
    assert kept[-1] == "last" and kept[-3:-1] == [said[6].content, said[7].content]
    assert not kept[0].startswith("0: ") and prompt[1].type == "human"
    assert prompt[0].content.endswith("Be brief.")


def test_auth_rejects_a_wrong_or_missing_key(settings, runtime):
    server = Server(settings, runtime, chat_model=Echo())
    with serving(create_app(server, api_key="sesame")) as url:
        with pytest.raises(openai.AuthenticationError) as denied:
            client(url, key="wrong").chat.completions.create(
                model="base", messages=[{"role": "user", "content": "hi"}], user="hal")
        assert denied.value.status_code == 401
        assert denied.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        missing = httpx.post(f"{url}/chat/completions", json={
            "model": "base", "user": "hal", "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert DayLog(settings.paths.days).sessions("hal") == []
        reply = client(url, key="sesame").chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], user="hal")
        assert reply.choices[0].message.content == "You said: hi"


def test_concurrent_requests_are_served_together(settings, runtime):
    # each generation waits for the other one: served one after the other (or on a blocked
    # event loop), the barrier breaks and the requests fail
    model = Echo(barrier=threading.Barrier(2))
    server = Server(settings, runtime, chat_model=model)

    async def both(url):
        ai = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        plain = ai.chat.completions.create(model="base", user="ivy", messages=[
            {"role": "user", "content": "first"}])
        streamed = await ai.chat.completions.create(model="base", user="jon", stream=True,
                                                    messages=[{"role": "user", "content": "second"}])

        async def text(stream):
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return await asyncio.gather(plain, text(streamed))

    with serving(create_app(server)) as url:
        plain, streamed = asyncio.run(both(url))
    assert plain.choices[0].message.content == "You said: first"
    assert streamed.strip() == "You said: second"
    log = DayLog(settings.paths.days)
    assert log.sessions("ivy")[0].messages[1].content == "You said: first"
    assert log.sessions("jon")[0].messages[1].content == "You said: second"


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory, smollm2_tokenizer, model_cache):
    from reverie.training.versions import save_model_dir

    root = tmp_path_factory.mktemp("tiny")
    save_model_dir(tiny_llama(vocab_size=49152, seed=3), smollm2_tokenizer, root / "model")
    s = load_settings(REPO / "config.yaml", data_dir=root / "data")
    s.models.cache_dir = model_cache
    s.models.chat = {"default": str(root / "model")}
    for role in s.roles.values():
        role.model = "default"
    s.wake.rag = False
    return s


def test_the_mlx_engine_serves_concurrent_requests_and_a_promoted_version(tiny_settings,
                                                                          smollm2_tokenizer):
    from reverie.training.versions import Versions, learned_folders

    runtime = Runtime(tiny_settings)
    server = Server(tiny_settings, runtime)
    assert server.warm() == "base"

    async def both(url):
        ai = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        plain = ai.chat.completions.create(model="base", user="kim", max_tokens=5,
                                           messages=[{"role": "user", "content": "Hello there"}])
        streamed = await ai.chat.completions.create(
            model="base", user="lou", stream=True, max_tokens=6,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Good morning"}])
        return await asyncio.gather(plain, _collect(streamed))

    try:
        with serving(create_app(server)) as url:
            plain, chunks = asyncio.run(both(url))
            assert plain.usage.completion_tokens == 5 and plain.usage.prompt_tokens > 5
            assert plain.choices[0].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 6
            log = DayLog(tiny_settings.paths.days)
            assert log.sessions("kim")[0].messages[1].content == plain.choices[0].message.content
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert log.sessions("lou")[0].messages[1].content == streamed.strip()
            assert log.sessions("kim")[0].messages[0].content == "Hello there"

            # a night in another process promotes a version: the next request loads it
            Versions(tiny_settings.paths.versions).save_model(
                "v1", tiny_llama(vocab_size=49152, seed=9), smollm2_tokenizer, activate=True)
            assert [m.id for m in client(url).models.list().data] == ["v1"]
            reply = client(url).chat.completions.create(
                model="v1", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
            assert reply.model == "v1"
            assert runtime.folders == learned_folders(tiny_settings) != {}
            assert runtime.load("default").source == str(tiny_settings.paths.versions / "v1")
    finally:
        runtime.close()


async def _collect(stream):
    return [c async for c in stream]


@pytest.mark.e2e
def test_the_default_model_answers_and_the_turn_is_logged(tmp_path, model_cache):
    settings = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    settings.models.cache_dir = model_cache
    runtime = Runtime(settings)
    try:
        server = Server(settings, runtime)
        with serving(create_app(server)) as url:
            reply = client(url, default_headers={"X-Reverie-User": "max"}).chat.completions.create(
                model="base", max_tokens=24, messages=[
                    {"role": "user", "content": "What is the capital of France?"}])
        answer = reply.choices[0].message.content
        assert "Paris" in answer
        (session,) = DayLog(settings.paths.days).sessions("max")
        assert [m.content for m in session.messages] == ["What is the capital of France?", answer]
    finally:
        runtime.close()


def test_loopback_only_without_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert bind_check("127.0.0.1", None, False) is None
    assert bind_check("0.0.0.0", "key", False) is None and bind_check("0.0.0.0", None, True) is None
    assert "--no-auth" in bind_check("0.0.0.0", None, False)


def test_the_cli_refuses_a_public_host_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("REVERIE_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["--config", str(REPO / "config.yaml"), "--data-dir",
                                      str(tmp_path), "serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in result.output
    assert "--no-auth" in result.output and "Traceback" not in result.output


def test_served_turns_are_slept_on(echo_server, runtime):
    # what a client said over the API is the night's input, like a `reverie chat` turn
    import json

    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from reverie.graphs.run import run_night
    from reverie.memory.diary import read_steps

    url, _, settings = echo_server
    client(url).chat.completions.create(
        model="base", user="dora",
        messages=[{"role": "user", "content": "I keep bees on my roof in Ghent."}])
    fake = lambda text: FakeListChatModel(responses=[text])  # noqa: E731
    models = {"notetaker": fake("none"), "dreamer": fake("none"), "verifier": fake("{}"),
              "reshaper": fake("none"), "persona": fake("{}")}
    summary = asyncio.run(run_night(settings, models=models, embedder=runtime.embedder(),
                                    user_id="dora", learner=None))
    assert summary["sessions"] == 1
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    read = next(s for s in steps if s.agent == "notetaker")
    assert "I keep bees on my roof in Ghent." in read.prompt[-1]["content"]
    assert DayLog(settings.paths.days).unconsumed("dora") == []
