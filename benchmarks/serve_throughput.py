"""Serving throughput: `nanollm serve`'s tokens/s with one request at a time against many concurrent clients.

The server is `nanollm serve` in a process of its own, so its engine thread and event loop share
no GIL with the clients. The clients are threads here speaking plain HTTP/1.1 (http.client and a
few lines of server-sent-event parsing): lighter than the openai client, so that on a small
machine the load measures the server. Every request is greedy with the same max_tokens, its
prompt taken in turn from a list of code openings; tokens/s is the completion tokens the server
reports (usage) over the wall time of a phase, so a request that ends at <|endoftext|> counts
only what it drew (the table shows tokens per request). The phases:

  batch 1      --sequential requests one at a time: the engine decodes a batch of one
  concurrent   --requests requests from --concurrency clients at once, whole responses
  streamed     the same with stream=true, and the median time to the first text

Each round runs the three, batch 1 first in even rounds and last in odd ones; a figure is the
median over --rounds. The server decodes batches of up to --concurrency.

    python benchmarks/serve_throughput.py                       # models/checkpoint, data/tokenizer
    python benchmarks/serve_throughput.py --threads 1 --rounds 3
    python benchmarks/serve_throughput.py --no-compile          # the eager decode step

Targets: 16 concurrent clients >= 6x the tokens/s of batch 1 (issue 13), >= 10x with the compiled
step (issue 19).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _server import start_server, stop_server  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"
PROMPTS = ["import ", "def main():\n", "class Parser:\n    def ", "    return ", "for i in range(", "if __name__",
           "from typing import ", "    def __init__(self", "try:\n    ", "with open(", "x = [", "raise ValueError(",
           "@property\ndef ", "print(f\"", "while True:\n", "async def "]  # fmt: skip


def serve_flags(args: argparse.Namespace) -> list[str]:
    """The flags of `nanollm serve` for this race: a batch as wide as the concurrent clients."""
    flags = ["--checkpoint", str(args.checkpoint), "--tokenizer", str(args.tokenizer), "--model-name", MODEL,
             "--max-batch", str(args.concurrency)]  # fmt: skip
    for flag in ("threads", "device", "quantize"):
        if getattr(args, flag) is not None:
            flags += [f"--{flag}", str(getattr(args, flag))]
    if args.compile is not None:
        flags.append("--compile" if args.compile else "--no-compile")
    return flags


def complete(url: str, prompt: str, max_tokens: int, stream: bool) -> tuple[int, float | None]:
    """One greedy completion: (completion tokens, seconds to the first text when streamed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        if not stream:
            return json.loads(response.read())["usage"]["completion_tokens"], None
        first, tokens = None, None
        for line in response:
            data = line.removeprefix(b"data: ").strip()
            if not line.startswith(b"data: ") or data == b"[DONE]":
                continue
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return tokens, first
    finally:
        conn.close()


def run_phase(url: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict[str, float]:
    """`requests` completions from `clients` threads at once: tokens, seconds, tokens/s, median first-text time."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        done = list(pool.map(lambda p: complete(url, p, max_tokens, stream), prompts))
        seconds = time.perf_counter() - start
    tokens = sum(n for n, _ in done)
    firsts = [t for _, t in done if t is not None]
    first = statistics.median(firsts) if firsts else float("nan")
    return {"tokens": tokens, "seconds": seconds, "rate": tokens / seconds, "first": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models/checkpoint")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizer")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once (and the server's --max-batch)")
    parser.add_argument("--requests", type=int, default=32, help="requests in each concurrent phase")
    parser.add_argument("--sequential", type=int, default=8, help="requests in the batch-1 phase")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads [nanollm's default]")
    parser.add_argument("--device", default=None, help="the server's device [eval.device]")
    parser.add_argument("--quantize", choices=["none", "int8"], default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's compiled decode step [nanollm serve's default: on for the CPU]")  # fmt: skip
    args = parser.parse_args()
    for path in (args.checkpoint, args.tokenizer):
        if not path.exists():
            sys.exit(f"{path} is missing: run `dvc repro pretrain` first, or pass --checkpoint and --tokenizer")

    from nanollm.checkpoint import read_checkpoint_info
    from nanollm.hardware import describe_machine

    model = read_checkpoint_info(args.checkpoint)
    shape = f"{model['model']['n_layer']}L/{model['model']['n_embd']}d/{model['vocab_size']}v"
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}; load average before: {_load()}")
    started = time.perf_counter()
    server, url, log = start_server(serve_flags(args))
    startup = time.perf_counter() - started
    compiled = [
        line.split("compiled the decode step in ")[1].strip() for line in log if "compiled the decode step in" in line
    ]
    print(f"server: listening {startup:.1f} s after its start"
          + (f", of which compiling the decode step {compiled[0]}" if compiled else ", no compiled step"))  # fmt: skip
    try:
        complete(url, PROMPTS[0], 8, stream=False)  # warm-up: the first request pays for lazy initialisation
        print(f"server: nanollm serve at {url}, model {args.checkpoint} ({shape}), batches of up to {args.concurrency}")
        phases = {
            "batch 1 (one at a time)": (1, args.sequential, False),
            "concurrent, whole": (args.concurrency, args.requests, False),
            "concurrent, streamed": (args.concurrency, args.requests, True),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
        for r in range(args.rounds):
            for name in list(phases) if r % 2 == 0 else list(phases)[::-1]:
                clients, requests, stream = phases[name]
                results[name].append(run_phase(url, clients, requests, args.max_tokens, stream))
    except Exception:
        print("".join(log), file=sys.stderr)
        raise
    finally:
        stop_server(server)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in results[name])

    base = median("batch 1 (one at a time)", "rate")
    print(f"\ngreedy, max_tokens {args.max_tokens}; tokens/s: completion tokens over the phase's wall time, "
          f"median of {args.rounds} round(s)\n")  # fmt: skip
    print("| mode | clients | requests | tokens/request | tokens/s | vs batch 1 | first text, median |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (clients, requests, stream) in phases.items():
        rate = median(name, "rate")
        per_request = median(name, "tokens") / requests
        first = f"{median(name, 'first') * 1000:.0f} ms" if stream else "-"
        print(f"| {name} | {clients} | {requests} | {per_request:.1f} | {rate:,.0f} | {rate / base:.2f}x | {first} |")
    ratio = median("concurrent, whole", "rate") / base
    print(f"\n{args.concurrency} concurrent clients: {ratio:.2f}x the tokens/s of batch 1 (target >= 6x)")
    print(f"load average after: {_load()}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
