"""`nanollm serve` as a child process for the serving benchmarks: started on a free port of 127.0.0.1, stopped.

Owns launching the server, waiting until it listens, draining its log so a full pipe never blocks
it, and stopping it (Ctrl+C, then a kill if it does not exit). The flags it is started with, the
clients and what is measured are each script's.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(serve_flags: list[str]) -> tuple[subprocess.Popen, str, deque[str]]:
    """`nanollm serve --port 0 <serve_flags>`; returns (process, base URL, its last log lines, kept as they come)
    once it listens, or exits the benchmark with the server's log if the server exits first."""
    command = [sys.executable, "-c", "from stages.cli import main; main()", "serve", "--port", "0", *serve_flags]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log: deque[str] = deque(maxlen=100)
    for line in server.stderr:
        log.append(line)
        if match := re.search(r"serving \S+ at (http://\S+)/v1 ", line):
            # keep reading its log (an access line per request), or a full pipe would block the server
            threading.Thread(target=log.extend, args=(server.stderr,), daemon=True).start()
            return server, match.group(1), log
    server.wait()
    sys.exit(f"nanollm serve exited with {server.returncode}:\n{''.join(log)}")


def stop_server(server: subprocess.Popen) -> None:
    """Ctrl+C, as an operator stops it (requests in flight end, the engine closes); a kill after 30 s."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
