"""The day side: the chat session (logging, retrieval, compaction, commands, triggers),
retrieval and the night kept per user, and the scheduling helpers; fake chat models."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import SystemMessage

from reverie.agents.router import forget_requests
from reverie.graphs.run import run_night
from reverie.memory.daylog import DayLog
from reverie.memory.records import Memory, Message, Session
from reverie.memory.store import MemoryStore
from reverie.prompts import load_prompt
from reverie.config import WakeConfig, load_settings
from reverie.wake.chat import CHAT_VARIABLES, COMPACT_VARIABLES, ChatSession
from reverie.wake.triggers import cron_line, next_time, parse_hhmm, wait_until

from conftest import REPO, NoteDreamer

SUMMARY = "The user has a dog called Biscuit and lives in Porto."


class Recorder(FakeListChatModel):
    """A fake chat model that keeps every prompt it got and answers summary requests with
    :data:`SUMMARY`."""

    seen: list = []

    def _call(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append(list(messages))
        if any("Summarise the conversation" in str(m.content) for m in messages):
            return SUMMARY
        return super()._call(messages, stop, run_manager, **kwargs)

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append(list(messages))
        yield from super()._stream(messages, stop, run_manager, **kwargs)


class Docs:
    """A retriever stand-in: the same documents for every query, and the queries."""

    def __init__(self, *texts):
        self.docs = [Document(page_content=t, metadata={"source": "memory", "distance": 0.2,
                                                        "id": f"m{i}"}) for i, t in enumerate(texts)]
        self.queries = []

    def invoke(self, text):
        self.queries.append(text)
        return list(self.docs)


def chat(tmp_path, responses=("Nice to meet you!",), user="ana", retriever=None, sleep=None,
         **cfg):
    model = Recorder(responses=list(responses))
    session = ChatSession(model, load_prompt("chat", CHAT_VARIABLES),
                          load_prompt("compact", COMPACT_VARIABLES), "You are Reverie.",
                          DayLog(tmp_path / "days"), user, WakeConfig(**cfg),
                          retriever=retriever, sleep=sleep)
    return session, model


def test_every_turn_is_logged_under_the_user(tmp_path):
    session, _ = chat(tmp_path, responses=["Hello!", "Noted."])
    assert session.handle("Hi, my dog is called Biscuit.").text == "Hello!"
    log = DayLog(tmp_path / "days")
    (first,) = log.sessions("ana")
    assert [m.content for m in first.messages] == ["Hi, my dog is called Biscuit.", "Hello!"]
    session.handle("I live in Porto.")
    (same,) = log.sessions("ana")        # the session grows in place: one line, four turns
    assert same.session_id == first.session_id and same.user_id == "ana"
    assert [m.role for m in same.messages] == ["user", "assistant"] * 2
    assert [m.turn_id for m in same.messages] == ["t1", "t2", "t3", "t4"]
    assert log.sessions("bob") == [] and log.size("ana") == sum(len(m.content) for m in same.messages)
    # streamed answers are logged the same way
    pieces = []
    session.handle("And I like tea.", on_token=pieces.append)
    assert "".join(pieces) == "Hello!" and log.sessions("ana")[0].messages[-1].content == "Hello!"


def test_retrieved_memories_go_into_the_system_prompt_only_with_rag(tmp_path):
    docs = Docs("What is the user's dog called? Biscuit")
    session, model = chat(tmp_path, retriever=docs)
    shown = []
    reply = session.handle("What is my dog called?", on_retrieved=shown.append)
    system = model.seen[-1][0]
    assert isinstance(system, SystemMessage) and "You are Reverie." in system.content
    assert "Biscuit" in system.content and reply.retrieved == docs.docs == shown[0]
    assert docs.queries == ["What is my dog called?"]
    session.rag = False
    session.handle("What is my dog called?")
    assert "Biscuit" not in model.seen[-1][0].content and len(docs.queries) == 1


def test_context_compacts_near_its_limit_and_the_log_keeps_everything(tmp_path):
    session, model = chat(tmp_path, responses=["ok " * 30], context_tokens=256, compact_at=0.75,
                          keep_turns=1)
    long = "I want to tell you about my day in Porto with my dog Biscuit. " * 2
    replies = [session.handle(f"{i}: {long}") for i in range(6)]
    assert any(r.compacted for r in replies) and not replies[0].compacted
    assert session.summary == SUMMARY
    # the summary (not the old turns) is in the prompt; the last exchange stays verbatim
    last_prompt = model.seen[-1]
    assert SUMMARY in last_prompt[0].content
    assert "0: I want" not in " ".join(str(m.content) for m in last_prompt)
    assert session.context_used() <= 256
    (logged,) = DayLog(tmp_path / "days").sessions("ana")
    assert len(logged.messages) == 12 and logged.messages[0].content.startswith("0: I want")
    # /compact by hand
    assert "compacted" in session.handle("/compact").text and len(session.history) == 2


def test_commands(tmp_path):
    nights = []
    new_model = Recorder(responses=["I slept well."])

    def sleep():
        nights.append(1)
        return new_model, "night n1: 1 memories added; model promoted night-n1"

    session, model = chat(tmp_path, sleep=sleep)
    session.handle("My dog is called Biscuit.")
    status = session.handle("/status")
    assert status.kind == "info" and "turns: 1" in status.text and "context:" in status.text
    assert "user: ana" in status.text

    assert "forget" in session.handle("/forget my phone number").text
    (logged,) = DayLog(tmp_path / "days").sessions("ana")
    (request,) = forget_requests(logged)       # the night's router will honour it
    assert request.target == "my phone number" and request.user_id == "ana"

    slept = session.handle("/sleep")
    assert slept.slept and nights == [1] and "promoted night-n1" in slept.text
    assert session.handle("Good morning").text == "I slept well."   # the new version answers
    sessions = DayLog(tmp_path / "days").sessions("ana")
    assert len(sessions) == 2                    # after a night, a new session begins
    assert session.handle("/quit").kind == "quit"
    assert "/sleep" in session.handle("/help").text
    with pytest.raises(ValueError):
        session.send("   ")


def test_auto_sleep_after_n_turns_and_at_sunset(tmp_path):
    nights = []
    session, _ = chat(tmp_path, sleep=lambda: (nights.append(1), (None, "slept"))[1],
                      auto_sleep_turns=2)
    assert not session.handle("one").slept
    second = session.handle("two")
    assert second.slept and "auto-sleep after 2 turns" in second.sleep_report and nights == [1]
    assert not session.handle("three").slept     # the count starts again

    sunset, _ = chat(tmp_path / "b", sleep=lambda: (nights.append(2), (None, "slept"))[1],
                     sunset_chars=120)
    assert not sunset.handle("short").slept
    assert "sunset" in sunset.handle("x" * 120).sleep_report and nights == [1, 2]
    # without a sleep function /sleep says so, and nothing breaks
    lone, _ = chat(tmp_path / "c")
    assert not lone.handle("/sleep").slept


def test_triggers():
    assert parse_hhmm("03:30") == (3, 30)
    for bad in ("25:00", "3", "ab:cd", "12:60"):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_hhmm(bad)
    evening = datetime(2026, 11, 21, 22, 15)
    assert next_time("23:00", evening) == datetime(2026, 11, 21, 23, 0)
    assert next_time("03:00", evening) == datetime(2026, 11, 22, 3, 0)
    assert next_time("22:15", evening) == datetime(2026, 11, 22, 22, 15)  # strictly after

    clock = [evening]
    slept = []

    def fake_sleep(seconds):
        slept.append(seconds)
        clock[0] += timedelta(seconds=seconds)

    wait_until(evening + timedelta(seconds=70), clock=lambda: clock[0], sleep=fake_sleep, step=30)
    assert slept == [30, 30, 10] and clock[0] == evening + timedelta(seconds=70)

    line = cron_line("03:30", REPO / "config.yaml", REPO, REPO / "data" / "logs" / "night.log",
                     executable="/opt/r/bin/reverie")
    assert line.startswith("30 3 * * * cd ")
    assert "/opt/r/bin/reverie --config " in line and line.split(">>")[0].rstrip().endswith("night")


# --------------------------------------------------------------------------- users apart


def test_retrieval_never_reads_another_users_data(tmp_path, embedder):
    import chromadb

    from reverie.memory.facts import FactChunk, FactStore, MemoryIndex
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction
    from reverie.wake.retrieval import MemoryRetriever

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    ef = MiniLMEmbeddingFunction(embedder)
    store, index, facts = MemoryStore(tmp_path / "m.sqlite"), MemoryIndex(client, ef), FactStore(client, ef)
    for user, dog in (("ana", "Biscuit"), ("bob", "Rex")):
        m = Memory(user_id=user, kind="fact", question="What is the user's dog called?",
                   answer=dog, status="verified")
        store.add(m)
        index.upsert(m)
        facts.add([FactChunk(user_id=user, session_id="s", turn_id="t1",
                             text=f"https://dogs.example/{dog.lower()}")])
    rejected = Memory(user_id="ana", kind="fact", question="What is the user's cat called?",
                      answer="Miso", status="rejected")
    store.add(rejected)
    index.upsert(rejected)

    ana = MemoryRetriever(user_id="ana", store=store, index=index, facts=facts, k=5, max_distance=2.0)
    docs = ana.invoke("What is my dog called?")
    assert docs and all(d.metadata["user_id"] == "ana" for d in docs)
    text = " ".join(d.page_content for d in docs)
    assert "Biscuit" in text and "dogs.example/biscuit" in text
    assert "Rex" not in text and "rex" not in text and "Miso" not in text   # bob's; rejected
    assert [d.metadata["distance"] for d in docs] == sorted(d.metadata["distance"] for d in docs)
    assert {d.metadata["source"] for d in docs} == {"memory", "fact"}
    # the distance cut-off
    strict = MemoryRetriever(user_id="ana", store=store, index=index, facts=facts, k=5,
                             max_distance=0.0)
    assert strict.invoke("What is my dog called?") == []


class Fake(FakeListChatModel):
    pass




def test_a_night_for_one_user_reads_only_that_users_data(tmp_path, embedder, model_cache):
    settings = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    settings.models.cache_dir = model_cache
    settings.night.dream_bursts = 1
    log = DayLog(settings.paths.days)
    day = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
    for user, text in (("ana", "My dog is called Biscuit."), ("bob", "My dog is called Rex.")):
        log.append([Session(session_id=f"s-{user}", user_id=user, started_at=day, messages=[
            Message(turn_id="t1", role="user", content=text),
            Message(turn_id="t2", role="assistant", content="Noted!")])])
    store = MemoryStore(settings.paths.memories_db)
    bobs_old = Memory(user_id="bob", kind="fact", question="Where does the user work?",
                      answer="Acme", status="learned")
    store.add(bobs_old)
    seen = {}

    def learner(night_id, training_set):
        from reverie.training.dataset import TrainingSet
        from reverie.training.forge import ForgeOutcome

        ts = TrainingSet.load(training_set)
        ids = {r["memory_id"] for r in ts.rows if r.get("memory_id")}
        seen["tonight"] = [store.get(i) for i in ts.new_ids]
        seen["earlier"] = [store.get(i) for i in ids - set(ts.new_ids)]
        seen["regression"] = [q for q, _ in ts.regression_items]
        return ForgeOutcome(False, None, "base", reasons=["test"])

    reader = Recorder(responses=["- The user's dog is called Biscuit."])
    models = {"notetaker": reader, "dreamer": NoteDreamer(),
              "verifier": Fake(responses=[json.dumps({"grounded": True, "importance": 4,
                                                      "utility": 4, "reason": "stated"})]),
              "reshaper": Fake(responses=["none"]),
              "persona": Fake(responses=[json.dumps({"keep": True, "note": "ok", "reinforce": []})])}
    asyncio.run(run_night(settings, models=models, embedder=embedder, user_id="ana",
                          learner=learner))
    prompts = " ".join(str(m.content) for call in reader.seen for m in call)
    assert "Biscuit" in prompts and "Rex" not in prompts          # bob's day never read
    assert [s.user_id for s in log.unconsumed()] == ["bob"]       # and not consumed
    assert [m.answer for m in seen["tonight"]] == ["Your dog is called Biscuit."]
    assert all(m.user_id == "ana" for m in seen["tonight"] + seen["earlier"])
    assert bobs_old.id not in {m.id for m in seen["earlier"]}     # not replayed into ana's night
    assert bobs_old.question not in seen["regression"]           # nor checked in her gate
    assert {m.user_id for m in store.list()} == {"ana", "bob"}
    assert [m.answer for m in store.list(user_id="bob")] == ["Acme"]
