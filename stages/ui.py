"""`nanollm ui`: the MLflow UI over this project's store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import click

from stages.cli import StageContext, pass_context


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 exposes it.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@pass_context
def command(ctx: StageContext, host: str, port: int) -> None:
    """Browse and compare the project's MLflow runs (one per trained model)."""
    import subprocess

    from nanollm.tracking import tracking_uri, ui_command, ui_environment

    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    click.echo(f"MLflow UI over {tracking_uri(ctx.config.tracking, ctx.root)}", err=True)
    click.echo(f"open http://{shown}:{port} (Ctrl+C stops it)", err=True)
    try:
        done = subprocess.run(ui_command(ctx.config.tracking, ctx.root, host=host, port=port), env=ui_environment())
    except KeyboardInterrupt:
        return
    raise SystemExit(done.returncode)
