"""`nanollm register`: put a run's logged model in the MLflow Model Registry and point an alias at it.

Thin: picks the run (--run-id, or the best by a metric with --best) and calls
nanollm.tracking.register_run. The model itself is logged by evaluate with tracking.log_model:
true. Not a pipeline stage: which model serves is a decision, not a product of the data.
"""

from __future__ import annotations

import click

from stages.cli import StageContext, pass_context


@click.command("register")
@click.option("--run-id", default=None, help="The MLflow run whose model to register.")
@click.option(
    "--best",
    "metric",
    default=None,
    metavar="METRIC",
    help="Instead of --run-id: the run of tracking.experiment with a logged model and the lowest METRIC "
    "(e.g. eval/bits_per_byte).",
)
@click.option("--maximize", is_flag=True, help="With --best: the highest METRIC wins (e.g. eval/accuracy).")
@click.option("--alias", default="champion", show_default=True, help="Alias to point at the new version.")
@click.option("--name", default="nanollm", show_default=True, help="Registered model name.")
@pass_context(params_optional=True)
def command(ctx: StageContext, run_id: str | None, metric: str | None, maximize: bool, alias: str, name: str) -> None:
    """Register a run's model as a new version of --name and set --alias to it."""
    if (run_id is None) == (metric is None):
        raise click.UsageError("pass exactly one of --run-id ID and --best METRIC")
    if maximize and metric is None:
        raise click.UsageError("--maximize goes with --best METRIC")

    from nanollm.tracking.models import best_run, register_run
    from nanollm.tracking.store import tracking_uri

    cfg = ctx.config.tracking
    uri = tracking_uri(cfg, ctx.root)
    if metric is not None:
        run_id = best_run(uri, cfg.experiment, metric, maximize=maximize)
    registered = register_run(uri, run_id, name=name, alias=alias)
    click.echo(f"registered run {registered.run_id} as {registered.name} version {registered.version}")
    click.echo(registered.uri)
