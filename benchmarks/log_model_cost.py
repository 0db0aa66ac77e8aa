"""What `tracking.log_model` costs a run: the seconds evaluate spends logging the model, and the bytes it adds.

Logs the given checkpoint and tokenizer as an MLflow model, as the evaluate stage does
(nanollm.tracking.models.log_model: weights, architecture, tokenizer, sampling defaults and a
copy of the nanollm package, plus the input example MLflow runs once through the loaded
model), into a fresh sqlite store in a temporary folder, --repeats times, each into a run of
its own. Prints the median and range of the seconds, the bytes each logged model adds to the
artifact folder (by part: weights, code, the rest) and to mlflow.db.

    python benchmarks/log_model_cost.py                       # models/checkpoint + data/tokenizer (after dvc repro)
    python benchmarks/log_model_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer/tokenizer.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from nanollm.config import EvalConfig, TrackingConfig
    from nanollm.hardware import describe_machine
    from nanollm.tracking.models import log_model
    from nanollm.tracking.runs import make_tracker

    tokenizer = args.tokenizer if args.tokenizer.is_file() else args.tokenizer / "tokenizer.json"
    print(f"command: python {' '.join(sys.argv)}")
    machine = describe_machine(torch.device("cpu"))
    print(f"machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    seconds, model_bytes = [], []
    with tempfile.TemporaryDirectory(prefix="nanollm-log-model-") as tmp:
        root = Path(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        make_tracker(TrackingConfig(), root)  # the store and experiment exist before the first timing
        db_before = (root / "mlflow.db").stat().st_size
        for i in range(args.repeats):
            tracker = make_tracker(TrackingConfig(), root)
            tracker.start(run_name=f"log-model-{i}")
            artifacts_before = folder_bytes(root / "mlartifacts") if (root / "mlartifacts").exists() else 0
            start = time.perf_counter()
            model_id = log_model(tracker, args.checkpoint, tokenizer, sampling=EvalConfig(), seed=0)
            seconds.append(time.perf_counter() - start)
            tracker.end()
            if model_id is None:
                raise SystemExit("logging failed (see the warning above)")
            model_bytes.append(folder_bytes(root / "mlartifacts") - artifacts_before)
        logged = next((root / "mlartifacts").rglob("MLmodel")).parent
        weights = folder_bytes(logged / "data")
        code = folder_bytes(logged / "code")
        db_per_model = ((root / "mlflow.db").stat().st_size - db_before) / args.repeats

    print()
    print("| what | per logged model |")
    print("| --- | ---: |")
    print(f"| time (median of {args.repeats}; min-max) | {statistics.median(seconds):.2f} s "
          f"({min(seconds):.2f}-{max(seconds):.2f}) |")  # fmt: skip
    print(f"| artifacts | {statistics.median(model_bytes) / 1e6:.2f} MB |")
    print(f"| of which checkpoint + tokenizer + sampling (data/) | {weights / 1e6:.2f} MB |")
    print(f"| of which nanollm's code (code/) | {code / 1e6:.2f} MB |")
    print(f"| mlflow.db growth (run, model, params rows) | {db_per_model / 1e3:.0f} KB |")


if __name__ == "__main__":
    main()
