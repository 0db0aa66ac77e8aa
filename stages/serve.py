"""`nanollm serve`: the trained model behind an OpenAI-compatible HTTP API, many clients decoded as one batch.

Thin: loads the checkpoint and tokenizer (from folders, or a registered model downloaded from the
tracking store), hands the model to the continuous-batching engine (nanollm.inference.engine),
and runs the protocol's app (nanollm.inference.server) under uvicorn until Ctrl+C or SIGTERM,
which let the requests in flight finish (up to _GRACE_S) before the engine closes. Not a pipeline stage.
The limits an operator sets (API key, queue, connections, request timeout) are passed through here;
what each one does is the app's and the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stages.cli import StageContext, pass_context, path_option, quantize_option

# seconds uvicorn lets the streams in flight finish at shutdown: long enough for a full-context
# completion of a small model, short enough that a stuck client does not hold a restart hostage
_GRACE_S = 10
# The waiting queue, in batches: deep enough that a burst waits for a row instead of being refused,
# shallow enough that the last in line starts within a few completions' time.
_QUEUE_BATCHES = 4
# Open connections uvicorn takes before it answers 503 itself: room for every running and waiting
# request twice over (clients that read their answer, /health and /metrics probes), and at least
# this many, since an idle keep-alive connection costs a socket and a few KB, not engine time.
_MIN_CONNECTIONS = 256


@click.command("serve")
@path_option("--checkpoint", "models/checkpoint", "Trained model to serve.", folder=None)
@path_option("--tokenizer", "data/tokenizer", "Its tokenizer folder.", folder=None)
@click.option(
    "--model-uri",
    default=None,
    help="Serve a registered model instead of --checkpoint/--tokenizer, e.g. models:/nanollm@champion; "
    "downloaded from the tracking store (tracking.uri, MLFLOW_TRACKING_URI) into a temporary folder.",
)
@click.option("--model-name", default="nanollm", show_default=True, help="The name clients pass as `model`.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind. 0.0.0.0 exposes the server to the whole network: set --api-key too.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Requests decoded together; more wait in the engine's queue.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=None,
    help=f"Requests that may wait for a batch row; one more gets 503 with Retry-After at once. "
    f"[default: {_QUEUE_BATCHES} x --max-batch]",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    help="Open connections before uvicorn answers 503 itself (to /health too). Must exceed --max-batch + "
    f"--max-queue. [default: twice that, at least {_MIN_CONNECTIONS}]",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Seconds a completion may take from its arrival, waiting included; then its batch row is freed and "
    "the client gets 504 (a stream: an error event). 0: no limit.",
)
@click.option(
    "--api-key",
    envvar="NANOLLM_API_KEY",
    show_envvar=True,
    default=None,
    help="Require `Authorization: Bearer KEY` on every /v1/ request (401 otherwise); /health and /metrics stay "
    "open. Prefer the environment variable: a command line is visible to every user of the machine.",
)
@quantize_option
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=None,
    help="Decode through a torch.compile'd step (one graph per batch bucket, compiled before the server "
    "listens: seconds to minutes with a cold compile cache, docs/serving.md). [default: on for the CPU, "
    "where it was measured, falling back to the eager step with a warning where compiling fails; off elsewhere]",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch. [default: threads in params.yaml, else one fewer than the CPUs shared among "
    "this node's nanollm processes: the event loop (HTTP, JSON, detokenizing) keeps a core of its own]",
)
@click.option(
    "--device", default=None, help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N. [default: eval.device]"
)
@pass_context(params_optional=True)
def command(
    ctx: StageContext,
    checkpoint: Path,
    tokenizer: Path,
    model_uri: str | None,
    model_name: str,
    host: str,
    port: int,
    max_batch: int,
    max_queue: int | None,
    max_connections: int | None,
    request_timeout: float,
    api_key: str | None,
    quantize: str,
    compile_: bool | None,
    threads: int | None,
    device: str | None,
) -> None:
    """Serve the model over HTTP: POST /v1/completions (OpenAI's API), GET /v1/models, GET /health, GET /metrics."""
    import contextlib
    import logging
    import tempfile

    from nanollm.hardware import pick_device
    from nanollm.inference.loading import load_for_decoding
    from nanollm.threads import apply_threads

    click_ctx = click.get_current_context()
    if model_uri is not None:
        given = [f"--{name}" for name in ("checkpoint", "tokenizer") if _explicit(click_ctx, name)]
        if given:
            raise click.UsageError(f"--model-uri names the model already; drop {' and '.join(given)}")
    if api_key is not None and not api_key.strip():
        raise click.UsageError("--api-key (or NANOLLM_API_KEY) is empty; set a key or leave it unset")
    if max_queue is None:
        max_queue = _QUEUE_BATCHES * max_batch
    if max_connections is None:
        max_connections = max(_MIN_CONNECTIONS, 2 * (max_batch + max_queue))
    elif max_connections <= max_batch + max_queue:
        raise click.UsageError(
            f"--max-connections {max_connections} leaves no connection beyond the {max_batch + max_queue} requests "
            "the engine holds (--max-batch + --max-queue), so /health and refusals could not get through; raise it"
        )
    if threads is None and ctx.config.threads is None and ctx.threads > 1:
        # The event loop works beside the engine on every token; sharing a core with torch's
        # OpenMP workers stalls their barriers whenever it runs (nanollm.threads' docstring).
        threads = ctx.threads - 1
    if threads:
        apply_threads(threads)
    cfg = ctx.config.eval
    device = pick_device(cfg.device if device is None else device, key="eval.device" if device is None else "--device")

    sock = _listen(host, port)  # first: a taken port fails before the model loads
    try:
        with contextlib.ExitStack() as downloads:
            if model_uri is not None:
                from nanollm.tracking.models import fetch_model
                from nanollm.tracking.store import tracking_uri

                folder = Path(downloads.enter_context(tempfile.TemporaryDirectory(prefix="nanollm-serve-"))) / "model"
                checkpoint, tokenizer = fetch_model(model_uri, tracking_uri(ctx.config.tracking, ctx.root), folder)
            # in memory from here on: a downloaded copy can go
            tok, model = load_for_decoding(checkpoint, tokenizer, device=device, quantize=quantize)
    except BaseException:
        sock.close()
        raise

    import uvicorn

    from nanollm.inference.server import create_app

    log = logging.getLogger(__name__)
    engine = _engine(model, tok, max_batch, max_queue, compile_, device, log)
    app = create_app(engine, tok, model_name=model_name, api_key=api_key, request_timeout=request_timeout or None)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/v1"
    log.info(
        "serving %s at %s on %s: batches of up to %d, context %d tokens, queue %d, connections %d, "
        "request timeout %s, %s (Ctrl+C stops)",
        model_name,
        url,
        device,
        max_batch,
        engine.max_seq_len,
        max_queue,
        max_connections,
        f"{request_timeout:g} s" if request_timeout else "none",
        "API key required on /v1" if api_key is not None else "no API key",  # never the key itself
    )
    config = uvicorn.Config(
        app, log_config=None, timeout_graceful_shutdown=_GRACE_S, lifespan="on", limit_concurrency=max_connections
    )
    uvicorn.Server(config).run(sockets=[sock])  # Ctrl+C: uvicorn stops, then re-raises KeyboardInterrupt


def _engine(model, tok, max_batch: int, max_queue: int, compile_: bool | None, device, log) -> Any:
    """The batching engine, its decode step compiled for every bucket before the server listens.

    compile_ None is the default: compiled on the CPU, eager elsewhere; and where compiling fails (no C++
    compiler, say) the server warns in one line and serves the eager step. An explicit --compile fails instead.
    """
    from nanollm.inference.compiled import CompileFailed
    from nanollm.inference.engine import Engine

    def make(compiled: bool) -> Engine:
        return Engine(model, max_batch=max_batch, max_queue=max_queue, stop_id=tok.eot_id, compile=compiled)

    if not (compile_ if compile_ is not None else device.type == "cpu"):
        return make(False)
    engine = None
    try:
        engine = make(True)
        log.info("compiling the decode step for batches of %s", ", ".join(map(str, engine.decoder.buckets)))
        log.info("compiled the decode step in %.1f s", engine.warmup())
        return engine
    except CompileFailed as err:
        if engine is not None:
            engine.close()
        if compile_:
            raise
        log.warning("%s: serving the eager decode step", err)
        return make(False)


def _explicit(click_ctx: click.Context, name: str) -> bool:
    return click_ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _listen(host: str, port: int) -> Any:
    """A listening socket on host:port, bound here so a taken port is a one-line error and port 0 a known one."""
    import os
    import socket

    from nanollm.errors import NanollmError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise NanollmError(
            f"cannot listen on {host}:{port} ({os.strerror(err.errno) if err.errno else err}); pick another --port or "
            "--host"
        ) from None
