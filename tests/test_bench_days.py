"""benchmarks/bench_days.py without a night: the scorer on a hand-made memory store, the
config copy's overrides, and the gold lists checked against their day logs (so the gold
cannot drift from the data)."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DAYS = REPO / "benchmarks" / "data" / "days"
GOLDS = ["dev1", "dev2", "heldout", "sample"]
INVENTED = ["dev1", "dev2", "heldout"]
# Names and topics kept for the prompts' worked examples, the sample day and facts20.jsonl:
# none may occur in the invented days (whole words, case-insensitive).
RESERVED = ["Tomasz", "Ingrid", "Pepper", "Rotterdam", "Utrecht", "shellfish", "Northwind",
            "nurse", "Kenji", "Oslo", "Rufus", "violin", "Mira", "Dublin", "Carlos", "Lagos",
            "ferret", "lactose", "Maya", "Biscuit", "beagle", "Tidewater", "Porto", "Lisbon",
            "green tea", "Flour Tower", "Tampere", "cello", "Ilona", "Volvo", "Pixel",
            "Moby-Dick", "Otto", "Spirited Away", "Marta"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_days",
                                                  REPO / "benchmarks" / "bench_days.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """A data directory whose store holds hand-made memories of user "me" (and one of
    another user), against the sample day's gold list."""
    from reverie.memory.records import Memory
    from reverie.memory.store import MemoryStore

    s1, s3 = "sample-1-morning", "sample-3-correction"
    with MemoryStore(tmp_path / "memories.sqlite") as store:
        # matches f2 (dog Biscuit), f3 (beagle), f4 (two years old)
        store.add(Memory(id="mem-dog", user_id="me", kind="fact", status="verified",
                         text="The user's dog Biscuit is a two-year-old beagle.",
                         question="What is the user's dog called?", answer="Biscuit",
                         source_session=s1, source_turns=["t1"]))
        # learned counts as kept: f9
        store.add(Memory(id="mem-tea", user_id="me", kind="preference", status="learned",
                         text="The user prefers green tea to coffee.",
                         source_session=s3, source_turns=["t1"]))
        # the forgotten phone number, only in a phrasing: a forbidden hit, no gold fact
        store.add(Memory(id="mem-phone", user_id="me", kind="fact", status="verified",
                         question="What is the user's contact number?", answer="unknown",
                         phrasings=["Is my number 555-0142?"],
                         source_session="sample-4-forget", source_turns=["t1"]))
        # superseded: would match f6 (Tidewater) if it counted
        store.add(Memory(id="mem-old-job", user_id="me", kind="fact", status="verified",
                         text="The user works at Tidewater Labs.", source_session=s1,
                         source_turns=["t3"]))
        store.supersede("mem-old-job", Memory(
            id="mem-new-job", user_id="me", kind="fact", status="verified",
            text="The user works at Harbour Analytics.", source_session=s1,
            source_turns=["t3"]), "test")
        # not kept (status, user): would match f5, f8, f1
        store.add(Memory(id="mem-rejected", user_id="me", kind="fact", status="rejected",
                         text="The user is a data engineer.", source_session=s1,
                         source_turns=["t3"]))
        store.add(Memory(id="mem-candidate", user_id="me", kind="fact", status="candidate",
                         text="The user lives in Lisbon.", source_session=s3,
                         source_turns=["t3"]))
        store.add(Memory(id="mem-other", user_id="someone", kind="fact", status="verified",
                         text="The user's name is Maya.", source_session=s1,
                         source_turns=["t1"]))
        # the dog's attribute as the user's: trap m2, and not f11 (the dog's beach)
        store.add(Memory(id="mem-trap", user_id="me", kind="preference", status="verified",
                         text="The user loves the beach.", source_session=s3,
                         source_turns=["t5"]))
        # true or not, no gold fact says it
        store.add(Memory(id="mem-extra", user_id="me", kind="fact", status="verified",
                         text="The user writes Python code.", source_session="sample-2-code",
                         source_turns=["t3"]))
    return tmp_path


def test_score_matches_misses_forbidden_and_superseded(bench, data_dir):
    result = bench.score(data_dir, bench.load_gold(DAYS / "sample.gold.json"))
    facts = {f["id"]: f for f in result["facts"]}
    assert {k for k, f in facts.items() if f["matched_by"]} == {"f2", "f3", "f4", "f9"}
    assert facts["f2"]["matched_by"] == ["mem-dog"]
    assert facts["f9"]["matched_by"] == ["mem-tea"]
    for missed in ("f1", "f5", "f6", "f8", "f11"):  # other user, rejected, superseded, ...
        assert facts[missed]["matched_by"] == [], missed
    assert result["n_facts"] == 11 and result["n_matched"] == 4
    assert result["recall"] == pytest.approx(4 / 11)

    kept = [m["id"] for m in result["memories"]]
    assert sorted(kept) == ["mem-dog", "mem-extra", "mem-new-job", "mem-phone", "mem-tea",
                            "mem-trap"]
    assert result["n_kept"] == 6
    assert [x["kept_by"] for x in result["forbidden"]] == [["mem-phone"]]
    assert result["forbidden_kept"] == 1
    traps = {x["id"]: x["kept_by"] for x in result["traps"]}
    assert traps == {"m1": [], "m2": ["mem-trap"]} and result["traps_hit"] == 1

    rows = {m["id"]: m for m in result["memories"]}
    assert rows["mem-dog"]["gold"] == ["f2", "f3", "f4"]
    assert rows["mem-phone"]["gold"] == [] and rows["mem-phone"]["forbidden"] == ["x1"]
    assert rows["mem-trap"]["traps"] == ["m2"] and rows["mem-trap"]["gold"] == []
    assert rows["mem-extra"]["gold"] == []
    assert result["unmatched_memories"] == 4  # phone, new job, trap, extra
    # cited turns are shown with their text from the day log
    assert rows["mem-dog"]["turns"][0][0] == "t1"
    assert rows["mem-dog"]["turns"][0][1].startswith("user: Good morning! I'm Maya.")
    assert facts["f1"]["turn_cited"] and not facts["f7"]["turn_cited"]  # s1/t1 but not t5


def test_render_and_main(bench, data_dir, tmp_path):
    result = bench.score(data_dir, bench.load_gold(DAYS / "sample.gold.json"))
    text = bench.render(result, "unit", {"machine": "test cpu", "commit": "abc1234",
                                         "dirty": True, "night_seconds": 12.3,
                                         "night_exit": 0,
                                         "sets": {"night.max_candidates": 2}})
    assert "unit · test cpu · day sample_day.jsonl · commit abc1234 (+ uncommitted" in text
    assert "Night: 12 s wall" in text and '`night.max_candidates=2`' in text
    assert "| 6 | 11 | 4 | 0.36 | 1 of 1 | 1 of 2 | 4 |" in text
    assert "**x1 FORBIDDEN**" in text and "**m2 TRAP**" in text
    assert "mem-old-job" not in text
    dog_row = next(line for line in text.splitlines() if line.startswith("| mem-dog "))
    assert dog_row.endswith("| f2, f3, f4 |  |")  # the empty "judged" column

    results = tmp_path / "days.md"
    bench.main(["--score", str(data_dir), "--gold", "sample", "--no-write", "--results",
                str(results)])
    assert not results.exists()
    saved = json.loads((data_dir / bench.SCORE_FILE).read_text())
    assert saved["n_matched"] == 4 and saved["gold_file"].endswith("sample.gold.json")
    bench.main(["--score", str(data_dir), "--gold", "sample", "--label", "twice",
                "--results", str(results)])
    assert results.read_text().startswith("# Memory quality on invented days")
    assert "· twice ·" in results.read_text()


def test_haystack_reads_you_as_the_user(bench):
    from reverie.memory.records import Memory

    m = Memory(user_id="me", kind="fact", question="What is your dog called?",
               answer="You have a dog called Biscuit", phrasings=["Name my dog?"])
    hay = bench.haystack(m)
    assert "what is the user's dog called?" in hay and "the user has a dog" in hay
    assert "name my dog" not in hay and "name my dog" in bench.haystack(m, phrasings=True)
    assert bench.matches([["biscuit"], ["dog", "cat"]], hay)
    assert not bench.matches([["biscuit"], ["cat"]], hay)
    assert not bench.matches([], hay)


def test_sets_merge_into_the_config_copy(bench, tmp_path):
    import yaml

    assert bench.parse_set("a.b=false") == ("a.b", False)
    assert bench.parse_set("a.b= 3") == ("a.b", 3)
    assert bench.parse_set("a.b=embedded:x-1.5b") == ("a.b", "embedded:x-1.5b")
    # keys the config is unlikely to retire (the night's own keys change with the agents)
    sets = [bench.parse_set(s) for s in (
        "roles.student.model=big", "models.chat.big=embedded:qwen2.5-coder-1.5b-instruct",
        "structured.attempts=2")]
    path = bench.days_config(REPO / "config.yaml", tmp_path, sets)
    raw = yaml.safe_load(path.read_text())
    assert raw["forge"]["enabled"] is False
    assert raw["roles"]["student"]["model"] == "big"
    assert "temperature" in raw["roles"]["student"]  # the rest of the role is kept
    assert raw["models"]["chat"]["big"] == "embedded:qwen2.5-coder-1.5b-instruct"
    assert raw["models"]["chat"]["default"]  # merged, not replaced
    assert raw["structured"]["attempts"] == 2 and raw["data_dir"] == str(tmp_path)
    for bad in ("structured.attempts", "=3", "a..b=3"):
        with pytest.raises(ValueError):
            bench.parse_set(bad)
    with pytest.raises(ValueError):  # an unknown role fails before any night
        bench.days_config(REPO / "config.yaml", tmp_path / "bad",
                          [bench.parse_set("roles.nosuchrole.model=big")])


def _sessions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.mark.parametrize("name", GOLDS)
def test_gold_points_at_its_day(bench, name):
    gold = bench.load_gold(DAYS / f"{name}.gold.json")
    assert gold["user"] == "me"
    turns = bench.read_day(bench.gold_day_file(gold))
    ids = [x["id"] for x in gold["facts"] + gold["forbidden"] + gold["misattribution_traps"]]
    assert len(ids) == len(set(ids))
    for item in gold["facts"] + gold["forbidden"] + gold["misattribution_traps"]:
        assert item["keys"] and all(group for group in item["keys"]), item["id"]
        assert all(alt and alt == alt.lower() for group in item["keys"] for alt in group)
    for fact in gold["facts"]:
        session, _, turn = fact["turn"].partition("/")
        message = turns.get((session, turn))
        assert message is not None, f"{name} {fact['id']}: no turn {fact['turn']}"
        assert message["role"] == "user", fact["id"]
        text = message["content"].lower()
        assert any(alt in text for group in fact["keys"] for alt in group), \
            f"{name} {fact['id']}: no key of {fact['keys']} in {fact['turn']}"
        # the gold sentence itself (without its parenthesis) matches its keys and no trap
        sentence = " " + re.sub(r"\s*\([^)]*\)", "", fact["fact"]).lower() + " "
        assert bench.matches(fact["keys"], sentence), fact["id"]
        for bad in gold["forbidden"] + gold["misattribution_traps"]:
            assert not bench.matches(bad["keys"], sentence), (fact["id"], bad["id"])


@pytest.mark.parametrize("name", INVENTED)
def test_invented_days_are_well_formed(bench, name):
    from reverie.memory.records import Session

    path = DAYS / f"{name}.jsonl"
    sessions = _sessions(path)
    assert 3 <= len(sessions) <= 4
    dates = set()
    for raw in sessions:
        s = Session.model_validate(raw)
        assert s.user_id == "me" and s.source == "reverie-dev"
        assert [m.turn_id for m in s.messages] == [f"t{i}" for i in
                                                   range(1, len(s.messages) + 1)]
        assert [m.role for m in s.messages] == ["user", "assistant"] * (len(s.messages) // 2)
        for stamp in [s.started_at, s.ended_at] + [m.timestamp for m in s.messages]:
            assert stamp.utcoffset().total_seconds() == 0
            dates.add(stamp.date())
        stamps = [m.timestamp for m in s.messages]
        assert stamps == sorted(stamps) and s.started_at == stamps[0] == min(stamps)
    assert len(dates) == 1
    text = path.read_text(encoding="utf-8")
    users = [m["content"] for s in sessions for m in s["messages"] if m["role"] == "user"]
    assert sum(u.lower().startswith("please forget") for u in users) == 1
    gold = bench.load_gold(DAYS / f"{name}.gold.json")
    assert len(gold["facts"]) >= 16 and len(gold["misattribution_traps"]) >= 3
    assert gold["forbidden"] and gold["day"] == path.name
    for word in RESERVED:
        assert not re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE), word
    assert isinstance(datetime.fromisoformat(sessions[0]["started_at"]), datetime)
