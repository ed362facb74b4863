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

from conftest import REPO, NoteDreamer, Scripted, notes


class Fake(FakeListChatModel):
    """A fake chat model that counts its calls and can fail on chosen calls."""

    calls: int = 0
    fail_on: set = set()

    def _call(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError(f"injected crash on call {self.calls}")
        return super()._call(*args, **kwargs)


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


def night(settings, embedder, notetaker, verifier, reshaper=None, persona=None, dreamer=None,
          **kw):
    models = {"notetaker": notetaker, "verifier": verifier,
              "dreamer": dreamer or NoteDreamer(),
              "reshaper": reshaper or Fake(responses=["none"]),
              "persona": persona or Fake(responses=[KEEP])}
    kw.setdefault("learner", None)  # the forge is tested in test_forge_gate.py
    return asyncio.run(run_night(settings, models=models, embedder=embedder, **kw))


def reads(*rules):
    """A note-taker answering each turn by its words: ``(words in the turn, notes)``."""
    return Scripted(rules=[(key, notes(*lines)) for key, *lines in rules])


def test_reshape_loop_ends_after_k_rounds(settings, embedder):
    DayLog(settings.paths.days).append([session("s1", "My dog is called Biscuit.")])
    reshaper = Fake(responses=[notes("The user's dog is called Biscuit.")])
    verifier = Fake(responses=[judgement(grounded=False)])
    summary = night(settings, embedder, reads(("Biscuit", "The user's dog is called Biscuit.")),
                    verifier, reshaper)
    assert summary["candidates"] == 1 and summary["rejected"] == 1 and summary["memories_added"] == 0
    assert verifier.calls == 3 and reshaper.calls == 2  # rounds 0, 1, 2 verified; 2 rewrites
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    verdicts = [s.verdict for s in steps if s.agent == "verifier"]
    assert verdicts == ["failed", "failed", "rejected"]
    assert any("not grounded" in r for s in steps if s.agent == "verifier" for r in s.reasons)


def test_passed_notes_are_dreamed_on_and_become_training_data(settings, embedder):
    log = DayLog(settings.paths.days)
    log.append([session("s1", "My dog is called Biscuit.")])
    dreamer = NoteDreamer(rules=[("Biscuit", "Q: What's my dog called?\n"
                                             "Q: What is the name of my dog?\n"
                                             "Q: What did I name my dog?\n"
                                             "N: Which dog breed is Snoopy?\nN: What is my dog's breed?")])
    summary = night(settings, embedder, reads(("Biscuit", "The user's dog is called Biscuit.")),
                    Fake(responses=[judgement()]), dreamer=dreamer)
    assert (summary["approved"], summary["memories_added"]) == (1, 1)
    [memory] = MemoryStore(settings.paths.memories_db).list(user_id="me")
    # the note first, then the dream: the answer is the note said to the user (not sampled)
    assert memory.text == "The user's dog is called Biscuit."
    assert (memory.question, memory.answer) == ("What's my dog called?", "Your dog is called Biscuit.")
    assert memory.phrasings == ["What is the name of my dog?", "What did I name my dog?"]
    assert memory.neighbours == ["Which dog breed is Snoopy?"]  # the one about the user was dropped
    assert memory.status == "verified" and memory.source_turns == ["t1"]
    # the hand-off file is the forge's training set: the last phrasing is held out
    # (marked, never trained), the question and templated rewordings are trained in the
    # chat's frame, the identity core rides along
    lines = [json.loads(l) for l in open(summary["training_set"])]
    assert lines[0]["split"] == "meta" and lines[0]["stage"] == "handoff"
    rows = [r for r in lines if r["split"] == "train"]
    facts = [r for r in rows if r["kind"] == "fact"]
    trained = {r["messages"][-2]["content"] for r in facts}
    assert "What's my dog called?" in trained
    assert len(trained) == settings.forge.phrasings
    assert all(r["messages"][0]["role"] == "system" and
               r["messages"][-1]["content"] == "Your dog is called Biscuit." for r in facts)
    held = [(l["question"], l["answers"]) for l in lines if l["split"] == "heldout"]
    assert held == [("What did I name my dog?", ["Your dog is called Biscuit."])]
    assert held[0][0] not in trained
    assert any(r["kind"] == "identity" for r in rows)
    ts = TrainingSet.load(summary["training_set"])
    assert ts.new_ids == [memory.id] and ts.counts["facts"] == len(facts)
    assert log.unconsumed("me") == []
    # the diary names every agent, and the transcript is readable Markdown
    transcript = (settings.paths.diary / summary["night_id"] / "transcript.md").read_text()
    for agent in ("notetaker", "dreamer", "verifier", "persona", "consolidate"):
        assert f" {agent}" in transcript
    with pytest.raises(NightError):
        night(settings, embedder, Scripted(), Fake(responses=["{}"]), resume=True)


def test_a_note_about_someone_else_is_not_given_to_the_user(settings, embedder):
    DayLog(settings.paths.days).append([session(
        "s1", "My sister Ana does bouldering every weekend. My husky Luna is three.")])
    notetaker = reads(("bouldering", "The user does bouldering every weekend.",
                       "The user is three years old.", "The user's sister Ana does bouldering."))
    reshaper = Scripted(rules=[("three years old", notes("The user's husky Luna is three."))],
                        default="none")
    summary = night(settings, embedder, notetaker, Fake(responses=[judgement()]), reshaper)
    texts = sorted(m.text for m in MemoryStore(settings.paths.memories_db).list(user_id="me"))
    assert texts == ["The user's husky Luna is three.", "The user's sister Ana does bouldering."]
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    why = [r for s in steps if s.agent == "verifier" for r in s.reasons]
    assert any("about someone else" in r and "My sister" in r for r in why)
    assert any("about someone else" in r and "My husky" in r for r in why)


def test_contradiction_supersedes_and_keeps_the_old_version(settings, embedder):
    log = DayLog(settings.paths.days)
    where = NoteDreamer(rules=[("lives in", "Q: Where do I live?\nQ: Which city do I live in?")])
    log.append([session("s1", "I live in Porto.", day=1)])
    night(settings, embedder, reads(("Porto", "The user lives in Porto.")),
          Fake(responses=[judgement()]), dreamer=where)
    log.append([session("s2", "We moved, I live in Lisbon now.", day=2)])
    summary = night(settings, embedder, reads(("Lisbon", "The user lives in Lisbon now.")),
                    Fake(responses=[judgement()]), dreamer=where)
    assert summary["superseded"] == 1
    store = MemoryStore(settings.paths.memories_db)
    everything = {m.answer: m for m in store.list(user_id="me", include_superseded=True)}
    assert set(everything) == {"You live in Porto.", "You live in Lisbon now."}
    old, new = everything["You live in Porto."], everything["You live in Lisbon now."]
    assert old.superseded_by == new.id and old.id in new.associated
    assert [m.answer for m in store.list(user_id="me")] == ["You live in Lisbon now."]


def test_forget_deletes_only_on_request(settings, embedder):
    log = DayLog(settings.paths.days)
    log.append([session("s1", "My phone number is 555-0142.", "My dog is called Biscuit.")])
    notetaker = reads(("555-0142", "The user's phone number is 555-0142."),
                      ("Biscuit", "The user's dog is called Biscuit."))
    night(settings, embedder, notetaker, Fake(responses=[judgement()]))
    store = MemoryStore(settings.paths.memories_db)
    assert len(store.list(user_id="me")) == 2
    # "don't forget" is not a request to forget
    log.append([session("s2", "Don't forget my phone number, please.", day=2)])
    night(settings, embedder, Scripted(), Fake(responses=[judgement()]))
    assert len(store.list(user_id="me")) == 2
    log.append([session("s3", "Please forget my phone number.", day=3)])
    summary = night(settings, embedder, Scripted(), Fake(responses=[judgement()]))
    assert summary["deleted"] == 1
    assert [m.text for m in store.list(user_id="me")] == ["The user's dog is called Biscuit."]
    assert store.deletions("me")[0]["request"] == "Please forget my phone number."


def test_what_the_user_asks_to_forget_the_same_day_is_never_kept(settings, embedder):
    # the sample day's shape: a number stated in the morning, forgotten in the evening, and
    # a note-taker that writes it again from the forget turn's context
    DayLog(settings.paths.days).append([
        session("s1", "My birthday is on 14 March. My phone number is 555-0142.", day=1),
        session("s2", "Please forget my old phone number 555-0142. I don't use it any more.",
                "Good night!", day=2)])
    notetaker = reads(("555-0142. I don't", "The user's old phone number is 555-0142."),
                      ("14 March", "The user's birthday is on 14 March.",
                       "The user's phone number is 555-0142."),
                      ("Good night", "The user no longer uses the old number 555 0142."))
    summary = night(settings, embedder, notetaker, Fake(responses=[judgement()]))
    kept = MemoryStore(settings.paths.memories_db).list(user_id="me")
    assert [m.text for m in kept] == ["The user's birthday is on 14 March."]
    assert notetaker.calls == 2  # the forget request itself is not read
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    assert sum(s.agent == "dreamer" for s in steps) == 1  # forgotten notes are never dreamed on
    assert summary["parked"] == 0


def test_resume_after_a_crash_repeats_no_finished_call_and_adds_nothing_twice(settings, embedder):
    DayLog(settings.paths.days).append([session("s1", "My dog is called Biscuit.", "I work at a bakery.")])
    settings.night.dream_bursts = 2
    notetaker = reads(("Biscuit", "The user's dog is called Biscuit."),
                      ("bakery", "The user works at a bakery."))
    crashing = Fake(responses=[judgement()], fail_on={2})
    with pytest.raises(Exception, match="injected crash"):
        night(settings, embedder, notetaker, crashing)
    assert notetaker.calls == 2
    verifier, dreamer = Fake(responses=[judgement()]), NoteDreamer()
    summary = night(settings, embedder, notetaker, verifier, dreamer=dreamer, resume=True)
    assert notetaker.calls == 2  # both turns had been read: not read again
    assert verifier.calls <= 2 - 1  # the verification that finished before the crash is kept
    assert dreamer.calls == 2 * 2  # two bursts per verified note
    store = MemoryStore(settings.paths.memories_db)
    answers = sorted(m.answer for m in store.list(user_id="me"))
    assert answers == ["You work at a bakery.", "Your dog is called Biscuit."]
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    assert sum(s.agent == "notetaker" for s in steps) == 2


@pytest.mark.e2e
def test_a_real_night_on_the_default_model(settings, default_runtime):
    settings.night.reshape_rounds = 1
    DayLog(settings.paths.days).append([Session(
        session_id="e2e", user_id="me", messages=[
            Message(turn_id="t1", role="user", content="Hi! My name is Ana and my cat is called Miso."),
            Message(turn_id="t2", role="assistant", content="Nice to meet you, Ana! Miso is a lovely name.")])])
    summary = asyncio.run(run_night(settings, runtime=default_runtime, learner=None))
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    agents = {s.agent for s in steps}
    assert {"gather", "router", "notetaker", "verifier", "handoff"} <= agents
    reads_ = [s for s in steps if s.agent == "notetaker"]
    assert reads_ and all(s.model.startswith("sleep") and s.temperature == 0.0 for s in reads_)
    assert all(s.raw_output for s in steps if s.agent == "verifier" and s.prompt)
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
