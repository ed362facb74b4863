"""``python -m reverie``: the same command as ``reverie``."""

from reverie.cli import app

app(prog_name="reverie")
