"""The top floor: the ``reverie`` command (Typer). It alone imports both the day
(:mod:`reverie.wake`) and the night (:mod:`reverie.graphs`), and hands the chat a ``sleep``
callable."""

from reverie.cli.main import app

__all__ = ["app"]
