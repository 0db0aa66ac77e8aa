"""`nanollm ui`: the MLflow UI over this project's store, on 127.0.0.1 unless told otherwise.

It prints the page that lists the models' runs (creating the experiment first if the store has
none, so the link always works) once the server answers, and supervises `mlflow server`. What
the UI shows and the server's command line are nanollm.tracking's; this module owns the process:
the server runs in a process group of its own, SIGINT and SIGTERM to `nanollm ui` go to that
whole group (mlflow server and its uvicorn), and `nanollm ui` returns once they are gone, with
128 + the signal number as a shell reports it. Without that, a SIGTERM stopped `nanollm ui` and
left uvicorn on the port.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from stages.cli import StageContext, pass_context

# uvicorn finishes the requests in flight on SIGTERM (~1 s); past this the group is killed
_STOP_GRACE_S = 15.0


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 exposes it.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@pass_context
def command(ctx: StageContext, host: str, port: int) -> None:
    """Browse and compare the project's MLflow runs (one per trained model)."""
    from nanollm.errors import NanollmError
    from nanollm.tracking.store import tracking_uri
    from nanollm.tracking.ui import runs_url, ui_command, ui_environment, ui_experiment, wait_until_serving

    cfg = ctx.config.tracking
    uri = tracking_uri(cfg, ctx.root)
    if uri.startswith(("http://", "https://")):
        raise NanollmError(
            f"the tracking URI {uri} is an MLflow server already: open it in a browser "
            "(nanollm ui serves a local store; unset MLFLOW_TRACKING_URI/tracking.uri for the project's mlflow.db)"
        )
    experiment_id = ui_experiment(cfg, ctx.root)
    click.echo(f"MLflow UI over {uri}: starting on {host}:{port}", err=True)
    base = f"http://{_browsable(host)}:{port}"

    def announce(alive: Callable[[], bool]) -> None:
        """The link, once the server answers: printed earlier, a browser opened at once is refused."""
        if wait_until_serving(base, alive):
            click.echo(f"open {runs_url(base, experiment_id)} (Ctrl+C stops it)", err=True)

    raise SystemExit(serve(ui_command(cfg, ctx.root, host=host, port=port), ui_environment(), on_start=announce))


def _browsable(host: str) -> str:
    """The host to type in a browser on this machine for a server bound to `host`.

    A wildcard address is no page to open: MLflow refuses requests whose Origin is http://0.0.0.0.
    """
    if host in ("127.0.0.1", "::1", "0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def serve(command: list[str], env: dict[str, str], on_start: Callable[[Callable[[], bool]], None] | None = None) -> int:
    """Run `command` in a process group of its own until it exits or SIGINT/SIGTERM stops it.

    on_start(alive) runs once the process is started (alive() says whether it still runs).
    Returns the command's exit code, or 128 + the signal number when a signal stopped it. Every
    process of the group is gone on return.
    """
    import signal
    import subprocess

    received: list[int] = []
    group: list[int] = []  # the server's process group id, once it runs

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if group:
            _signal_group(group[0], signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = subprocess.Popen(command, env=env, process_group=0)
        group.append(server.pid)
        if received:  # a signal that came while the server was starting
            _signal_group(server.pid, received[0])
        elif on_start is not None:
            on_start(lambda: server.poll() is None and not received)
        code = server.wait()
        _wait_for_group(server.pid, _STOP_GRACE_S)  # uvicorn may outlive `mlflow server` by a moment
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code


def _signal_group(pgid: int, signum: int) -> None:
    import contextlib
    import os

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _wait_for_group(pgid: int, grace_s: float) -> None:
    """Wait until no process of group `pgid` is left; SIGKILL the rest after `grace_s` seconds."""
    import os
    import signal
    import time

    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)  # raises once the group is empty
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)
