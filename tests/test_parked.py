"""The subconscious: what a night rejects or vetoes is parked, revisited on the user's
next nights against new turns, revived into a memory, or expired (fake chat models, the
real MiniLM embedder for similarity)."""

import asyncio
import json

import pytest

from reverie.graphs.night import parked_id
from reverie.graphs.run import run_night
from reverie.memory.daylog import DayLog
from reverie.memory.diary import read_steps
from reverie.memory.store import MemoryStore
from reverie.config import load_settings

from conftest import REPO, NoteDreamer, Scripted, notes
from test_night import KEEP, Fake, judgement, session

# The dog's name is in the turn, "dog" is not: the deterministic grounding check fails it.
VET = "I'm taking Biscuit to the vet tomorrow."
DOG_NOTE = "The user's dog is called Biscuit."
DOG = [("Biscuit", DOG_NOTE)]
NOTHING: list = []
# the reshaper's rewrite is the same note again (so it fails again, one round later)
SAME = notes(DOG_NOTE)


@pytest.fixture
def settings(tmp_path, model_cache):
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.models.cache_dir = model_cache
    s.night.dream_bursts = 1
    s.night.reshape_rounds = 1
    s.night.park_nights = 2
    return s


def night(settings, embedder, reading, reshaper=None, persona=None, **kw):
    """One night; ``reading``: ``(words in a turn, note)`` pairs, the note-taker's notes;
    the verifier always judges grounded, so the deterministic checks alone decide."""
    models = {"notetaker": Scripted(rules=[(k, notes(n)) for k, n in reading]),
              "dreamer": NoteDreamer(), "verifier": Fake(responses=[judgement()]),
              "reshaper": reshaper or Fake(responses=[SAME]),
              "persona": persona or Fake(responses=[KEEP])}
    return asyncio.run(run_night(settings, models=models, embedder=embedder, learner=None, **kw))


def steps(settings, summary, verdict=None):
    out = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    return [s for s in out if s.agent == "subconscious" and verdict in (None, s.verdict)]


def park_the_dog(settings, embedder, user="me"):
    """Night 1: the dog's name, cited from a turn that never says "dog", is rejected and
    parked. Returns the night's summary and the parked thought."""
    DayLog(settings.paths.days).append([session("s1", VET, user=user)])
    summary = night(settings, embedder, DOG, user_id=user)
    assert (summary["rejected"], summary["parked"], summary["memories_added"]) == (1, 1, 0)
    [thought] = MemoryStore(settings.paths.memories_db).parked(user)
    return summary, thought


def test_a_rejected_candidate_is_parked_and_survives_the_next_night(settings, embedder):
    n1, thought = park_the_dog(settings, embedder)
    assert thought.id == parked_id("s1:t1:n0") and thought.user_id == "me"
    assert (thought.text, thought.night_id) == (DOG_NOTE, n1["night_id"])
    assert any("grounding 0.67" in r for r in thought.reasons)
    assert [s.verdict for s in steps(settings, n1)] == ["parked"]
    # a vetoed candidate is parked too, with the consultant's reason
    log = DayLog(settings.paths.days)
    log.append([session("s2", "I had pasta for lunch.", "My cat is called Miso.", day=2)])
    veto = Fake(responses=[json.dumps({"keep": False, "note": "not about the user",
                                       "reinforce": []})])
    n2 = night(settings, embedder, [("Miso", "The user's cat is called Miso.")], persona=veto)
    store = MemoryStore(settings.paths.memories_db)
    parked = {"Biscuit" if "Biscuit" in p.text else "Miso": p for p in store.parked("me")}
    assert set(parked) == {"Biscuit", "Miso"} and n2["vetoed"] == 1 and n2["parked"] == 1
    assert any("not about the user" in r for r in parked["Miso"].reasons)  # the veto note
    # the dog thought found no turn like it tonight: not revisited, one night older
    assert n2["revisited"] == 0 and parked["Biscuit"].nights_seen == 1
    assert [s.verdict for s in steps(settings, n2) if "Biscuit" in s.raw_output] == ["kept"]


def test_what_is_already_known_is_not_parked(settings, embedder):
    log = DayLog(settings.paths.days)
    bakery = [("bakery", "The user works at a bakery.")]
    log.append([session("s1", "I work at a bakery.")])
    assert night(settings, embedder, bakery)["memories_added"] == 1
    log.append([session("s2", "I still work at a bakery.", day=2)])
    n2 = night(settings, embedder, bakery)
    assert n2["rejected"] == 1 and n2["parked"] == 0  # rejected as already known
    assert MemoryStore(settings.paths.memories_db).parked("me") == []


def test_new_supporting_evidence_revives_the_thought_into_a_memory(settings, embedder):
    n1, thought = park_the_dog(settings, embedder)
    DayLog(settings.paths.days).append([session("s2", "I had pasta for lunch.",
                                                "Biscuit, my dog, loved the beach today.", day=2)])
    n2 = night(settings, embedder, NOTHING)
    assert (n2["revisited"], n2["revived"], n2["memories_added"]) == (1, 1, 1)
    store = MemoryStore(settings.paths.memories_db)
    [memory] = store.list(user_id="me")
    assert (memory.text, memory.answer) == (DOG_NOTE, "Your dog is called Biscuit.")
    assert (memory.source_session, memory.source_turns) == ("s2", ["t3"])  # the new evidence
    note = f"revived from parked thought {thought.id} (parked in night {n1['night_id']})"
    assert note in [h["reason"] for h in memory.history]
    assert store.parked("me") == []
    [revisit] = steps(settings, n2, "revisit")
    [revived] = steps(settings, n2, "revived")
    assert revisit.candidate_id == revived.candidate_id == f"{thought.id}@{n2['night_id']}"
    assert revived.memory_id == memory.id and note in revived.reasons[0]


def test_an_unsupported_thought_expires_after_park_nights(settings, embedder):
    _, thought = park_the_dog(settings, embedder)
    store = MemoryStore(settings.paths.memories_db)
    log = DayLog(settings.paths.days)
    # night 2: a turn like it (revisited) that still does not say "dog": fails again
    log.append([session("s2", "Biscuit needs a bath tonight.", day=2)])
    reshaper = Fake(responses=[SAME])
    n2 = night(settings, embedder, NOTHING, reshaper=reshaper)
    assert n2["revisited"] == 1 and n2["revived"] == 0 and n2["expired"] == 0
    assert reshaper.calls == settings.night.reshape_rounds  # the normal rounds, no more
    [kept] = store.parked("me")
    assert (kept.id, kept.nights_seen, kept.last_night) == (thought.id, 1, n2["night_id"])
    assert any("grounding 0.67" in r for r in kept.reasons)
    # night 3 (park_nights = 2): nothing like it; it expires
    log.append([session("s3", "The train was late this morning.", day=3)])
    n3 = night(settings, embedder, NOTHING)
    assert n3["expired"] == 1 and store.parked("me") == [] and store.list(user_id="me") == []
    [expired] = steps(settings, n3, "expired")
    assert expired.raw_output == DOG_NOTE
    assert "unsupported for 2 nights" in expired.reasons[0]


def test_a_resumed_night_parks_and_ages_once(settings, embedder, monkeypatch):
    def crash_after(method):
        original = getattr(MemoryStore, method)

        def once(self, *args, **kwargs):
            original(self, *args, **kwargs)
            monkeypatch.setattr(MemoryStore, method, original)
            raise RuntimeError("injected crash")
        monkeypatch.setattr(MemoryStore, method, once)

    log = DayLog(settings.paths.days)
    log.append([session("s1", VET)])
    crash_after("add_parked")  # killed in park, after the write, before the checkpoint
    with pytest.raises(Exception, match="injected crash"):
        night(settings, embedder, DOG)
    n1 = night(settings, embedder, DOG, resume=True)
    store = MemoryStore(settings.paths.memories_db)
    assert [p.id for p in store.parked("me")] == [parked_id("s1:t1:n0")] and n1["parked"] == 1
    log.append([session("s2", "The train was late this morning.", day=2)])
    crash_after("update_parked")
    with pytest.raises(Exception, match="injected crash"):
        night(settings, embedder, NOTHING)
    night(settings, embedder, NOTHING, resume=True)
    [thought] = store.parked("me")
    assert thought.nights_seen == 1 and len(thought.history) == 2  # parked, one night older


def test_another_users_night_does_not_touch_the_thought(settings, embedder):
    n1, thought = park_the_dog(settings, embedder, user="me")
    store = MemoryStore(settings.paths.memories_db)
    log = DayLog(settings.paths.days)
    # the other user says exactly what would support it
    log.append([session("o1", "Biscuit, my dog, loved the beach today.", user="other", day=2)])
    n2 = night(settings, embedder, NOTHING, user_id="other")
    assert n2["revisited"] == 0 and steps(settings, n2) == []
    assert store.parked("me") == [thought] and store.parked("other") == []
    # a night for everyone: "me" has only an unrelated turn, "other" a supporting one
    log.append([session("s2", "The train was late this morning.", day=3),
                session("o2", "Biscuit, my dog, chewed my shoes.", user="other", day=3)])
    n3 = night(settings, embedder, NOTHING)
    assert n3["revisited"] == 0 and n3["memories_added"] == 0
    assert store.list(user_id="me") == [] and store.list(user_id="other") == []
    [aged] = store.parked("me")
    assert aged.nights_seen == 1 and aged.last_night == n3["night_id"]


def test_a_forget_request_removes_the_thought(settings, embedder):
    park_the_dog(settings, embedder)
    DayLog(settings.paths.days).append([session("s2", "Please forget my dog's name.", day=2)])
    n2 = night(settings, embedder, NOTHING)
    assert n2["forget_requests"] == 1 and n2["revived"] == 0
    assert MemoryStore(settings.paths.memories_db).parked("me") == []
    assert [s.verdict for s in steps(settings, n2)][-1] == "forgotten"
