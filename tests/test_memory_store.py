"""The long-term memory store (SQLite) and the Chroma fact store / memory index."""

from __future__ import annotations

import json
import sqlite3
import threading
import warnings
from datetime import datetime, timezone

import pytest

from reverie.memory.facts import (FactChunk, FactStore, MemoryIndex, chunk_verbatim, fact_chunks,
                          is_verbatim)
from reverie.memory.records import Memory, Message
from reverie.memory.store import MemoryStore


def fact(user: str, q: str, a: str, **kw) -> Memory:
    return Memory(user_id=user, kind="fact", question=q, answer=a, **kw)


# ------------------------------------------------------------------------ MemoryStore


def test_add_is_idempotent(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    m = fact("u1", "Where does the user work?", "At the hospital.")
    assert store.add(m) is True
    assert store.add(m) is False
    assert store.add(m.model_copy(update={"answer": "changed"})) is False  # same id: no-op
    assert store.get(m.id) == m
    assert len(store) == 1
    assert store.counts() == {"candidate": 1, "verified": 0, "rejected": 0, "learned": 0}


def test_update_appends_history_and_checks_existence(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    m = fact("u1", "Pet's name?", "Biscuit.")
    store.add(m)
    stored = store.update(m.model_copy(update={"status": "verified"}), "verifier: grounded")
    assert stored.status == "verified" and stored.updated_at > m.updated_at
    assert stored.history[-1]["reason"] == "verifier: grounded"
    assert stored.history[-1]["status"] == "verified" and "at" in stored.history[-1]
    assert store.get(m.id) == stored
    assert store.list(status="verified") == [stored]
    with pytest.raises(KeyError):
        store.update(fact("u1", "q", "a"), "nope")
    with pytest.raises(ValueError):
        store.update(stored.model_copy(update={"user_id": "u2"}), "move")


def test_supersede_links_both_ways_and_survives_reopening(tmp_path):
    path = tmp_path / "m.sqlite"
    store = MemoryStore(path)
    old = fact("u1", "Where does the user live?", "In Porto.")
    new = fact("u1", "Where does the user live?", "In Lisbon, since March.")
    store.add(old)
    got = store.supersede(old.id, new, "user said they moved")
    assert got.id == new.id and old.id in got.associated
    # Again (a resumed night): nothing changes.
    assert store.supersede(old.id, new, "user said they moved") == got
    store.close()

    store = MemoryStore(path)
    o, n = store.get(old.id), store.get(new.id)
    assert o.superseded_by == new.id and o.answer == "In Porto."  # old version kept
    assert old.id in n.associated
    assert len(o.history) == 1 and "user said they moved" in o.history[0]["reason"]
    assert len(n.history) == 1
    assert [m.id for m in store.list(user_id="u1")] == [new.id]
    assert {m.id for m in store.list(user_id="u1", include_superseded=True)} == {old.id, new.id}
    assert [m.id for m in store.versions(new.id)] == [old.id, new.id]
    assert [m.id for m in store.versions(old.id)] == [old.id, new.id]

    with pytest.raises(KeyError):
        store.supersede("mem-missing", fact("u1", "q", "a"), "x")
    with pytest.raises(ValueError):  # another user's memory
        store.supersede(new.id, fact("u2", "Where?", "Faro."), "x")
    with pytest.raises(ValueError):  # already superseded: supersede the newest instead
        store.supersede(old.id, fact("u1", "Where?", "Faro."), "x")


def test_failure_inside_supersede_leaves_store_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "m.sqlite"
    store = MemoryStore(path)
    old = fact("u1", "Favourite colour?", "Blue.")
    store.add(old)
    before = store.list(include_superseded=True)

    calls = {"n": 0}
    real = MemoryStore._replace

    def failing_replace(self, conn, m):  # the insert of the new memory has happened
        calls["n"] += 1
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(MemoryStore, "_replace", failing_replace)
    new = fact("u1", "Favourite colour?", "Green.")
    with pytest.raises(sqlite3.OperationalError):
        store.supersede(old.id, new, "changed their mind")
    assert calls["n"] == 1
    monkeypatch.setattr(MemoryStore, "_replace", real)

    assert store.get(new.id) is None
    assert store.list(include_superseded=True) == before
    reopened = MemoryStore(path)
    assert reopened.list(include_superseded=True) == before
    assert reopened.get(old.id).superseded_by is None
    # A constraint violation is rolled back too (model_copy skips pydantic's checks).
    bad = fact("u1", "q", "a").model_copy(update={"status": "bogus"})
    with pytest.raises(sqlite3.IntegrityError):
        store.supersede(old.id, bad, "x")
    assert store.list(include_superseded=True) == before
    # And the store still works afterwards.
    assert store.supersede(old.id, new, "changed their mind").id == new.id


def test_delete_removes_content_and_leaves_tombstone(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    m = fact("u1", "Where does the user work?", "At the Acme secret lab.")
    keep = fact("u1", "Pet?", "A dog.")
    store.add(m), store.add(keep)
    assert store.delete(m.id, "user asked to forget", "forget where I work") is True
    assert store.delete(m.id, "again", "forget where I work") is False
    assert store.get(m.id) is None
    assert store.add(m) is False  # a resumed night cannot bring it back
    [tomb] = store.deletions(user_id="u1")
    assert tomb["id"] == m.id and tomb["request"] == "forget where I work"
    assert store.deletions(user_id="u2") == []
    # The content is gone from the file itself (secure_delete, WAL checkpointed), not only
    # from queries.
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("m.sqlite*"))
    assert b"Acme secret lab" not in raw
    store.close()
    con = sqlite3.connect(tmp_path / "m.sqlite")
    assert "Acme secret lab" not in "\n".join(con.iterdump())
    assert [r[0] for r in con.execute("SELECT id FROM memories")] == [keep.id]


def test_users_kept_apart_in_list_and_counts(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    a = fact("alice", "Pet's name?", "Biscuit.", status="verified")
    b = fact("bob", "Pet's name?", "Rex.")
    store.add(a), store.add(b)
    assert store.list(user_id="alice") == [a]
    assert store.list(user_id="bob") == [b]
    assert store.counts("alice")["verified"] == 1 and store.counts("alice")["candidate"] == 0
    assert store.list(user_id="carol") == []
    assert store.list(kind="preference") == [] and len(store.list(kind=["fact"])) == 2


def test_store_is_thread_safe(tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    mems = [fact(f"u{i % 3}", f"q{i}", f"a{i}") for i in range(60)]
    added = []

    def work(chunk):
        for m in chunk:
            added.append(store.add(m))
            added.append(store.add(m))

    threads = [threading.Thread(target=work, args=(mems[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert added.count(True) == 60 and len(store) == 60


# ------------------------------------------------------------------------ verbatim


def test_is_verbatim():
    assert is_verbatim("I went to the market with my sister and we bought apples.") == []
    assert is_verbatim("I have 2 kids and 3 cats") == []
    assert is_verbatim("Here it is:\n```python\nprint('hi')\n```") == ["code"]
    assert "code" in is_verbatim("def f(x):\n    return x + 1\n\ny = f(2)\nprint(y)")
    assert is_verbatim("the docs are at https://example.com/docs?page=2") == ["url"]
    assert is_verbatim('my settings: {"temperature": 0.7, "top_p": 0.9, "model": "x"}') \
        == ["json"]
    assert is_verbatim("[sic] and {} and [1, 2]") == []
    assert is_verbatim("My flight is BA 2490 on 12 May at 14:35, seat 23C") == ["numbers"]
    assert is_verbatim("word " * 300) == ["long"]
    assert is_verbatim("word " * 300, long_chars=5000) == []


def test_chunking_keeps_code_block_whole_and_urls_uncut():
    code = "```python\n" + "\n".join(f"x{i} = compute({i})" for i in range(12)) + "\n```"
    url = "https://example.com/" + "p" * 120
    text = ("Some prose before the code. " * 12 + "\n\n" + code + "\n\nAnd after, see "
            + url + " " + "filler words here " * 20)
    chunks = chunk_verbatim(text, max_chars=300)
    assert len(code) <= 300
    assert sum(code in c for c in chunks) == 1
    assert sum(url in c for c in chunks) == 1
    assert all(len(c) <= 300 for c in chunks)
    # An oversize block is split between lines, each piece a fenced block of its own.
    big = chunk_verbatim(code, max_chars=120)
    assert len(big) > 1 and all(c.startswith("```python\n") and c.endswith("\n```")
                                for c in big)
    assert "\n".join(line for c in big for line in c.split("\n")[1:-1]) in code
    # A URL longer than a chunk stays whole.
    assert url in chunk_verbatim("x " + url + " y", max_chars=60)


# ------------------------------------------------------------------------ Chroma


@pytest.fixture(scope="module")
def ef(minilm_dir):
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction

    return MiniLMEmbeddingFunction(minilm_dir)


def test_fact_store_idempotent_and_users_apart(ef, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        facts = FactStore(tmp_path / "chroma", ef)
        t = datetime(2026, 5, 1, 9, 30, tzinfo=timezone.utc)
        msg = Message(turn_id="t3", role="user", timestamp=t,
                      content="my router config: {\"ssid\": \"home-5g\", \"channel\": 36, "
                              "\"password\": \"hunter22\"}")
        alice = fact_chunks("alice", "s1", msg)
        assert [c.id for c in alice] == ["alice:s1:t3:0"] and alice[0].kinds == ["json"]
        bob = [FactChunk(user_id="bob", session_id="s9", turn_id="t1", kinds=["json"],
                         text='router config: {"ssid": "bobnet", "channel": 11}')]
        assert facts.add(alice + bob) == 2
        assert facts.add(alice) == 0 and facts.add(alice + bob + alice) == 0
        assert facts.count() == 2 and facts.count("alice") == 1

        # Re-opened from disk: still there, still no-op.
        facts = FactStore(tmp_path / "chroma", ef)
        assert facts.add(alice) == 0 and facts.count() == 2
        hits = facts.query("what is my wifi network called?", "alice", k=5)
        assert [c.id for c, _ in hits] == ["alice:s1:t3:0"]
        chunk, dist = hits[0]
        assert chunk == alice[0] and chunk.time == t and 0 <= dist < 1
        assert [c.user_id for c, _ in facts.query("router config", "bob")] == ["bob"]
        assert facts.query("router config", "carol") == []


def test_memory_index_nearest_users_apart_and_superseded(ef, tmp_path):
    store = MemoryStore(tmp_path / "m.sqlite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = MemoryIndex(tmp_path / "chroma", ef)
        a = fact("alice", "What is the user's dog called?", "Biscuit.")
        b = fact("bob", "What is the user's dog called?", "Biscuit.")
        c = fact("alice", "Where does the user work?", "At a bakery.")
        for m in (a, b, c):
            store.add(m)
            index.upsert(m)
        hits = index.nearest("the name of my dog", "alice", k=5)
        assert [i for i, _ in hits][0] == a.id and b.id not in {i for i, _ in hits}
        assert {i for i, _ in hits} == {a.id, c.id}
        assert all(-1 <= s <= 1 for _, s in hits) and hits[0][1] > 0.5
        assert hits[0][1] > hits[1][1]
        assert [i for i, _ in index.nearest("the name of my dog", "bob")] == [b.id]

        # Identical text: similarity ~1 (cosine space, converted from distance).
        [(top, sim)] = index.nearest(a.statement(), "alice", k=1)
        assert top == a.id and sim == pytest.approx(1.0, abs=1e-3)

        # Superseded memories drop out unless asked for.
        new = fact("alice", "What is the user's dog called?", "Biscuit, now Max.")
        store.supersede(a.id, new, "renamed")
        index.upsert(store.get(a.id))
        index.upsert(store.get(new.id))
        ids = [i for i, _ in index.nearest("dog name", "alice", k=5)]
        assert a.id not in ids and new.id in ids
        assert a.id in [i for i, _ in index.nearest("dog name", "alice", k=5,
                                                    exclude_superseded=False)]

        # Deleted in the store: sync drops it from the index.
        store.delete(c.id, "user asked", "forget where I work")
        assert index.sync(store, user_id="alice") == {"indexed": 2, "removed": 1}
        assert c.id not in [i for i, _ in index.nearest("work", "alice")]
        assert index.count("alice") == 2 and index.count("bob") == 1
        index.remove(b.id)
        assert index.nearest("dog", "bob") == []


def test_fact_chunk_round_trip_metadata():
    c = FactChunk(user_id="u", session_id="s", turn_id="t", index=2, kinds=["code", "url"],
                  text="x")
    assert c.id == "u:s:t:2"
    again = FactChunk.from_chroma(c.id, c.text, json.loads(json.dumps(c.metadata())))
    assert again == c
