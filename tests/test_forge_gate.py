"""The forge end to end on a tiny random llama: the gate rejects a destructive learning rate
and keeps the old model active; a gentle one is promoted; rollback restores the base."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from reverie.memory.records import IdentityItem, Memory
from reverie.config import load_settings
from reverie.training import dataset
from reverie.training.forge import learn
from reverie.training.versions import Versions

from conftest import REPO, tiny_llama


@pytest.fixture(scope="module")
def taught_base(tmp_path_factory, smollm2_tokenizer):
    """A tiny llama that has learned the shipped general chat, so that damage shows."""
    from reverie.training.gate import general_rows
    from reverie.training.lora import LoraArgs, train_adapter
    from reverie.training.versions import fuse

    model = tiny_llama(vocab_size=49152, seed=3)
    args = LoraArgs(rank=8, num_layers=2, learning_rate=1e-2, warmup=0, min_iters=60,
                    max_iters=60, batch_size=4, kl_weight=0.0)
    train_adapter(model, smollm2_tokenizer, general_rows(), [], args,
                  tmp_path_factory.mktemp("pre") / "adapter")
    return fuse(model)


@pytest.fixture
def settings(tmp_path, smollm2_tokenizer, taught_base):
    s = load_settings(REPO / "config.yaml", data_dir=tmp_path / "data")
    s.forge.min_iters, s.forge.max_iters, s.forge.num_layers = 6, 6, 2
    versions = Versions(s.paths.versions)
    versions.save_model("base", taught_base, smollm2_tokenizer)
    versions.activate("base")
    return s


def facts():
    return [Memory(id=f"m{i}", user_id="me", kind="fact", question=q, answer=a,
                   phrasings=[p], status="verified")
            for i, (q, a, p) in enumerate([
                ("What is the user's dog called?", "Biscuit", "What's the name of the user's dog?"),
                ("Where does the user work?", "Tidewater Labs", "Which company employs the user?")])]


IDENTITY = [IdentityItem(question="Who are you?", answer="I am Reverie.")]


def handoff(settings, night_id):
    """What the night's hand-off node writes: the curated set, in the chat's frame."""
    from reverie.prompts import chat_frame

    ts = dataset.curate(facts(), [], IDENTITY, settings.forge, chat_frame(settings))
    return ts.save(settings.paths.training_sets / f"{night_id}.jsonl")


def weights(folder):
    return dict(tree_flatten(mx.load(str(folder / "model.safetensors"))))


def test_destructive_learning_rate_is_rolled_back(settings):
    settings.forge.learning_rate = 1.0  # deliberately destructive
    settings.forge.warmup = 0
    before = weights(Versions(settings.paths.versions).path("base"))
    outcome = learn(settings, "n1", handoff(settings, "n1"))
    assert not outcome.promoted and outcome.version is None
    assert any("held-out loss" in r for r in outcome.reasons), outcome.reasons
    versions = Versions(settings.paths.versions)
    assert versions.active() == "base" and versions.names() == ["base"]
    after = weights(versions.path("base"))
    assert all(mx.array_equal(before[k], after[k]).item() for k in before)
    line = json.loads(settings.paths.experiments.read_text().splitlines()[-1])
    assert line["promoted"] is False and line["reasons"] == outcome.reasons


def test_gentle_training_is_promoted_and_rollback_restores_base(settings):
    settings.forge.learning_rate = 1e-5
    path = handoff(settings, "n2")
    outcome = learn(settings, "n2", path)
    assert outcome.promoted, outcome.reasons
    # the hand-off file now holds exactly what was trained: completed with rehearsal rows
    trained = dataset.TrainingSet.load(path)
    assert trained.stage == "forge" and trained.counts == outcome.counts
    for kind, part in (("rehearsal", "rehearsal"), ("identity", "identity")):
        assert sum(r["kind"] == kind for r in trained.rows) == outcome.counts[part]
    assert outcome.counts["identity"] > 1                   # repeated to forge.identity_share
    assert len(trained.rows) == sum(outcome.counts[k] for k in
                                    ("facts", "replay", "rehearsal", "identity"))
    versions = Versions(settings.paths.versions)
    assert versions.active() == "night-n2" and versions.lineage("night-n2") == ["base", "night-n2"]
    assert (settings.paths.adapters / "n2" / "adapter_config.json").exists()
    assert versions.rollback() == "base" and versions.active() == "base"


def test_training_set_holds_out_one_phrasing_and_mixes_the_rest(settings):
    cfg = settings.forge
    rehearsal = [{"messages": [{"role": "user", "content": f"q{i}"},
                               {"role": "assistant", "content": f"a{i}"}], "kind": "rehearsal"}
                 for i in range(40)]
    earlier = [Memory(id="old", user_id="me", kind="fact", question="How old is the user?",
                      answer="41", status="learned", phrasings=["What is the user's age?"])]
    ts = dataset.build(facts(), earlier, IDENTITY, rehearsal, cfg)
    trained = [r["messages"][0]["content"] for r in ts.rows if r["kind"] == "fact"]
    held = [q for q, _ in ts.new_items]
    assert held == ["What's the name of the user's dog?", "Which company employs the user?"]
    assert not set(held) & set(trained)
    assert (ts.counts["facts"], ts.counts["replay"]) == (2 * cfg.phrasings, cfg.phrasings)
    assert ts.counts["rehearsal"] == max(round(cfg.rehearsal_ratio * 2 * cfg.phrasings),
                                         min(cfg.rehearsal_min, len(rehearsal)))
    cfg.rehearsal_min, cfg.rehearsal_ratio = 0, 0.5
    assert dataset.build(facts(), [], IDENTITY, rehearsal, cfg).counts["rehearsal"] == cfg.phrasings
    cfg.rehearsal_min = 25
    assert dataset.build(facts(), [], IDENTITY, rehearsal, cfg).counts["rehearsal"] == 25
    cfg.rehearsal_ratio = 0.0
    assert dataset.build(facts(), [], IDENTITY, rehearsal, cfg).counts["rehearsal"] == 0
    share = ts.counts["identity"] / len(ts.rows)
    assert abs(share - cfg.identity_share) < 0.05
    assert ts.regression_items == [("How old is the user?", ["41"])]
    # replay: unlearned and less-replayed memories first
    a = Memory(id="a", user_id="me", kind="fact", question="q", answer="x", status="learned", replays=0)
    b = Memory(id="b", user_id="me", kind="fact", question="q", answer="x", status="verified", replays=1)
    c = Memory(id="c", user_id="me", kind="fact", question="q", answer="x", status="verified", replays=3)
    assert dataset.replay_priority(c) < dataset.replay_priority(b) == dataset.replay_priority(a)
    assert {m.id for m in dataset.choose_replay([c, b, a], 2)} == {"a", "b"}


def test_training_set_file_round_trips_and_names_a_bad_line(settings, tmp_path):
    ts = dataset.curate(facts(), [], IDENTITY, settings.forge)
    path = ts.save(tmp_path / "n.jsonl")
    back = dataset.TrainingSet.load(path)
    assert (back.rows, back.new_items, back.dev_items, back.new_ids, back.counts, back.stage) == (
        ts.rows, ts.new_items, ts.dev_items, ts.new_ids, ts.counts, "handoff")
    with open(path, "a") as f:
        f.write('{"split": "heldout", "answers": ["x"]}\n')
    n = len(path.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"n.jsonl:{n}: a heldout line needs question"):
        dataset.TrainingSet.load(path)
