"""Make docs/img/mlflow_compare.png: two real training runs that differ in train.lr, compared in MLflow.

The runs are real: a throwaway project in a temporary folder runs the real stages (`nanollm
download`, `train_tokenizer`, `tokenize`, then `pretrain` and `evaluate` once per learning rate)
at a tiny size, logging to a fresh sqlite store. Then `nanollm ui` serves that store, and headless
Chromium opens the link it prints, switched to the chart view with the charts narrowed to bits per
byte and the loss curves, and takes the screenshot. ~1 minute on 2 cores.

    .venv/bin/python docs/img/make_compare_screenshot.py                  # writes docs/img/mlflow_compare.png
    .venv/bin/python docs/img/make_compare_screenshot.py --out /tmp/x.png --keep /tmp/project

Chromium is driven over the DevTools protocol on a pipe (stdlib only): MLflow's assistant panel
opens by itself on a browser's first visit to a localhost page and covers a third of the window,
so the script marks it as already shown (`mlflow.assistant.fab.autoOpenedOnFirstLoad_v1` in
localStorage) before loading the UI. Needs Debian's `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LEARNING_RATES = (3e-3, 3e-4)  # the param the two runs differ in
TINY = {  # seconds per stage on 2 cores; the shipped params.yaml supplies everything else
    "data": {"max_bytes": 600_000, "val_fraction": 0.1},
    "tokenizer": {"vocab_size": 512},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "train": {"batch_size": 8, "max_steps": 60, "warmup_steps": 5, "log_interval": 5, "eval_interval": 10},
    "eval": {"max_tokens": 8000, "sample_tokens": 16},
}
# The charts a user compares first: the search box of the chart view takes a regular expression.
CHART_FILTER = "eval/bits_per_byte|loss/"
WINDOW = (1400, 1160)


def main() -> None:
    args = _parse()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Error: chromium is not on PATH; install it (apt-get install -y chromium)")
    with _project(args.keep) as project:
        _train_two_runs(project)
        with _nanollm_ui(project) as url:
            page = _chart_view(url)
            png = _screenshot(chromium, page, project / "browser-profile")
    args.out.write_bytes(png)
    print(f"wrote {args.out} ({len(png) / 1e3:.0f} KB) from {page}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mlflow_compare.png"))
    parser.add_argument("--keep", type=Path, help="build the project in this folder and keep it")
    return parser.parse_args()


@contextlib.contextmanager
def _project(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="nanollm-compare-") as tmp:
        yield Path(tmp)


def _params(lr: float) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["train"]["lr"] = lr
    return params


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    return env


def _nanollm(project: Path, params: str, *args: str, **env: str) -> None:
    command = [sys.executable, "-c", "from stages.cli import main; main()", "--params", params, *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env={**_env(), **env}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"Error: nanollm {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(f"nanollm {args[0]} ({params}): {time.perf_counter() - start:.0f} s", flush=True)


def _train_two_runs(project: Path) -> None:
    """The shared data once, then one model per learning rate, each pretrained and evaluated."""
    for lr in LEARNING_RATES:
        (project / f"lr{lr:g}.yaml").write_text(yaml.safe_dump(_params(lr), sort_keys=False))
    first = f"lr{LEARNING_RATES[0]:g}.yaml"
    for stage in ("download", "train_tokenizer", "tokenize"):
        _nanollm(project, first, stage)
    for lr in LEARNING_RATES:
        name = f"lr{lr:g}"
        model = f"models/{name}"
        outputs = ["--metrics", f"metrics/{name}.json", "--train-curve", f"reports/{name}_train.csv"]
        outputs += ["--val-curve", f"reports/{name}_val.csv", "--chart", f"reports/{name}.png"]
        # as `dvc exp run` does, the experiment's name prefixes the run's: lr0.003-2L64d-512v-60s
        _nanollm(project, f"{name}.yaml", "pretrain", "--out", model, *outputs, DVC_EXP_NAME=name)
        evaluate = ["--metrics", f"metrics/{name}_eval.json", "--samples", f"reports/{name}_samples.txt"]
        _nanollm(project, f"{name}.yaml", "evaluate", "--checkpoint", model, *evaluate)


@contextlib.contextmanager
def _nanollm_ui(project: Path) -> Iterator[str]:
    """`nanollm ui` on a free port; yields the URL it prints once the server answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = project / "ui.log"
    params = f"lr{LEARNING_RATES[0]:g}.yaml"  # either: tracking.* is the same in both
    command = [
        sys.executable,
        "-c",
        "from stages.cli import main; main()",
        "--params",
        params,
        "ui",
        "--port",
        str(port),
    ]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, cwd=project, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"open (http://\S+)", log.read_text())
            try:
                if found:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                    yield found.group(1)
                    return
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"Error: nanollm ui did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGTERM)  # nanollm ui stops mlflow server and its uvicorn with it
        server.wait(timeout=30)


def _chart_view(url: str) -> str:
    """The printed runs-table URL, switched to the chart view (the runs overlaid, chart by chart)."""
    base, _, fragment = url.partition("#")
    path, _, query = fragment.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    params["compareRunsMode"] = "CHART"
    return f"{base}#{path}?{urllib.parse.urlencode(params)}"


class _DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL on fds 3/4."""

    def __init__(self, chromium: str, profile: Path):
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            ["sh", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "sh", chromium, *flags],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, **params: object) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if getattr(self, "_session", None):
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise RuntimeError(f"page never satisfied: {expression}")
            time.sleep(0.25)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._commands)
        os.close(self._replies)


def _screenshot(chromium: str, page: str, profile: Path) -> bytes:
    browser = _DevTools(chromium, profile)
    try:
        width, height = WINDOW
        browser.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
        )
        origin = page.split("#")[0].rstrip("/")
        browser.call("Page.navigate", url=f"{origin}/health")  # the UI's origin, before the UI runs
        browser.wait_for("document.readyState === 'complete'")
        browser.evaluate("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        browser.call("Page.navigate", url=page)
        search = "input[placeholder='Search metric charts']"
        browser.wait_for(f"document.querySelector({json.dumps(search)}) !== null")
        browser.evaluate(_type_into(search, CHART_FILTER))
        browser.evaluate(  # the "You're viewing a shared view" banner: a user closes it once, so do we
            "document.querySelector('[data-component-id=\"mlflow.experiment_page.shared_view.dismiss\"]')?.click()"
        )
        browser.wait_for("document.querySelectorAll('.js-plotly-plot').length == 3")  # bits per byte, 2 losses
        time.sleep(2)  # plotly's transitions
        shot = browser.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])
    finally:
        browser.close()


def _type_into(selector: str, text: str) -> str:
    """JavaScript that sets a React-controlled input's value the way typing does."""
    return (
        f"(() => {{ const input = document.querySelector({json.dumps(selector)});"
        "const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;"
        f"setter.call(input, {json.dumps(text)}); input.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
    )


if __name__ == "__main__":
    main()
