"""The memory index embedded vs on a Chroma server: what ``memory.chroma_url`` costs.

100 memories indexed one at a time (:meth:`MemoryIndex.upsert`, as the night's consolidate
does: a get, then an upsert) and 100 nearest-neighbour queries (:meth:`MemoryIndex.nearest`,
as the verifier's novelty check and the chat's retrieval do), once on the embedded Chroma
(``PersistentClient`` in a temporary folder) and once on a Chroma server on 127.0.0.1
(``chroma run`` started here in a temporary folder, or ``--url`` for one already running).
Each with Reverie's embeddings (all-MiniLM-L6-v2, computed in this process either way) and
with fixed random vectors, which leaves only the store and the transport.

    .venv/bin/python benchmarks/bench_chroma.py
    .venv/bin/python benchmarks/bench_chroma.py --url http://127.0.0.1:8001

Prints a Markdown table and appends it to benchmarks/results/chroma.md.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 100


class FixedVectors:
    """A Chroma embedding function with no model: each text's 384-d unit vector comes from
    a random generator seeded by its CRC32 (same text, same vector)."""

    def __init__(self):
        import numpy as np

        self.np = np

    def __call__(self, input):
        np = self.np
        out = []
        for text in input:
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(384)
            out.append((v / np.linalg.norm(v)).astype(np.float32))
        return out

    @staticmethod
    def name() -> str:
        return "bench_fixed_vectors"

    def get_config(self) -> dict:
        return {}

    @staticmethod
    def build_from_config(config: dict) -> "FixedVectors":
        return FixedVectors()

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine"]

    def is_legacy(self) -> bool:
        return False

    def embed_query(self, input):
        return self(input)


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``chroma run`` on a free port of 127.0.0.1; returns the process and its URL once its
    heartbeat answers (60 s at most)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("chroma")), "run", "--path",
                             str(folder / "server"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"`chroma run` did not answer at {url}")


def run(client, ef, collection: str) -> tuple[float, float]:
    """Seconds for N upserts, then N queries, on a fresh collection."""
    from reverie.memory.facts import MemoryIndex
    from reverie.memory.records import Memory

    index = MemoryIndex(client, ef, collection=collection)
    memories = [Memory(user_id="me", kind="fact", status="verified",
                       question=f"What is fact number {i} about the user's trip {i % 7}?",
                       answer=f"answer {i}") for i in range(N)]
    index.upsert(Memory(user_id="me", kind="fact", question="warm up?", answer="yes"))
    index.nearest("warm up", "me")
    t0 = time.perf_counter()
    for m in memories:
        index.upsert(m)
    t1 = time.perf_counter()
    for i in range(N):
        index.nearest(f"Tell me about fact {i} of the trip", "me", k=5)
    t2 = time.perf_counter()
    assert index.count("me") == N + 1
    return t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--url", help="a running Chroma server (default: start one here)")
    args = parser.parse_args()

    from reverie.config import MemoryConfig, load_settings
    from reverie.memory.facts import open_client
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction
    from reverie.runtime.models import Runtime

    settings = load_settings(args.config)
    runtime = Runtime(settings)
    minilm = MiniLMEmbeddingFunction(runtime.embedder())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = (None, args.url) if args.url else start_server(Path(tmp))
        try:
            stamp = time.strftime("%H%M%S")
            server = f"server ({url})" if args.url else "server (127.0.0.1)"
            clients = {"embedded (PersistentClient)": open_client(None, Path(tmp) / "embedded"),
                       server: open_client(MemoryConfig(chroma_url=url))}
            for where, client in clients.items():
                for label, ef in (("all-MiniLM-L6-v2", minilm), ("fixed vectors", FixedVectors())):
                    up, q = run(client, ef, f"bench-{stamp}-{len(rows)}")
                    rows.append((where, label, up, q))
        finally:
            runtime.close()
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_extraction import cpu_model, publish

    lines = [f"### {date.today()} · {cpu_model()} · memory index, embedded vs Chroma server", "",
             f"{N} MemoryIndex.upsert calls (one memory each), then {N} MemoryIndex.nearest "
             f"(k=5), from one process; {server}. Indicative: the CPU is shared.", "",
             "| store | embeddings | 100 upserts, s | per upsert, ms | 100 queries, s "
             "| per query, ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {where} | {label} | {up:.2f} | {1000 * up / N:.1f} | {q:.2f} "
              f"| {1000 * q / N:.1f} |" for where, label, up, q in rows]
    publish("\n".join(lines) + "\n", "chroma.md")


if __name__ == "__main__":
    main()
