"""``reverie serve``: the OpenAI-compatible server (:mod:`reverie.wake.serve`) from the
command line: where to listen, the API key, the refusal to listen beyond this machine
without one.

A plain function; ``reverie.cli`` wraps it with typer.
"""

from __future__ import annotations

from typing import Callable, Optional

from reverie.cli.output import console, fail
from reverie.config import Settings


def bind_check(host: str, api_key: Optional[str], no_auth: bool) -> Optional[str]:
    """Why ``reverie serve`` must not listen on ``host`` as asked, or None when it may: a
    host other than loopback needs an API key, or ``--no-auth`` to say that anyone who
    can reach it may use the model and write into the day log."""
    from reverie.wake.serve import is_loopback

    if is_loopback(host) or api_key or no_auth:
        return None
    return (f"refusing to listen on {host} without an API key: anyone who can reach it "
            "could use the model and write into your day log. Set one with --api-key KEY, "
            "the REVERIE_API_KEY environment variable or serve.api_key in config.yaml, or "
            "pass --no-auth to serve without one.")


def serve_command(settings: Settings, host: Optional[str], port: Optional[int],
                  api_key: Optional[str], no_auth: bool, make_runtime: Callable[[], object]) -> int:
    """Serve until interrupted (Ctrl-C); returns the exit code.

    Args:
        host, port: where to listen (None: ``serve.host``, ``serve.port``).
        api_key: required as ``Authorization: Bearer KEY`` (None: ``serve.api_key``; from
            ``--api-key`` or ``REVERIE_API_KEY``).
        no_auth: no key at all (a configured one is ignored), and any host allowed.
        make_runtime: builds the runtime on the active model version (closed at the end).

    Exits 2 (through ``fail``) for a refused host, 1 when the address cannot be bound or
    the model cannot be loaded.
    """
    from reverie.runtime import fetch
    from reverie.runtime.gguf import GGUFError
    from reverie.runtime.sources import ModelSourceError
    from reverie.wake.serve import Server, create_app, is_loopback, listen, uvicorn_server

    host = host or settings.serve.host
    port = settings.serve.port if port is None else port
    key = None if no_auth else (api_key or settings.serve.api_key or None)
    why = bind_check(host, key, no_auth)
    if why:
        fail(why, 2)
    try:
        sock = listen(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}")
    runtime = make_runtime()
    try:
        server = Server(settings, runtime)
        with console.status("loading the model"):
            name = server.warm()
        where = sock.getsockname()
        bare = host.strip("[]")
        url = f"http://{f'[{bare}]' if ':' in bare else bare}:{where[1]}/v1"
        auth = "API key required" if key else "no API key"
        console.print(f"reverie serve: listening on {url} for model {name} "
                      f"(user {settings.wake.user} unless a request names one; {auth})",
                      highlight=False, markup=False, soft_wrap=True)
        if no_auth and not is_loopback(host):
            console.print(f"warning: no API key on {host}: anyone who can reach it may "
                          "use the model and write into the day log", style="yellow")
        uvicorn_server(create_app(server, key)).run(sockets=[sock])
    except (fetch.FetchError, GGUFError, ModelSourceError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        sock.close()
        runtime.close()
    return 0
