"""benchmarks/bench_extraction.py without a real night: conv-30 sessions 1-3 ingested with the
CLI, a few memories written straight into the store, then scored against LoCoMo's
observations. Skipped when the LoCoMo file (not shipped, CC BY-NC) is absent."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCOMO = REPO.parent / "shared" / "data" / "locomo" / "conv-30.json"

pytestmark = pytest.mark.skipif(not LOCOMO.exists(), reason=f"{LOCOMO} is absent")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extraction",
                                                  REPO / "benchmarks" / "bench_extraction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ingest(data_dir: Path, sessions: str) -> None:
    subprocess.run([sys.executable, "-m", "reverie", "--data-dir", str(data_dir), "ingest",
                    str(LOCOMO), "--user", "jon", "--sessions", sessions],
                   cwd=REPO, check=True, capture_output=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from reverie.memory.records import Memory
    from reverie.memory.store import MemoryStore

    d = tmp_path_factory.mktemp("extraction")
    ingest(d, "1-3")
    s1, s2 = "locomo-conv-30-s1", "locomo-conv-30-s2"
    with MemoryStore(d / "memories.sqlite") as store:
        # paraphrases of two of Jon's session-1 observations (D1:2 banker, D1:8 contemporary)
        store.add(Memory(id="mem-job", user_id="jon", kind="fact", question="What job did you "
                         "lose?", answer="banker", status="verified", source_session=s1,
                         source_turns=["D1:2"]))
        store.add(Memory(id="mem-dance", user_id="jon", kind="preference", status="learned",
                         text="The user's favourite dance style is contemporary.",
                         source_session=s1, source_turns=["D1:8"]))
        # unrelated to anything Jon said
        store.add(Memory(id="mem-cat", user_id="jon", kind="fact", question="What is the name "
                         "of the user's cat?", answer="Miso", status="verified",
                         source_session=s2, source_turns=["D2:3"]))
        # not kept: rejected, superseded, another user's; each would match "Jon visited Paris"
        store.add(Memory(id="mem-paris-rejected", user_id="jon", kind="fact", status="rejected",
                         question="Where did the user travel recently?", answer="Paris",
                         source_session=s2, source_turns=["D2:4"]))
        store.add(Memory(id="mem-paris-old", user_id="jon", kind="fact", status="verified",
                         question="Which city did the user visit recently?", answer="Paris",
                         source_session=s2, source_turns=["D2:4"]))
        store.supersede("mem-paris-old", Memory(
            id="mem-paris-new", user_id="jon", kind="fact", status="verified",
            question="What is the user's favourite colour?", answer="orange",
            source_session=s2, source_turns=["D2:5"]), "test")
        store.add(Memory(id="mem-gina", user_id="gina", kind="fact", status="verified",
                         question="Which city did the user visit recently?", answer="Paris",
                         source_session=s2, source_turns=["D2:4"]))
    return d


def test_observations_are_speaker_a(bench):
    speaker, obs = bench.observations(bench.load_conversation(LOCOMO), [1, 2, 3])
    assert speaker == "Jon"
    assert len(obs) == 10 and all(o["fact"].startswith("Jon") for o in obs)
    assert obs[0]["evidence"] == ["D1:2"] and "banker" in obs[0]["fact"]


def test_score_matches_paraphrases_not_the_unrelated(bench, data_dir, embedder):
    r = bench.score(data_dir, [1, 2, 3], "jon", LOCOMO, embedder, threshold=0.6)
    assert r["n_observations"] == 10
    assert sorted(m["id"] for m in r["memories"]) == ["mem-cat", "mem-dance", "mem-job",
                                                      "mem-paris-new"]
    by_fact = {o["fact"]: o for o in r["observations"]}
    job = next(o for f, o in by_fact.items() if "banker" in f)
    dance = next(o for f, o in by_fact.items() if "favorite dance style" in f)
    paris = next(o for f, o in by_fact.items() if "Paris" in f)
    assert job["best_memory"] == "mem-job" and job["similarity"] >= 0.7 and job["cited"]
    assert dance["best_memory"] == "mem-dance" and dance["similarity"] >= 0.9 and dance["cited"]
    assert paris["similarity"] < 0.5  # the Paris memories are not kept
    assert all(o["best_memory"] != "mem-cat" or o["similarity"] < 0.5
               for o in r["observations"])
    cat = next(m for m in r["memories"] if m["id"] == "mem-cat")
    assert cat["similarity"] < 0.5
    assert r["recall"]["0.60"] == pytest.approx(0.2) and r["evidence_recall"] == pytest.approx(0.2)
    mem = next(m for m in r["memories"] if m["id"] == "mem-job")
    assert mem["turns"][0][0] == "D1:2" and "banker" in mem["turns"][0][1]  # from the day log
    # "you" in the memory read as "the user": the match is on content
    plain = bench.score(data_dir, [1], "jon", LOCOMO, embedder, as_written=True)
    assert plain["observations"][0]["similarity"] < job["similarity"]


def test_cli_appends_markdown(bench, data_dir, tmp_path):
    results = tmp_path / "extraction.md"
    for label in ("first", "second"):
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_extraction.py"),
                        "--score", str(data_dir), "--sessions", "1-3", "--label", label,
                        "--results", str(results)], cwd=REPO, check=True, capture_output=True)
    text = results.read_text()
    assert text.count("# Extraction against LoCoMo observations") == 1
    assert "· first ·" in text and "· second ·" in text
    # the summary row: 4 kept, 10 observations, recall at 0.5 / 0.6 / 0.7, evidence cited
    assert re.search(r"^\| 4 \| 10 \| 0\.\d\d \| 0\.20 \| 0\.20 \| 0\.20 \|$", text, re.M)
    assert "| mem-cat | fact | What is the name of the user's cat? Miso |" in text
    score = json.loads((data_dir / "extraction_score.json").read_text())
    assert score["n_memories"] == 4


def test_run_ingests_each_session_then_sleeps(bench, tmp_path, monkeypatch):
    calls = []
    real = bench._reverie

    def fake(config, out_dir, *args, log):
        calls.append(args[0])
        if args[0] == "ingest":
            return real(config, out_dir, *args, log=log)
        night = out_dir / "diary" / f"night-{len(calls)}"  # what a night leaves behind
        night.mkdir(parents=True)
        (night / "summary.json").write_text(json.dumps({"night_id": night.name, "seconds": 1.5}))
        return 0, 2.0, "done"

    monkeypatch.setattr(bench, "_reverie", fake)
    out = tmp_path / "run"
    record = bench.run(out, REPO / "config.yaml", [1, 2], "jon", LOCOMO, forge=False)
    assert calls == ["ingest", "night", "ingest", "night"]
    saved = json.loads((out / "extraction_run.json").read_text())
    assert saved == record and [n["night_seconds"] for n in saved["nights"]] == [2.0, 2.0]
    assert [n["night_id"] for n in saved["nights"]] == ["night-2", "night-4"]
    from reverie.config import load_settings

    settings = load_settings(out / "bench-config.yaml")
    assert settings.forge.enabled is False
    assert settings.paths.model_cache == load_settings(REPO / "config.yaml").paths.model_cache
    assert len(list((out / "days" / "jon").glob("*.jsonl"))) == 2
    with pytest.raises(SystemExit):  # not fresh any more
        bench.run(out, REPO / "config.yaml", [3], "jon", LOCOMO, forge=False)
