"""Crash tests of the night, short (the long run is ``benchmarks/crash_night.py``): a night
killed with SIGKILL at six moments, from an agent call to the summary, and resumed after
each (so resumed six times, once after its day log grew), ends as the same night run
unbroken, and the active model version is complete after every kill. Fake chat models
(deterministic) for the agents; the forge on a tiny random llama."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
from typer.testing import CliRunner

from conftest import REPO, tiny_llama

sys.path.insert(0, str(REPO / "benchmarks"))
import crash_night  # noqa: E402

# agents (a call made, its diary line not written), consolidation (after its 2nd store
# write), the hand-off (training set written, sessions not marked), the forge before its
# commit (the new version staged: trained and fused), after the commit (not active), and
# after the graph's end (no summary yet)
PLAN = ["call:3", "consolidate:2", "handoff", "fuse", "commit", "finish"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory, smollm2_dir, minilm_dir):
    work = tmp_path_factory.mktemp("crash")
    overrides = crash_night.fake_overrides(work)
    configs = {name: crash_night.make_config(work / name, REPO / "config.yaml", overrides)
               for name in ("reference", "crashed")}
    for config in configs.values():
        crash_night.ingest_sample(config)
    log = work / "children.log"
    ref = crash_night.reference_night(configs["reference"], True, log, 600)
    assert ref["rc"] == 0, log.read_text()[-4000:]
    crash = crash_night.crashed_night(configs["crashed"], PLAN, True, log, 600, grow_after=0,
                                      grow=crash_night.grow_day)
    snaps = {"reference": crash_night.snapshot(configs["reference"], ref["night_id"]),
             "crashed": crash_night.snapshot(configs["crashed"], crash["night_id"])}
    return configs, crash, snaps, log


def test_every_kill_landed_and_left_a_complete_active_version(nights):
    configs, crash, snaps, log = nights
    killed = [e for e in crash["events"] if e.get("kill")]
    assert [e["kill"] for e in killed] == PLAN
    assert all(e["killed"] for e in killed), log.read_text()[-4000:]
    # after each kill the active version's files are the committed ones and it loads:
    # the base until the night's version is activated, never a half-written one
    assert all(e["active_problems"] == [] for e in killed)
    assert crash["resumes"] == len(PLAN)  # the same night, resumed six times
    finished = crash["events"][-1]
    assert finished["kill"] is None and finished["rc"] == 0


def test_the_killed_night_ends_as_the_unbroken_one(nights):
    configs, crash, snaps, log = nights
    ref, got = snaps["reference"], snaps["crashed"]
    # the fake agents give Porto then Lisbon, a reshaped employer, the phone number the user
    # asked to forget (rejected as it is read), and a vetoed preference (parked): the night
    # has something of every kind to repeat
    summary = ref["summary"]
    assert (summary["superseded"], summary["reshaped"], summary["rejected"],
            summary["parked"], summary["memories_added"]) == (1, 1, 1, 1, 7)
    assert ref["active"] == "night-<night>"
    assert crash_night.differences(ref, got) == []
    assert got["memories"] == ref["memories"] and got["training"] == ref["training"]
    assert got["weights"] == ref["weights"]  # the same trained weights, to the bit
    assert crash_night.invariants(ref, configs["reference"]) == []
    assert crash_night.invariants(got, configs["crashed"]) == []


def test_each_diary_step_once_and_no_recorded_call_made_again(nights):
    configs, crash, snaps, log = nights
    ref, got = snaps["reference"], snaps["crashed"]
    assert set(got["steps"]) == set(ref["steps"])
    assert set(got["steps"].values()) == {1}  # in steps.jsonl itself, not only when read
    assert any(k.startswith("verify:") for k in got["steps"])


def test_a_session_logged_after_a_kill_is_left_for_the_next_night(nights):
    configs, crash, snaps, log = nights
    # the night's sessions were fixed when its first step (gather) was saved: the session
    # appended between the first kill and its resume waits for the next night
    assert snaps["crashed"]["unconsumed"] == ["late-session"]
    assert snaps["crashed"]["summary"]["sessions"] == snaps["reference"]["summary"]["sessions"] == 4


def test_a_changed_version_file_is_caught(tmp_path, smollm2_tokenizer):
    from reverie.cli import app
    from reverie.training.versions import Versions

    versions = Versions(tmp_path / "data" / "models" / "versions")
    versions.save_model("base", tiny_llama(vocab_size=49152, seed=1), smollm2_tokenizer,
                        activate=True)
    recorded = versions.info("base")["files"]
    assert "model.safetensors" in recorded and "config.json" in recorded
    assert versions.verify("base") == []
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    ok = CliRunner().invoke(app, ["--config", str(config), "models", "list", "--verify"])
    assert ok.exit_code == 0 and recorded["model.safetensors"][:12] + " ok" in ok.output
    weights = versions.path("base") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert versions.verify("base") == [
        f"base/model.safetensors: sha256 {hashlib.sha256(data).hexdigest()[:12]} differs from "
        f"the recorded {recorded['model.safetensors'][:12]}"]
    bad = CliRunner().invoke(app, ["--config", str(config), "models", "list", "--verify",
                                   "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.output)["versions"][0]["problems"]


def test_a_diary_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    from reverie.memory.diary import Diary, DiaryStep, list_nights, read_steps

    diary = Diary(tmp_path, "n1")
    diary.record(DiaryStep(step_id="gather", night_id="n1", agent="gather"))
    with open(diary.steps_file, "a") as f:  # the kill cut the next line short
        f.write('{"step_id": "read:s1:t1", "night_id": "n1", "agent": "note')
    assert [s.step_id for s in read_steps(diary.steps_file)] == ["gather"]
    assert list_nights(tmp_path)[0]["status"] == "unfinished"
    resumed = Diary(tmp_path, "n1")
    assert resumed.recorded("read:s1:t1") is None
    resumed.record(DiaryStep(step_id="read:s1:t1", night_id="n1", agent="notetaker",
                             produced=[{"id": "c1"}]))
    resumed.record(DiaryStep(step_id="gather", night_id="n1", agent="gather", verdict="again"))
    lines = diary.steps_file.read_text().splitlines()
    assert [json.loads(l)["step_id"] for l in lines] == ["gather", "read:s1:t1"]
    assert resumed.recorded("gather").verdict == ""  # the first record stands
    assert Diary(tmp_path, "n1").recorded("read:s1:t1").produced == [{"id": "c1"}]


def test_consolidation_done_before_a_crash_is_read_back_not_redone(tmp_path, model_cache,
                                                                  embedder, monkeypatch):
    """A crash right after consolidation's last write (a delete on a forget request, an
    add, a duplicate's update): the resumed night counts each once and writes none again."""
    import asyncio

    from conftest import NoteDreamer, Scripted, notes
    from test_night import Fake, judgement, session

    from reverie.config import load_settings
    from reverie.graphs.run import run_night
    from reverie.memory.daylog import DayLog
    from reverie.memory.store import MemoryStore

    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.models.cache_dir = model_cache
    s.night.dream_bursts = 1
    keep = json.dumps({"keep": True, "note": "", "reinforce": []})

    def night(key, note, **kw):
        models = {"notetaker": Scripted(rules=[(key, notes(note))]), "dreamer": NoteDreamer(),
                  "verifier": Fake(responses=[judgement()]),
                  "reshaper": Fake(responses=["none"]), "persona": Fake(responses=[keep])}
        return asyncio.run(run_night(s, models=models, embedder=embedder, learner=None, **kw))

    log = DayLog(s.paths.days)
    log.append([session("s1", "My phone number is 555-0142.")])
    night("555-0142", "The user's phone number is 555-0142.")
    # the dog said twice: the second turn's note is a duplicate of the first's
    log.append([session("s2", "Please forget my phone number.", "My dog is called Biscuit.",
                        "Yes, my dog is called Biscuit.", day=2)])
    update = MemoryStore.update

    def crash_after(self, memory, reason):
        update(self, memory, reason)
        raise RuntimeError("killed after the duplicate's write")
    monkeypatch.setattr(MemoryStore, "update", crash_after)
    dog = ("called Biscuit", "The user's dog is called Biscuit.")
    with pytest.raises(RuntimeError, match="killed after"):
        night(*dog)
    monkeypatch.setattr(MemoryStore, "update", update)
    summary = night(*dog, resume=True)
    assert (summary["deleted"], summary["memories_added"], summary["duplicates"]) == (1, 1, 1)
    [memory] = MemoryStore(s.paths.memories_db).list(user_id="me")
    assert memory.answer == "Your dog is called Biscuit."
    assert sum(h["reason"].startswith("seen again") for h in memory.history) == 1
    raw = [json.loads(l)["step_id"] for l in
           (s.paths.diary / summary["night_id"] / "steps.jsonl").read_text().splitlines()]
    assert len(raw) == len(set(raw))  # each step once, the consolidation's too
    assert sum(k.startswith("consolidate:delete:") for k in raw) == 1
    assert sum(k.startswith("consolidate:duplicate:") for k in raw) == 1
