"""Running a night: wiring settings to the graph's dependencies, checkpointing, resuming."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import aiosqlite
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from reverie.agents.dreamer import Dreamer
from reverie.agents.dreamer import VARIABLES as DREAMER_VARS
from reverie.agents.notetaker import VARIABLES as NOTETAKER_VARS
from reverie.agents.notetaker import NoteTaker
from reverie.agents.persona import VARIABLES as PERSONA_VARS
from reverie.agents.persona import PersonaConsultant
from reverie.agents.reshaper import VARIABLES as RESHAPER_VARS
from reverie.agents.reshaper import Reshaper
from reverie.agents.verifier import VARIABLES as VERIFIER_VARS
from reverie.agents.verifier import Verifier
from reverie.graphs.night import (STATE_RECORDS, Consolidation, NightDeps, Subconscious,
                                  build_graph, new_night_id)
from reverie.memory.daylog import DayLog
from reverie.memory.diary import Diary, list_nights
from reverie.memory.facts import ChromaUnavailable, FactStore, MemoryIndex, open_client
from reverie.memory.identity import load_identity
from reverie.memory.store import MemoryStore
from reverie.prompts import load_chat_frame, load_prompt
from reverie.config import Settings
from reverie.files import atomic_write_json
from reverie.locks import holds_night_lock
from reverie.training.dataset import unlearn_answer

# Which prompt each agent uses and the variables it fills in (``reverie prompts`` shows them).
AGENT_PROMPTS = {"notetaker": NOTETAKER_VARS, "dreamer": DREAMER_VARS, "verifier": VERIFIER_VARS,
                 "reshaper": RESHAPER_VARS, "persona": PERSONA_VARS}


class NightError(RuntimeError):
    """A night cannot start or resume (e.g. nothing to resume)."""


def build_deps(settings: Settings, night_id: str, models: dict, embedder,
               learner=None) -> NightDeps:
    """The graph's dependencies. ``models`` maps each role (notetaker, dreamer, verifier,
    reshaper, persona) to a LangChain chat model; ``embedder`` has ``embed(texts) -> (n, d)`` unit rows."""
    from reverie.runtime.embeddings import MiniLMEmbeddingFunction

    paths, night = settings.paths, settings.night
    prompt = lambda name: load_prompt(name, AGENT_PROMPTS[name], settings.prompts.dir)  # noqa: E731
    client = open_client(settings)  # embedded, or memory.chroma_url's server
    ef = MiniLMEmbeddingFunction(embedder)
    index = MemoryIndex(client, ef)

    def similarity(a: str, b: str) -> float:
        if not a or not b:
            return 0.0
        v = embedder.embed([a, b])
        return float(np.dot(v[0], v[1]))

    def novelty(text: str, user_id: str) -> float:
        nearest = index.nearest(text, user_id, k=1)
        return 1.0 - max(nearest[0][1], 0.0) if nearest else 1.0

    attempts = settings.structured.attempts
    identity_file = settings.identity_file or paths.identity
    identity = load_identity(identity_file)
    return NightDeps(
        night=night,
        notetaker=NoteTaker(models["notetaker"], prompt("notetaker"), night, attempts),
        dreamer=Dreamer(models["dreamer"], prompt("dreamer"), night, attempts),
        verifier=Verifier(models["verifier"], prompt("verifier"), night, novelty, attempts),
        reshaper=Reshaper(models["reshaper"], prompt("reshaper"), night, attempts),
        persona=PersonaConsultant(models["persona"], prompt("persona"), identity, attempts),
        identity=identity, daylog=DayLog(paths.days), store=MemoryStore(paths.memories_db),
        facts=FactStore(client, ef), index=index, similarity=similarity,
        diary=Diary(paths.diary, night_id), training_dir=paths.training_sets,
        forge=settings.forge,
        frame=load_chat_frame(identity.system_prompt(), settings.prompts.dir),
        learner=learner, unlearn_answer=unlearn_answer(settings.prompts.dir))


def unfinished_night(settings: Settings) -> Optional[str]:
    """The latest night that started but has no summary (killed), if any."""
    nights = [n for n in list_nights(settings.paths.diary) if n.get("status") == "unfinished"]
    return nights[-1]["night_id"] if nights else None


@holds_night_lock  # one night per data dir: a second one raises NightLocked
async def run_night(settings: Settings, models: dict | None = None, embedder=None,
                    runtime=None, resume: bool | str = False, user_id: str | None = None,
                    include_consumed: bool = False,
                    on_update: Callable[[str, dict], Any] | None = None,
                    learner: Callable | None | bool = True,
                    on_train: Callable[[int, int, float, float], None] | None = None) -> dict:
    """Run (or resume) one night and return its summary.

    Args:
        models: role -> chat model; missing roles come from ``runtime`` (a
            :class:`reverie.runtime.models.Runtime`) as configured.
        embedder: defaults to ``runtime.embedder()``.
        resume: ``True`` resumes the latest unfinished night, a string resumes that night.
        user_id: only this user's sessions (default: every user's).
        include_consumed: also sessions an earlier night consumed.
        on_update: called with (node name, its state update) as the graph runs.
        learner: ``True`` trains with :func:`reverie.training.forge.learn` when ``forge.enabled``;
            ``None``/``False`` stops at the training set; or a callable taking
            ``(night_id, training-set path)`` and returning a ForgeOutcome.
        on_train: ``(step, total, loss, tokens_per_s)`` while the forge trains.

    Raises:
        reverie.locks.NightLocked: another night is running on this data dir (refused at
            once, nothing written; a lock left by a killed night is taken over).
        NightError: ``resume`` asked for but there is no unfinished night.
        ChromaUnavailable: ``memory.chroma_url``'s server cannot be used: before the night
            starts (nothing written), or it stopped answering mid-night (the night stays
            unfinished; ``resume`` re-aligns the memory index and finishes it).
    """
    models = dict(models or {})
    for role in ("notetaker", "dreamer", "verifier", "reshaper", "persona"):
        if role not in models:
            models[role] = runtime.chat_model(role)
    embedder = embedder or runtime.embedder()
    if resume:
        night_id = resume if isinstance(resume, str) else unfinished_night(settings)
        if not night_id:
            raise NightError("no unfinished night to resume (see `reverie diary list`)")
    else:
        night_id = base = new_night_id()
        n = 1
        while (settings.paths.diary / night_id).exists():  # two nights in one second
            n += 1
            night_id = f"{base}-{n}"
    if learner is True:
        learner = None
        if settings.forge.enabled:
            from reverie.training.forge import learn_in_thread  # mlx, only when it trains

            def learner(night, training_set):
                return learn_in_thread(settings, night, training_set, progress=on_train)
    deps = build_deps(settings, night_id, models, embedder, learner or None)
    if resume:  # the store and the index are not written in one transaction: re-align them
        deps.index.sync(deps.store)
    started = deps.diary.dir / "started.json"
    inputs = {"night_id": night_id, "user_id": user_id, "include_consumed": include_consumed}
    if not resume:
        atomic_write_json(started, {**inputs, "settings": settings.night.model_dump()})
    config = {"configurable": {"thread_id": night_id},
              "max_concurrency": settings.night.max_concurrency, "recursion_limit": 200}
    settings.paths.nights_db.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    serde = JsonPlusSerializer(allowed_msgpack_modules=STATE_RECORDS)
    async with aiosqlite.connect(str(settings.paths.nights_db)) as conn:
        saver = AsyncSqliteSaver(conn, serde=serde)
        graph = build_graph().compile(checkpointer=saver)
        if resume:
            if (deps.diary.dir / "summary.json").exists():
                raise NightError(f"night {night_id} already finished")
            # a checkpoint: go on from it (a graph that ended only lacks its summary); none
            # (killed before the first step was saved): start as the night was asked to
            if (await graph.aget_state(config)).values:
                inputs = None
            else:
                asked = json.loads(started.read_text()) if started.exists() else {}
                inputs = {k: asked.get(k, inputs[k]) for k in inputs}
        try:
            # durability="sync": each step's checkpoint is on disk before the next step
            # starts (a few ms of SQLite per step). With LangGraph's default ("async") it
            # is saved while the next step runs, so a kill then could lose a finished step
            # (consolidation, the hand-off, the forge) and the resumed night would do its
            # work again, the forge's minutes of training included.
            async for update in graph.astream(inputs, config, context=deps,
                                              stream_mode="updates", durability="sync"):
                for node, value in update.items():
                    if on_update:
                        on_update(node, value or {})
        except ChromaUnavailable as exc:  # the server dropped: the checkpoint has the rest
            raise ChromaUnavailable(f"{exc}\nnight {night_id} is unfinished; when the server "
                                    "answers again, `reverie night --resume` finishes it") from exc
        state = (await graph.aget_state(config)).values
    return deps.diary.finish(summarize(state, time.perf_counter() - t0))


def summarize(state: dict, seconds: float) -> dict:
    """The night's counts (the diary adds time and tokens per agent)."""
    cands = list(state.get("candidates", {}).values())
    ops = state.get("consolidation") or Consolidation()
    sub = state.get("subconscious") or Subconscious()
    count = lambda status: sum(c.status == status for c in cands)  # noqa: E731
    return {
        "sessions": len(state.get("sessions", [])),
        "candidates": len(cands),
        "passed": sum(any(h.get("agent") == "verifier" and h.get("status") == "passed"
                          for h in c.history) for c in cands),
        "reshaped": sum(c.round > 0 for c in cands),
        "rejected": count("rejected"),
        "vetoed": count("vetoed"),
        "approved": count("approved"),
        "facts_routed": state.get("routed_chunks", 0),
        "forget_requests": len(state.get("forget", [])),
        "memories_added": len(ops.added),
        "superseded": len(ops.superseded),
        "duplicates": len(ops.duplicates),
        "deleted": len(ops.deleted),
        "dropped_on_request": len(ops.dropped),
        "parked": len(sub.parked),
        "revisited": sum(bool(c.revives) for c in cands),
        "revived": len(sub.revived),
        "expired": len(sub.expired),
        "training_set": state.get("training_set", ""),
        "forge": {k: v for k, v in state.get("forge", {}).items() if k not in ("losses",)},
        "seconds": round(seconds, 1),
    }
