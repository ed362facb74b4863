"""``reverie memories``: list, show, forget, edit and export through the CLI on a real store,
index and embedder (all-MiniLM-L6-v2); what forgetting and editing hand the next night
(unlearning rows, no replay of a deleted memory, the edit trained, the edit kept); the
gate's ``forgotten_recall``."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime, timezone

import chromadb
import pytest
import yaml
from typer.testing import CliRunner

from reverie.cli import app
from reverie.config import Settings, load_settings
from reverie.graphs.night import older_than_edit
from reverie.graphs.run import run_night
from reverie.memory.daylog import DayLog
from reverie.memory.diary import Diary, DiaryStep, read_steps
from reverie.memory.facts import MemoryIndex
from reverie.memory.manage import USER_EDIT, edit_memory
from reverie.memory.records import Memory, Message, Session
from reverie.memory.store import MemoryStore
from reverie.runtime.embeddings import MiniLMEmbeddingFunction
from reverie.training import dataset, gate
from reverie.training.forge import ForgeOutcome, learn
from reverie.training.versions import Versions
from reverie.wake.retrieval import open_retriever

from conftest import REPO, tiny_llama, NoteDreamer, Scripted, notes
from test_forge_gate import IDENTITY
from test_night import KEEP, Fake, judgement, session

DOG, WORK, PREF, BOB = "mem-d0g0000001", "mem-w0rk000001", "mem-pref000001", "mem-b0b0000001"
LONG = "At Tidewater Labs, the marine research station on the far end of the northern harbour"


@pytest.fixture
def config(tmp_path, model_cache):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "models": {"cache_dir": str(model_cache)},
        "night": {"dream_bursts": 1, "reshape_rounds": 0}, "wake": {"user": "ana"}}))
    return path


@pytest.fixture
def settings(config):
    return load_settings(config)


def index_of(settings, embedder) -> MemoryIndex:
    return MemoryIndex(chromadb.PersistentClient(path=str(settings.paths.chroma)),
                       MiniLMEmbeddingFunction(embedder))


@pytest.fixture
def seeded(settings, embedder):
    """Ana's learned dog fact (made in night n1 from candidate c-dog, whose diary steps
    exist), her work fact with a long answer, a preference; Bob's work fact."""
    memories = [
        Memory(id=DOG, user_id="ana", kind="fact", question="What is the user's dog called?",
               answer="Biscuit", phrasings=["What's the name of the user's dog?"],
               status="learned", learned_in="night-n1", night_id="n1", source_session="s1",
               source_turns=["t1"], history=[{"at": "2026-11-01T09:00:00+00:00",
                                              "reason": "verified", "status": "verified",
                                              "candidate": "c-dog"}]),
        Memory(id=WORK, user_id="ana", kind="fact", question="Where does the user work?",
               answer=LONG, status="verified"),
        Memory(id=PREF, user_id="ana", kind="preference", text="Prefers [short] answers.",
               status="verified"),
        Memory(id=BOB, user_id="bob", kind="fact", question="Where does the user work?",
               answer="At the bakery", status="verified")]
    with MemoryStore(settings.paths.memories_db) as store:
        index = index_of(settings, embedder)
        for m in memories:
            store.add(m)
            index.upsert(m)
    diary = Diary(settings.paths.diary, "n1")
    diary.record(DiaryStep(step_id="verify:c-dog:0", night_id="n1", agent="verifier",
                           candidate_id="c-dog", verdict="passed", reasons=["stated by ana"]))
    diary.record(DiaryStep(step_id=f"consolidate:add:{DOG}", night_id="n1",
                           agent="consolidate", memory_id=DOG, verdict="add"))
    return settings


def cli(config, *args, code=0, input=None):
    result = CliRunner().invoke(app, ["--config", str(config), "memories", *args], input=input)
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


# ------------------------------------------------------------------------------ list, show

def test_list_prints_whole_values_and_json_parses(config, seeded):
    out = cli(config, "list").stdout
    lines = out.splitlines()
    assert lines[0].startswith("# active memories of ana (3)")
    # not a terminal: one line per memory, nothing cut or wrapped
    row = next(line for line in lines if line.startswith(WORK))
    assert "Where does the user work?" in row and LONG in row and "active" in row
    assert "yes (night-n1)" in next(line for line in lines if line.startswith(DOG))
    assert "Prefers [short] answers." in out and BOB not in out      # markup kept; not bob's

    records = json.loads(cli(config, "list", "--json").stdout)       # nothing else on stdout
    assert [r["id"] for r in records] == [DOG, WORK, PREF]
    assert {r["state"] for r in records} == {"active"}
    record = {k: v for k, v in records[0].items() if k != "state"}
    assert Memory.model_validate(record).answer == "Biscuit"                # the record whole
    bobs = json.loads(cli(config, "list", "--json", "--user", "bob").stdout)
    assert [r["id"] for r in bobs] == [BOB]
    assert cli(config, "list", "--status", "nope", code=2).exit_code == 2


def test_edit_supersedes_and_show_tells_the_history(config, seeded, embedder):
    retriever = open_retriever(seeded, embedder, "ana")
    assert LONG in [d.page_content.split("? ", 1)[-1] for d in retriever.invoke("where do I work")]
    out = cli(config, "edit", WORK[:8], "--answer", "At Globex").stdout
    new_id = out.split()[0]
    assert new_id != WORK and f"supersedes {WORK}" in out
    # the chat's retriever has the correction at once, not the old version
    found = [d.page_content for d in retriever.invoke("where do I work")]
    assert "Where does the user work? At Globex" in found and not any(LONG in f for f in found)

    active = {r["id"]: r for r in json.loads(cli(config, "list", "--json").stdout)}
    assert new_id in active and WORK not in active and active[new_id]["status"] == "verified"
    [old] = json.loads(cli(config, "list", "--json", "--status", "superseded").stdout)
    assert old["id"] == WORK and old["superseded_by"] == new_id and old["answer"] == LONG

    shown = cli(config, "show", new_id).stdout
    assert f"your edit of {WORK}; the next night trains it" in shown
    versions = shown.split("# versions")[1].split("# history")[0].splitlines()
    assert [v.split()[0] for v in versions[2:]] == [WORK, "▶"]          # oldest first
    assert versions[3].split()[1] == new_id
    assert LONG in shown and "supersedes " + WORK + ": " + USER_EDIT in shown

    shown = cli(config, "show", DOG[:7]).stdout                        # a unique prefix
    assert "yes (night-n1)" in shown and "candidate c-dog" in shown
    steps = [line.split() for line in shown.split("# diary steps")[1].splitlines()]
    assert any(s[0] == "n1" and s[3:6] == ["verifier", "passed", "c-dog"] for s in steps if s)
    assert any(s[0] == "n1" and s[3:6] == ["consolidate", "add", DOG] for s in steps if s)

    err = cli(config, "edit", new_id, "--answer", "At Globex", code=1).output
    assert "nothing to change" in err
    assert "outdated version" in cli(config, "edit", WORK, "--answer", "x", code=1).output


def test_unknown_or_ambiguous_ids_fail_with_a_message(config, seeded):
    for command in (["show", "mem-nope"], ["edit", "mem-nope", "--answer", "x"]):
        result = cli(config, *command, code=1)
        assert "no memory with id 'mem-nope'" in result.output and "Traceback" not in result.output
    assert "give more of it" in cli(config, "show", "mem-", code=1).output


# ------------------------------------------------------------------------------ forget

def test_forget_by_id_leaves_retrieval_at_once_and_is_kept_as_a_deletion(config, seeded, embedder):
    retriever = open_retriever(seeded, embedder, "ana")     # the chat's, opened before
    assert DOG in [d.metadata["id"] for d in retriever.invoke("what is my dog called?")]
    out = cli(config, "forget", DOG[:8], "--yes").stdout
    assert f"forgot {DOG}" in out and "the next night unlearns it" in out
    assert DOG not in [d.metadata["id"] for d in retriever.invoke("what is my dog called?")]
    fresh = open_retriever(seeded, embedder, "ana")
    assert DOG not in [d.metadata["id"] for d in fresh.invoke("what is my dog called?")]
    assert DOG not in fresh.index.collection.get(ids=[DOG])["ids"]  # out of the index too

    with MemoryStore(seeded.paths.memories_db) as store:
        assert store.get(DOG) is None and [t["id"] for t in store.deletions("ana")] == [DOG]
        # learned: kept for the next night to unlearn, no longer among the memories
        assert [m.answer for m in store.unlearning("ana")] == ["Biscuit"]
    [tomb] = json.loads(cli(config, "list", "--json", "--status", "deleted").stdout)
    assert tomb["id"] == DOG and tomb["state"] == "deleted" and tomb["unlearning"] is True
    listed = cli(config, "list", "--status", "deleted").stdout
    assert DOG in listed and "unlearning at the next night" in listed
    shown = cli(config, "show", DOG).stdout
    assert "deleted_at" in shown and "Biscuit" not in shown
    assert "already forgotten" in cli(config, "forget", DOG, "--yes", code=1).output
    fresh.index.collection.delete(ids=[WORK])                # as if a server failed mid-edit
    assert "indexed 3 memories, removed 0" in cli(config, "reindex").stdout  # all users
    assert fresh.index.collection.get(ids=[WORK])["ids"] == [WORK]


def test_forget_by_text_shows_asks_and_keeps_to_the_user(config, seeded):
    declined = cli(config, "forget", "my job at Tidewater Labs", input="n\n", code=1)
    assert WORK in declined.stdout and "nothing forgotten" in declined.output
    with MemoryStore(seeded.paths.memories_db) as store:
        assert store.get(WORK) is not None
    out = cli(config, "forget", "my job at Tidewater Labs", input="y\n").stdout
    shown, done = out.split("Forget 1 memory")
    assert WORK in shown and DOG not in shown and PREF not in shown   # only what is like it
    assert f"forgot {WORK}" in done
    with MemoryStore(seeded.paths.memories_db) as store:
        assert store.get(WORK) is None and store.get(BOB) is not None  # bob's is bob's
        assert store.get(DOG) is not None and store.unlearning("ana") == []  # never learned
    assert "no memory of ana is like" in cli(config, "forget", "my favourite opera", "--yes",
                                             code=1).output


def test_export_writes_every_state_one_record_per_line(config, seeded, tmp_path):
    cli(config, "edit", WORK, "--answer", "At Globex")
    cli(config, "forget", DOG, "--yes")
    text = cli(config, "export").stdout
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["state"] for r in records) == ["active", "active", "deleted", "superseded"]
    assert next(r for r in records if r["state"] == "deleted")["id"] == DOG
    assert all(r["user_id"] == "ana" for r in records)
    out = tmp_path / "export" / "ana.jsonl"
    assert "4 memories of ana" in cli(config, "export", "--out", str(out)).stdout
    assert out.read_text() == text


# ------------------------------------------------------------------------------ the next night

def test_the_next_night_unlearns_the_forgotten_and_trains_the_edit(config, settings, embedder):
    """Night 1 learns two facts; the user forgets one (learned) and corrects the other; night
    2's training set unlearns the first (never replays it) and trains the correction; the
    forge's outcome erases the forgotten record and marks the edit learned. A later night
    does not supersede the edit with older evidence, but does with newer."""
    log = DayLog(settings.paths.days)
    log.append([session("s1", "My dog is called Biscuit.", "I work at Tidewater Labs.",
                        user="ana")])
    reader = Scripted(rules=[("Biscuit", notes("The user's dog is called Biscuit.")),
                             ("Tidewater", notes("The user works at Tidewater Labs."))])
    dreamer = NoteDreamer(rules=[("Biscuit", "Q: What is my dog called?"),
                                 ("Tidewater", "Q: Where do I work?")])

    def night(learner=None):
        models = {"notetaker": reader, "dreamer": dreamer,
                  "verifier": Fake(responses=[judgement()]),
                  "reshaper": Fake(responses=["none"]), "persona": Fake(responses=[KEEP])}
        return asyncio.run(run_night(settings, models=models, embedder=embedder,
                                     learner=learner, user_id="ana"))

    night()
    store = MemoryStore(settings.paths.memories_db)
    by_answer = {m.answer: m for m in store.list(user_id="ana")}
    dog, work = by_answer["Your dog is called Biscuit."], by_answer["You work at Tidewater Labs."]
    store.update(dog.model_copy(update={"status": "learned", "learned_in": "night-1"}), "test")

    cli(config, "forget", dog.id, "--yes")
    new_id = cli(config, "edit", work.id, "--answer", "Globex").stdout.split()[0]

    seen = {}

    def learner(night_id, path):
        seen["ts"] = dataset.TrainingSet.load(path)
        return ForgeOutcome(True, "night-2", "night-1", learned=[new_id], unlearned=[dog.id])

    log.append([session("s2", "Nice weather today.", user="ana", day=2)])
    summary = night(learner)
    ts = seen["ts"]
    unlearn = [r for r in ts.rows if r["kind"] == "unlearn"]
    assert unlearn and all(r["memory_id"] == dog.id and
                           r["messages"][-1]["content"] == dataset.unlearn_answer()
                           for r in unlearn)
    assert "What is my dog called?" in {r["messages"][-2]["content"] for r in unlearn}
    assert not [r for r in ts.rows if r.get("memory_id") == dog.id and r["kind"] != "unlearn"]
    assert dog.id not in ts.replayed and ts.forgotten_ids == [dog.id]
    assert ts.forgotten_items[0][1] == ["Your dog is called Biscuit."]
    assert ts.counts["unlearn"] == len(unlearn)
    assert ts.new_ids == [new_id]                              # the edit is tonight's
    assert not [r for r in ts.rows if r.get("memory_id") == work.id]  # its old version is not
    assert all(r["messages"][-1]["content"] == "Globex"
               for r in ts.rows if r.get("memory_id") == new_id)
    assert store.unlearning("ana") == []                       # unlearned: the record erased
    edited = store.get(new_id)
    assert (edited.status, edited.learned_in, edited.night_id) == \
        ("learned", "night-2", summary["night_id"])
    steps = read_steps(settings.paths.diary / summary["night_id"] / "steps.jsonl")
    assert any(s.verdict == "unlearned" and s.memory_id == dog.id for s in steps)

    log.append([session("s3", "I work at Tidewater Labs.", user="ana", day=1)])  # before the edit
    night()
    assert [m.answer for m in store.list(user_id="ana")] == ["Globex"]
    later = datetime.now(timezone.utc).replace(year=datetime.now().year + 1)
    log.append([Session(session_id="s4", user_id="ana", started_at=later, messages=[
        Message(turn_id="t1", role="user", content="I work at Tidewater Labs again."),
        Message(turn_id="t2", role="assistant", content="Noted!")])])
    night()
    assert [m.answer for m in store.list(user_id="ana")] == ["You work at Tidewater Labs."]


def test_older_than_edit_reads_the_session_times():
    store, index = MemoryStore(":memory:"), _NoIndex()
    old = Memory(user_id="u", kind="fact", question="Q?", answer="A", status="verified")
    store.add(old)
    edit = edit_memory(store, index, old.id, answer="B")
    before = session("s", "x", user="u", day=1)               # 2026-11-01 09:00 UTC
    next_year = edit.created_at.replace(year=edit.created_at.year + 1)
    after = before.model_copy(update={"started_at": next_year})
    naive = before.model_copy(update={"started_at": datetime(edit.created_at.year + 1, 1, 1)})
    assert older_than_edit(before, edit) and older_than_edit(None, edit)
    assert not older_than_edit(after, edit) and not older_than_edit(naive, edit)
    assert not older_than_edit(before, old)                   # not an edit: the night decides


class _NoIndex:
    def upsert(self, memory):
        pass


# ------------------------------------------------------------------------------ dataset, gate

def fact(mid, q, a, status="verified", **kw):
    return Memory(id=mid, user_id="ana", kind="fact", question=q, answer=a, status=status, **kw)


def test_curate_never_replays_a_forgotten_memory_and_unlearns_it(tmp_path):
    cfg = Settings().forge
    cfg.replay_max = 10
    gone = fact("m-gone", "Where does the user work?", "Tidewater Labs", "learned",
                phrasings=["Which company employs the user?"])
    keep = fact("m-keep", "What is the user's dog called?", "Biscuit", "learned")
    pref = Memory(id="m-pref", user_id="ana", kind="preference", text="Short answers.")
    ts = dataset.curate([gone], [gone, keep], [], cfg, forgotten=[gone, pref],
                        answer="I don't know that about you.")
    assert ts.replayed == ["m-keep"] and ts.new_ids == []          # neither trained nor replayed
    assert ("Where does the user work?", ["Tidewater Labs"]) not in ts.regression_items
    unlearn = [r for r in ts.rows if r["kind"] == "unlearn"]
    trained = dataset.split_phrasings(gone, cfg.phrasings).train
    assert [r["messages"][-2]["content"] for r in unlearn] == trained
    assert {r["messages"][-1]["content"] for r in unlearn} == {"I don't know that about you."}
    assert not [r for r in ts.rows if r.get("memory_id") == "m-gone" and r["kind"] != "unlearn"]
    # the held-out phrasing checks that the answer is gone; a preference gets no rows
    assert ts.forgotten_items == [("Which company employs the user?", ["Tidewater Labs"])]
    assert ts.forgotten_ids == ["m-gone"] and ts.counts["unlearn"] == len(unlearn)
    back = dataset.TrainingSet.load(ts.save(tmp_path / "n.jsonl"))
    assert (back.forgotten_items, back.forgotten_ids) == (ts.forgotten_items, ts.forgotten_ids)
    complete = dataset.complete(back, [], cfg)
    assert sum(r["kind"] == "unlearn" for r in complete.rows) == len(unlearn)


def test_without_drops_memories_deleted_after_the_handoff():
    cfg = Settings().forge
    a, b = fact("m-a", "Q a?", "A"), fact("m-b", "Q b?", "B")
    ts = dataset.curate([a, b], [fact("m-old", "Q old?", "Old")], [], cfg,
                        forgotten=[fact("m-f", "Q f?", "F", "learned")], answer="no idea")
    cut = ts.without({"m-a", "m-old", "m-f"})
    assert cut.new_ids == ["m-b"] and [q for q, _ in cut.new_items] == [ts.new_items[1][0]]
    assert len(cut.dev_items) == 1 and cut.replayed == []
    ids = {r.get("memory_id") for r in cut.rows}
    assert "m-a" not in ids and "m-old" not in ids and "m-f" in ids  # unlearning rows stay
    assert cut.counts["facts"] == ts.counts["facts"] // 2 and cut.counts["replay"] == 0


def test_the_unlearn_answer_is_the_users_file_first(tmp_path):
    assert dataset.unlearn_answer() == "I don't know that about you."
    (tmp_path / "unlearn.yaml").write_text('answer: "You asked me to forget that."\n')
    assert dataset.unlearn_answer(tmp_path) == "You asked me to forget that."
    (tmp_path / "unlearn.yaml").write_text("answer: ''\n")
    with pytest.raises(ValueError, match="unlearn.yaml"):
        dataset.unlearn_answer(tmp_path)


def test_gate_blocks_a_version_that_recalls_forgotten_facts_more():
    cfg = Settings().forge
    nan = math.nan

    def report(forgotten):
        return gate.GateReport(nan, nan, 25, 25, 1.0, forgotten_recall=forgotten)

    assert gate.decide(report(1.0), report(0.0), cfg) == (True, [])
    assert gate.decide(report(nan), report(nan), cfg) == (True, [])
    ok, reasons = gate.decide(report(0.0), report(1.0), cfg)
    assert not ok and "asked to forget" in reasons[0]


def test_the_forge_trains_a_night_that_only_unlearns(tmp_path, smollm2_tokenizer):
    """On a tiny random llama: a night with nothing new but a forgotten fact still trains (it is
    not "nothing to learn"), the gate measures ``forgotten_recall`` before and after, and a
    promoted version that does not answer the fact reports it unlearned. A memory deleted
    after the hand-off was written is taken out before training."""
    from reverie.prompts import chat_frame

    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.forge.min_iters, s.forge.max_iters, s.forge.num_layers = 6, 6, 2
    s.forge.learning_rate = 1e-5
    versions = Versions(s.paths.versions)
    versions.save_model("base", tiny_llama(vocab_size=49152, seed=3), smollm2_tokenizer)
    versions.activate("base")
    gone = fact("m-gone", "Where does the user work?", "Tidewater Labs", "learned",
                phrasings=["Which company employs the user?"])
    late = fact("m-late", "What is the user's dog called?", "Biscuit")
    path = dataset.curate([late], [], IDENTITY, s.forge, chat_frame(s), forgotten=[gone]
                          ).save(s.paths.training_sets / "n1.jsonl")
    with MemoryStore(s.paths.memories_db) as store:       # forgotten while the night ran
        store.add(late)
        store.delete(late.id, "test", "forget my dog")
    outcome = learn(s, "n1", path)
    trained = dataset.TrainingSet.load(path)
    assert not [r for r in trained.rows if r.get("memory_id") == "m-late"]
    assert trained.new_ids == [] and outcome.counts["facts"] == 0
    assert outcome.counts["unlearn"] == sum(r["kind"] == "unlearn" for r in trained.rows) > 0
    assert outcome.pre["forgotten_recall"] == 0.0 == outcome.post["forgotten_recall"]
    assert outcome.promoted, outcome.reasons
    assert outcome.unlearned == ["m-gone"] and outcome.learned == []


def test_a_learned_memory_waits_to_be_unlearned_then_is_erased_from_the_file(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    learned = fact("m-l", "Where does the user work?", "At the Acme secret lab", "learned")
    other = fact("m-v", "What is the user's cat called?", "Mister Whiskerton")
    store.add(learned), store.add(other)
    store.delete(learned.id, "test", "forget where I work")
    store.delete(other.id, "test", "forget my cat")
    assert [m.id for m in store.unlearning()] == ["m-l"]     # only what a version learned
    assert store.unlearning("someone else") == []
    raw = lambda: b"".join(p.read_bytes() for p in tmp_path.glob("m.sqlite*"))  # noqa: E731
    assert b"Mister Whiskerton" not in raw()
    assert store.finish_unlearning("m-l") is True and store.finish_unlearning("m-l") is False
    assert store.unlearning() == [] and b"Acme secret lab" not in raw()
    assert {t["id"] for t in store.deletions()} == {"m-l", "m-v"}  # the tombstones stay
