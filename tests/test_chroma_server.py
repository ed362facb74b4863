"""The fact store and the memory index on a Chroma server (``memory.chroma_url``).

A real server (``chroma run``, shipped with chromadb) listens on 127.0.0.1 at a free port
for this module; the night test starts a second one it can stop and start again. The
embeddings are Reverie's (all-MiniLM-L6-v2, the session's ``embedder``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import chromadb
import httpx
import numpy as np
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from reverie.config import ConfigError, MemoryConfig, load_settings
from reverie.memory.daylog import DayLog
from reverie.memory.facts import ChromaUnavailable, FactChunk, FactStore, MemoryIndex, open_client
from reverie.memory.records import Memory, Message, Session
from reverie.memory.store import MemoryStore

from conftest import REPO, NoteDreamer

CHROMA = Path(sys.executable).with_name("chroma")
START_S = 60  # bounded wait for the server's heartbeat (it answers in ~1 s when idle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """``chroma run --path PATH --host 127.0.0.1 --port PORT`` as a subprocess."""

    def __init__(self, path: Path, port: int | None = None):
        self.path, self.port = path, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = path.parent / f"{path.name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ChromaServer":
        if not CHROMA.exists():
            pytest.skip(f"no chroma CLI at {CHROMA} (it ships with the chromadb package)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(CHROMA), "run", "--path", str(self.path),
                                          "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`chroma run` exited with {self.proc.returncode}:\n"
                            + self.log.read_text(errors="replace")[-2000:])
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"`chroma run` did not answer its heartbeat at {self.url} in {START_S} s:\n"
                    + self.log.read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "db").start()
    yield srv
    srv.stop()


@pytest.fixture
def settings(tmp_path, server, model_cache):
    """Settings in a tmp data dir, on the server; each test its own database (a clean
    slate, created on first use)."""
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.models.cache_dir = model_cache
    s.memory = MemoryConfig(chroma_url=server.url, chroma_database=tmp_path.name[-60:])
    return s


def peer(settings) -> chromadb.ClientAPI:
    """A second, plain client on the same server and database (another process's view)."""
    url = settings.memory.chroma_url
    return chromadb.HttpClient(host=url.host, port=url.port,
                               database=settings.memory.chroma_database)


def ef_for(embedder):
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction

    return MiniLMEmbeddingFunction(embedder)


def dog(user="ana", answer="Biscuit", **kw) -> Memory:
    return Memory(user_id=user, kind="fact", question="What is the user's dog called?",
                  answer=answer, status="verified", **kw)


def test_facts_and_memories_live_in_the_server(settings, embedder):
    client = open_client(settings)
    assert client.database == settings.memory.chroma_database
    ef = ef_for(embedder)
    facts, index = FactStore(client, ef), MemoryIndex(client, ef)
    chunk = FactChunk(user_id="ana", session_id="s1", turn_id="t1",
                      text="The deploy script: https://git.example/ana/deploy.sh")
    assert facts.add([chunk]) == 1 and facts.add([chunk]) == 0
    memory = dog()
    index.upsert(memory)

    [(found, distance)] = facts.query("where is the deploy script?", "ana", k=1)
    assert found.id == chunk.id and found.text == chunk.text and distance < 0.75
    assert index.nearest("What is my dog called?", "ana", k=1)[0][0] == memory.id
    assert facts.query("deploy script", "bob") == []  # filtered by user on the server too

    # another client sees the records, with Reverie's own embeddings (not the server's)
    other = peer(settings)
    stored = other.get_collection("memories").get(ids=[memory.id],
                                                   include=["embeddings", "documents"])
    assert stored["documents"] == [memory.statement()]
    assert np.allclose(stored["embeddings"][0], embedder.embed([memory.statement()])[0], atol=1e-5)
    assert other.get_collection("facts").get(ids=[chunk.id])["ids"] == [chunk.id]
    # and nothing went to the embedded store
    assert not settings.paths.chroma.exists()


def test_the_chat_retriever_reads_through_the_server(settings, embedder):
    from reverie.wake.retrieval import open_retriever

    store = MemoryStore(settings.paths.memories_db)
    ef = ef_for(embedder)
    client = open_client(settings)
    index, facts = MemoryIndex(client, ef), FactStore(client, ef)
    for memory in (dog(), dog(user="bob", answer="Rex")):
        store.add(memory)
        index.upsert(memory)
    facts.add([FactChunk(user_id="ana", session_id="s", turn_id="t1",
                         text="https://dogs.example/biscuit")])

    docs = open_retriever(settings, embedder, "ana").invoke("What is my dog called?")
    text = " ".join(d.page_content for d in docs)
    assert "Biscuit" in text and "Rex" not in text
    assert {d.metadata["source"] for d in docs} == {"memory", "fact"}
    assert not settings.paths.chroma.exists()


def test_sync_brings_the_server_index_in_line_with_the_store(settings, embedder):
    store = MemoryStore(settings.paths.memories_db)
    index = MemoryIndex(open_client(settings), ef_for(embedder))
    kept, gone = dog(), dog(answer="Rex")
    store.add(kept)
    index.upsert(gone)  # in the index, not in the store (deleted while the index was away)
    assert index.sync(store) == {"indexed": 1, "removed": 1}
    assert sorted(peer(settings).get_collection("memories").get()["ids"]) == [kept.id]


class Letters:
    """A model-free Chroma embedding function: letter counts, normalised (26-d)."""

    def __call__(self, input):
        out = []
        for text in input:
            v = np.array([text.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"], np.float32)
            out.append(v / max(float(np.linalg.norm(v)), 1e-6))
        return out

    embed_query = __call__

    @staticmethod
    def name() -> str:
        return "test_letters"

    def get_config(self) -> dict:
        return {}

    @staticmethod
    def build_from_config(config: dict) -> "Letters":
        return Letters()

    def is_legacy(self) -> bool:
        return False

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine"]


def test_collections_with_different_embedding_functions_open_side_by_side(tmp_path, embedder):
    # chromadb writes the embedding function into the configuration dict it is handed; a
    # shared dict made the second collection's function "conflict" with the first one's
    client = open_client(None, tmp_path / "chroma")
    FactStore(client, ef_for(embedder))
    index = MemoryIndex(client, Letters(), collection="letters")
    memory = dog()
    index.upsert(memory)
    assert index.nearest("What is the dog called?", "ana", k=1)[0][0] == memory.id


def test_a_dropped_connection_is_retried(settings, embedder, monkeypatch):
    facts = FactStore(open_client(settings), ef_for(embedder))
    real, calls = facts.collection.add, []

    def flaky(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return real(**kwargs)

    monkeypatch.setattr(facts.collection, "add", flaky)
    chunk = FactChunk(user_id="ana", session_id="s", turn_id="t1", text="https://a.example/x")
    assert facts.add([chunk]) == 1 and len(calls) == 2
    assert facts.get(chunk.id).text == chunk.text


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.memory = MemoryConfig(chroma_url=url)
    with pytest.raises(ChromaUnavailable) as info:
        open_client(s)
    message = str(info.value)
    assert "memory.chroma_url" in message and url in message and "chroma run" in message
    assert not (tmp_path / "data").exists()  # nothing written, not even the embedded folder

    # the CLI prints the message, no traceback
    from typer.testing import CliRunner

    from reverie.cli.main import _closing

    class Resource:
        closed = False

        def close(self):
            self.closed = True

    import typer

    resource, app = Resource(), typer.Typer()

    @app.command()
    def go():
        with _closing(resource):
            open_client(s)

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1 and resource.closed
    assert "memory.chroma_url" in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, ChromaUnavailable)  # handled, not raised


def test_a_missing_token_variable_is_named(tmp_path, monkeypatch, server):
    monkeypatch.delenv("REVERIE_TEST_CHROMA_TOKEN", raising=False)
    memory = MemoryConfig(chroma_url=server.url, chroma_token_env="REVERIE_TEST_CHROMA_TOKEN")
    with pytest.raises(ChromaUnavailable,
                       match=r"memory.chroma_token_env.*REVERIE_TEST_CHROMA_TOKEN"):
        open_client(memory)
    monkeypatch.setenv("REVERIE_TEST_CHROMA_TOKEN", "s3cret")
    client = open_client(memory)  # this server asks for no token; it is sent all the same
    assert client.get_settings().chroma_server_headers["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("bad", ["not a url", "ftp://127.0.0.1:8001",
                                 "http://user:pw@127.0.0.1:8001", "http://127.0.0.1:8001/?x=1"])
def test_a_bad_url_names_the_field(tmp_path, bad):
    config = tmp_path / "config.yaml"
    config.write_text(f"memory:\n  chroma_url: {json.dumps(bad)}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: memory.chroma_url"):
        load_settings(config)


# ------------------------------------------------------------------ a night, server dropping


class Fake(FakeListChatModel):
    pass


def test_a_night_whose_server_drops_stops_clearly_and_resumes(tmp_path, model_cache, embedder):
    from reverie.graphs.run import run_night, unfinished_night

    srv = ChromaServer(tmp_path / "db").start()
    try:
        s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
        s.models.cache_dir = model_cache
        s.memory = MemoryConfig(chroma_url=srv.url)
        DayLog(s.paths.days).append([Session(
            session_id="s1", user_id="me",
            started_at=datetime(2026, 11, 1, 9, tzinfo=timezone.utc), messages=[Message(turn_id="t1", role="user", content="My dog is called Biscuit. "
                              "His vet: https://vets.example/biscuit"),
                      Message(turn_id="t2", role="assistant", content="Noted!")])])
        note = "- The user's dog is called Biscuit."
        judged = json.dumps({"grounded": True, "importance": 4, "utility": 4, "reason": "stated"})
        keep = json.dumps({"keep": True, "note": "", "reinforce": []})

        def models():
            return {"notetaker": Fake(responses=[note]), "dreamer": NoteDreamer(),
                    "verifier": Fake(responses=[judged]),
                    "reshaper": Fake(responses=["none"]), "persona": Fake(responses=[keep])}

        def drop_after_route(node, update):
            if node == "route":  # the facts are in; the verifier's novelty check is next
                srv.stop()

        with pytest.raises(ChromaUnavailable) as info:
            asyncio.run(run_night(s, models=models(), embedder=embedder, learner=None,
                                  on_update=drop_after_route))
        message = str(info.value)
        assert "memory.chroma_url" in message and srv.url in message and "--resume" in message
        night_id = unfinished_night(s)
        assert night_id and MemoryStore(s.paths.memories_db).list(user_id="me") == []

        srv.start()  # same folder, same port
        summary = asyncio.run(run_night(s, models=models(), embedder=embedder, learner=None,
                                        resume=True))
        assert summary["night_id"] == night_id and summary["memories_added"] == 1
        [memory] = MemoryStore(s.paths.memories_db).list(user_id="me")
        client = open_client(s)
        assert client.get_collection("memories").get()["ids"] == [memory.id]
        assert client.get_collection("facts").count() == 1  # routed before the drop, kept
        assert not s.paths.chroma.exists()
    finally:
        srv.stop()
