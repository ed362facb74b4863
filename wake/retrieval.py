"""Retrieval for the chat: one user's memories and verbatim chunks, as LangChain documents.

Two sources, both in ChromaDB and both filtered by user id inside the query (a user's
retrieval never reads another's data):

- memories (the night's verified and learned Q&A, preferences and rules): the
  :class:`~reverie.memory.facts.MemoryIndex`, text from the :class:`~reverie.memory.store.MemoryStore`;
- verbatim chunks (code, URLs, JSON the night routed to the fact store):
  :class:`~reverie.memory.facts.FactStore`.

Both are ranked by cosine distance (0 = same direction, 2 = opposite); only those within
``max_distance`` come back, nearest first.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from reverie.memory.facts import FactStore, MemoryIndex, open_client
from reverie.memory.store import MemoryStore

USABLE = ("verified", "learned")


class MemoryRetriever(BaseRetriever):
    """A langchain-core retriever over one user's memories and verbatim chunks.

    Attributes:
        user_id: whose data is searched (fixed per retriever).
        store, index, facts: the memory store, its embedding index and the fact store;
            ``facts`` may be None.
        k: at most this many results from each source.
        max_distance: cosine distance cut-off, in [0, 2].

    ``invoke(query)`` returns documents with ``metadata``: ``source`` ("memory" or "fact"),
    ``id``, ``distance`` (float), ``user_id``, and for memories ``kind`` and ``status``;
    sorted by distance.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    user_id: str
    store: Any
    index: Any
    facts: Any = None
    k: int = 4
    max_distance: float = 0.75

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        docs = self._memories(query) + self._chunks(query)
        return sorted(docs, key=lambda d: d.metadata["distance"])

    def _memories(self, query: str) -> list[Document]:
        out = []
        for memory_id, similarity in self.index.nearest(query, self.user_id, k=self.k,
                                                        status=USABLE):
            distance = 1.0 - similarity
            memory = self.store.get(memory_id)
            # the index is derived data; the store is the record (a deleted memory is gone)
            if memory is None or memory.user_id != self.user_id or distance > self.max_distance:
                continue
            out.append(Document(page_content=memory.statement(), metadata={
                "source": "memory", "id": memory.id, "distance": distance,
                "user_id": memory.user_id, "kind": memory.kind, "status": memory.status}))
        return out

    def _chunks(self, query: str) -> list[Document]:
        if self.facts is None or self.facts.count(self.user_id) == 0:
            return []
        return [Document(page_content=chunk.text, metadata={
            "source": "fact", "id": chunk.id, "distance": distance, "user_id": chunk.user_id})
            for chunk, distance in self.facts.query(query, self.user_id, k=self.k)
            if distance <= self.max_distance and chunk.user_id == self.user_id]


def open_retriever(settings, embedder, user_id: str) -> MemoryRetriever:
    """A :class:`MemoryRetriever` on the data directory's stores (Chroma from
    :func:`~reverie.memory.facts.open_client`: ``paths.chroma``, or the server of
    ``memory.chroma_url``; SQLite at ``paths.memories_db``), with ``wake.rag_k`` and
    ``wake.rag_max_distance``.

    Raises:
        ChromaUnavailable: ``memory.chroma_url`` is set and its server cannot be used."""
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction

    client = open_client(settings)
    ef = MiniLMEmbeddingFunction(embedder)
    return MemoryRetriever(user_id=user_id, store=MemoryStore(settings.paths.memories_db),
                           index=MemoryIndex(client, ef), facts=FactStore(client, ef),
                           k=settings.wake.rag_k, max_distance=settings.wake.rag_max_distance)
