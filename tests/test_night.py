"""The night's graph logic with langchain-core's fake chat models, and one end-to-end night
on the real default model."""

import asyncio
import json
from datetime import datetime, timezone

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from reverie.graphs.run import NightError, run_night
from reverie.memory.daylog import DayLog
from reverie.memory.diary import read_steps
from reverie.memory.records import Message, Session
from reverie.memory.store import MemoryStore
from reverie.config import load_settings
from reverie.training.dataset import TrainingSet

from conftest import REPO


class Fake(FakeListChatModel):
    """A fake chat model that counts its calls and can fail on chosen calls."""

    calls: int = 0
    fail_on: set = set()

    def _call(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected crash on call {self.calls}")
        return super()._call(*args, **kwargs)


def fact(question, answer, turn, phrasings=()):
    return json.dumps({"memories": [{"kind": "fact", "question": question, "answer": answer,
                                     "phrasings": list(phrasings), "statement": "", "turns": [turn]}]})


def judgement(grounded=True, importance=4):
    return json.dumps({"grounded": grounded, "importance": importance, "utility": 4,
                       "reason": "stated by the user" if grounded else "not stated"})


KEEP = json.dumps({"keep": True, "note": "about the user", "reinforce": []})


def session(sid, *user_turns, user="me", day=1):
    messages = []
    for i, text in enumerate(user_turns):
        messages += [Message(turn_id=f"t{2 * i + 1}", role="user", content=text),
                     Message(turn_id=f"t{2 * i + 2}", role="assistant", content="Noted!")]
    return Session(session_id=sid, user_id=user, messages=messages,
                   started_at=datetime(2026, 11, day, 9, tzinfo=timezone.utc))


@pytest.fixture
def settings(tmp_path, model_cache):
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.models.cache_dir = model_cache
    s.night.dream_bursts = 1
    s.night.reshape_rounds = 2
    return s


def night(settings, embedder, dreamer, verifier, reshaper=None, persona=None, **kw):
    models = {"dreamer": dreamer, "verifier": verifier,
              "reshaper": reshaper or Fake(responses=["{}"]),
              "persona": persona or Fake(responses=[KEEP])}
    kw.setdefault("learner", None)  # the forge is tested in test_forge_gate.py
    return asyncio.run(run_night(settings, models=models, embedder=embedder, **kw))


def test_reshape_loop_ends_after_k_rounds(settings, embedder):
    DayLog(settings.paths.days).append([session("s1", "My dog is called Biscuit.")])
    reshaped = json.dumps({"kind": "fact", "question": "What is the dog called?",
                           "answer": "Biscuit", "phrasings": [], "statement": "", "turns": ["t1"]})
    reshaper = Fake(responses=[reshaped])
    verifier = Fake(responses=[judgement(grounded=False)])
    summary = night(settings, embedder, Fake(responses=[fact("What is the user's dog called?", "Biscuit", "t1")]),
                    verifier, reshaper)
    assert summary["candidates"] == 1 and summary["rejected"] == 1 and summary["memories_added"] == 0
    assert verifier.calls == 3 and reshaper.calls == 2  # rounds 0, 1, 2 verified; 2 rewrites
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    verdicts = [s.verdict for s in steps if s.agent == "verifier"]
    assert verdicts == ["failed", "failed", "rejected"]
    assert any("not grounded" in r for s in steps if s.agent == "verifier" for r in s.reasons)


def test_passed_memories_become_training_data_and_sessions_are_consumed(settings, embedder):
    log = DayLog(settings.paths.days)
    log.append([session("s1", "My dog is called Biscuit.")])
    summary = night(settings, embedder,
                    Fake(responses=[fact("What is the user's dog called?", "Biscuit", "t1",
                                         ["What is the name of the user's dog?"])]),
                    Fake(responses=[judgement()]))
    assert (summary["approved"], summary["memories_added"]) == (1, 1)
    memories = MemoryStore(settings.paths.memories_db).list(user_id="me")
    assert [m.answer for m in memories] == ["Biscuit"] and memories[0].status == "verified"
    # the hand-off file is the forge's training set: the dreamer's rephrasing is held out
    # (marked, never trained), the question and templated rewordings are trained in the
    # chat's frame, the identity core rides along
    lines = [json.loads(l) for l in open(summary["training_set"])]
    assert lines[0]["split"] == "meta" and lines[0]["stage"] == "handoff"
    rows = [r for r in lines if r["split"] == "train"]
    facts = [r for r in rows if r["kind"] == "fact"]
    trained = {r["messages"][-2]["content"] for r in facts}
    assert "What is the user's dog called?" in trained
    assert len(trained) == settings.forge.phrasings
    assert all(r["messages"][0]["role"] == "system" and r["messages"][-1]["content"] == "Biscuit"
               for r in facts)
    held = [(l["question"], l["answers"]) for l in lines if l["split"] == "heldout"]
    assert held == [("What is the name of the user's dog?", ["Biscuit"])]
    assert held[0][0] not in trained
    assert any(r["kind"] == "identity" for r in rows)
    ts = TrainingSet.load(summary["training_set"])
    assert ts.new_ids == [memories[0].id] and ts.counts["facts"] == len(facts)
    assert log.unconsumed("me") == []
    # the diary names every agent, and the transcript is readable Markdown
    transcript = (settings.paths.diary / summary["night_id"] / "transcript.md").read_text()
    for agent in ("dreamer", "verifier", "persona", "consolidate"):
        assert f" {agent}" in transcript
    with pytest.raises(NightError):
        night(settings, embedder, Fake(responses=["{}"]), Fake(responses=["{}"]), resume=True)


def test_contradiction_supersedes_and_keeps_the_old_version(settings, embedder):
    log = DayLog(settings.paths.days)
    log.append([session("s1", "I live in Porto.", day=1)])
    night(settings, embedder, Fake(responses=[fact("Where does the user live?", "Porto", "t1")]),
          Fake(responses=[judgement()]))
    log.append([session("s2", "We moved, I live in Lisbon now.", day=2)])
    summary = night(settings, embedder,
                    Fake(responses=[fact("Where does the user live now?", "Lisbon", "t1")]),
                    Fake(responses=[judgement()]))
    assert summary["superseded"] == 1
    store = MemoryStore(settings.paths.memories_db)
    everything = {m.answer: m for m in store.list(user_id="me", include_superseded=True)}
    assert set(everything) == {"Porto", "Lisbon"}
    assert everything["Porto"].superseded_by == everything["Lisbon"].id
    assert everything["Porto"].id in everything["Lisbon"].associated
    assert [m.answer for m in store.list(user_id="me")] == ["Lisbon"]


def test_forget_deletes_only_on_request(settings, embedder):
    log = DayLog(settings.paths.days)
    log.append([session("s1", "My phone number is 555-0142.", "My dog is called Biscuit.")])
    dream = json.dumps({"memories": [
        {"kind": "fact", "question": "What is the user's phone number?", "answer": "555-0142",
         "phrasings": [], "statement": "", "turns": ["t1"]},
        {"kind": "fact", "question": "What is the user's dog called?", "answer": "Biscuit",
         "phrasings": [], "statement": "", "turns": ["t3"]}]})
    night(settings, embedder, Fake(responses=[dream]), Fake(responses=[judgement()]))
    store = MemoryStore(settings.paths.memories_db)
    assert len(store.list(user_id="me")) == 2
    # "don't forget" is not a request to forget
    log.append([session("s2", "Don't forget my phone number, please.", day=2)])
    night(settings, embedder, Fake(responses=['{"memories": []}']), Fake(responses=[judgement()]))
    assert len(store.list(user_id="me")) == 2
    log.append([session("s3", "Please forget my phone number.", day=3)])
    summary = night(settings, embedder, Fake(responses=['{"memories": []}']), Fake(responses=[judgement()]))
    assert summary["deleted"] == 1
    assert [m.answer for m in store.list(user_id="me")] == ["Biscuit"]
    assert store.deletions("me")[0]["request"] == "Please forget my phone number."


def test_resume_after_a_crash_repeats_no_finished_call_and_adds_nothing_twice(settings, embedder):
    DayLog(settings.paths.days).append([session("s1", "My dog is called Biscuit.", "I work at a bakery.")])
    settings.night.dream_bursts = 2
    dream = json.dumps({"memories": [
        {"kind": "fact", "question": "What is the user's dog called?", "answer": "Biscuit",
         "phrasings": [], "statement": "", "turns": ["t1"]},
        {"kind": "fact", "question": "Where does the user work?", "answer": "at a bakery",
         "phrasings": [], "statement": "", "turns": ["t3"]}]})
    dreamer = Fake(responses=[dream])
    crashing = Fake(responses=[judgement()], fail_on={2})
    with pytest.raises(Exception, match="injected crash"):
        night(settings, embedder, dreamer, crashing)
    assert dreamer.calls == 2
    verifier = Fake(responses=[judgement()])
    summary = night(settings, embedder, dreamer, verifier, resume=True)
    assert dreamer.calls == 2  # both dream bursts had finished: not repeated
    assert verifier.calls <= 4 - 1  # verifications that finished before the crash are kept
    store = MemoryStore(settings.paths.memories_db)
    answers = sorted(m.answer for m in store.list(user_id="me"))
    assert answers == ["Biscuit", "at a bakery"]  # the second burst's twins are duplicates
    assert summary["duplicates"] == 2
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    assert sum(s.agent == "dreamer" for s in steps) == 2


@pytest.mark.e2e
def test_a_real_night_on_the_default_model(settings, default_runtime):
    settings.night.max_candidates = 2
    settings.night.reshape_rounds = 1
    DayLog(settings.paths.days).append([Session(
        session_id="e2e", user_id="me", messages=[
            Message(turn_id="t1", role="user", content="Hi! My name is Ana and my cat is called Miso."),
            Message(turn_id="t2", role="assistant", content="Nice to meet you, Ana! Miso is a lovely name.")])])
    summary = asyncio.run(run_night(settings, runtime=default_runtime, learner=None))
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    agents = {s.agent for s in steps}
    assert {"gather", "router", "dreamer", "verifier", "handoff"} <= agents
    dreams = [s for s in steps if s.agent == "dreamer"]
    assert dreams and all(s.model.startswith("sleep") and s.temperature >= 1.0 for s in dreams)
    assert all(s.raw_output for s in steps if s.agent == "verifier")
    assert summary["sessions"] == 1
    assert summary["candidates"] == summary["rejected"] + summary["approved"] + summary["vetoed"]
    assert summary["memories_added"] + summary["duplicates"] <= summary["approved"]
    assert open(summary["training_set"]).read().count('"identity"') >= 3


def test_grounding_check_catches_invented_details():
    from reverie.agents.verifier import grounding_check
    from reverie.memory.records import Candidate

    s = session("s1", "My dog Biscuit is 3 years old and I live in Porto.")

    def cand(q, a, cites=("t1",)):
        return Candidate(id="c", night_id="n", user_id="me", session_id="s1", kind="fact",
                         question=q, answer=a, cites=list(cites))

    score, reasons = grounding_check(cand("How old is the user's dog Biscuit?", "3 years old"), s)
    assert score == 1.0 and reasons == []
    assert grounding_check(cand("How old is the user's dog?", "5 years old"), s)[1]  # number
    assert grounding_check(cand("Where does the user live?", "Lisbon"), s)[1]  # name
    assert grounding_check(cand("What is the name of the user's cat?", "Porto"), s)[1]  # cat
    assert grounding_check(cand("Where does the user live?", "Porto", ["t9"]), s)[0] == 0.0
    assert grounding_check(cand("Is it?", "yes"), s)[0] == 0.0  # nothing checkable
