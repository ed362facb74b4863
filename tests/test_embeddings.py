"""all-MiniLM-L6-v2 in MLX: agreement with sentence-transformers, batching, ChromaDB."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from reverie.runtime.embeddings import MiniLMEmbeddingFunction

FIXTURES = Path(__file__).resolve().parent / "fixtures"

LONG = " ".join(["The committee reviewed every clause of the agreement in great detail"] * 12)


def test_matches_sentence_transformers(embedder):
    ref = json.loads((FIXTURES / "minilm_reference.json").read_text())
    ours = embedder.embed(ref["texts"])
    theirs = np.asarray(ref["embeddings"], dtype=np.float32)
    assert ours.shape == theirs.shape == (len(ref["texts"]), 384)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    print(f"min cosine vs sentence-transformers: {cos.min():.7f}")
    for text, c in zip(ref["texts"], cos):
        assert c >= 0.999, (text, c)


def test_padding_does_not_change_an_embedding(embedder):
    text = "My dog is called Biscuit."
    alone = embedder.embed([text])
    assert len(embedder.tokenizer.encode(LONG).ids) > 5 * len(embedder.tokenizer.encode(text).ids)
    batched = embedder.embed([LONG, text], batch_size=2)
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)


def test_order_is_preserved_across_length_sorted_batches(embedder):
    texts = [LONG, "hi", "A medium length sentence about the weather.", "", "ok then", LONG[:120]]
    together = embedder.embed(texts, batch_size=2)  # sorting by length reorders these
    one_by_one = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_empty_input_and_bad_arguments(embedder):
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        embedder.embed(["fine", None])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        embedder.embed(["fine"], batch_size=0)


def test_long_text_is_truncated_at_256_tokens(embedder):
    assert len(embedder.tokenizer.encode(LONG * 3).ids) == 256
    assert embedder.embed([LONG * 3]).shape == (1, 384)


DOCS = {
    "dog": "My dog is called Biscuit and he loves long walks.",
    "market": "The stock market fell sharply today after the announcement.",
    "nurse": "I moved to Lisbon in March and work as a nurse at the hospital.",
}


def test_chroma_round_trip_and_reopen(embedder, minilm_dir, tmp_path):
    import chromadb

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no legacy-config or space warnings from Chroma
        client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
        col = client.create_collection("memories", embedding_function=MiniLMEmbeddingFunction(embedder))
        col.add(ids=list(DOCS), documents=list(DOCS.values()))
        hit = col.query(query_texts=["What is the name of my pet?"], n_results=3)
        assert hit["ids"][0][0] == "dog"

        # Re-opened without passing the function: Chroma rebuilds it from the stored config.
        reopened = chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_collection("memories")
        hit = reopened.query(query_texts=["share prices dropped"], n_results=1)
        assert hit["ids"][0] == ["market"]
        # ... and with it, from a model folder (loaded lazily).
        again = client.get_collection("memories",
                                      embedding_function=MiniLMEmbeddingFunction(minilm_dir))
        assert again.query(query_texts=["she is a nurse"], n_results=1)["ids"][0] == ["nurse"]
