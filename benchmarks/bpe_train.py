"""Our BPE trainer against Hugging Face `tokenizers`' BpeTrainer: wall time, compression, peak memory.

Both train on the same text (prefixes of the corpus train split, default: the stdlib corpus the
pipeline downloads) to the same vocabulary with the same special token, each run in a fresh
subprocess so that its peak RSS is its own. Ours uses the GPT-2 split regex by default because
`tokenizers`' ByteLevel pre-tokenizer uses it too (pass --pattern gpt4 for the pipeline's default).
Both use every CPU: ours a process pool for counting, theirs rayon threads. Each size runs
--repeats rounds of one run per trainer, the order alternating (ours first in even rounds,
theirs first in odd ones) so that whoever runs second does not always meet a warmer or a
busier machine; the table gives the min (the least disturbed run) and the median of each
side's wall times, and the ratios of both.

    python benchmarks/bpe_train.py                     # stdlib corpus, vocab 8192, 1 MB / 3 MB / full
    python benchmarks/bpe_train.py --corpus data/corpus --sizes 1,10,full --repeats 5
    python benchmarks/bpe_train.py --stream-copies 10  # also: ours streaming 10x the train split from disk

Prints a markdown table; targets (issue 3): ours <= 3x theirs in wall time (aim 1.5x), val
bytes/token within 1% of theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _corpus import stdlib_corpus  # benchmarks/ is on sys.path when a script runs

from nanollm.hardware import describe_machine

SPECIAL = "<|endoftext|>"
_MB = 10**6  # megabytes are 10^6 bytes, as in the pipeline's metrics


def main() -> None:
    args = _parse()
    if args.child:
        print(json.dumps(_child(args)))
        return
    try:
        import tokenizers
    except ImportError:
        sys.exit("benchmarks/bpe_train.py needs Hugging Face `tokenizers` to compare against: pip install tokenizers")
    with tempfile.TemporaryDirectory(prefix="bpe-bench-") as tmp:
        corpus = args.corpus or stdlib_corpus(Path(tmp) / "corpus")
        texts, val = _read(corpus)
        print(_header(args, corpus, texts, val, tokenizers.__version__))
        rows = []
        for label, prefix in _prefixes(texts, args.sizes):
            text_file, val_file = Path(tmp) / "train.json", Path(tmp) / "val.json"
            text_file.write_text(json.dumps(prefix))
            val_file.write_text(json.dumps(val))
            runs: dict[str, list[dict]] = {"ours": [], "tokenizers": []}
            for repeat in range(args.repeats):  # interleaved, order alternating: drifting load hits both alike
                for trainer in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
                    runs[trainer].append(_spawn(trainer, text_file, val_file, args))
            rows.append((label, sum(len(t.encode()) for t in prefix), runs))
        print(_table(rows))
        if args.stream_copies:
            print("\n" + _stream_table(texts, Path(tmp), args))
        print(f"\nload average after: {_load()}")


# ---------------------------------------------------------------------------- parent


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, help="an existing corpus folder (default: build the stdlib corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--sizes", default="1,3,full", help="train-text prefixes in MB, or 'full' (default: 1,3,full)")
    parser.add_argument(
        "--repeats", type=int, default=4, help="runs per trainer and size, order alternating; min and median shown"
    )
    parser.add_argument("--pattern", default="gpt2", choices=("gpt2", "gpt4"), help="our split regex")
    parser.add_argument(
        "--stream-copies", type=int, default=0, help="also time ours streaming this many copies of the train split"
    )
    parser.add_argument("--child", choices=("ours", "tokenizers", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--val", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def _read(corpus: Path) -> tuple[list[str], list[str]]:
    from nanollm.data.corpus import iter_documents

    return list(iter_documents(corpus, "train")), list(iter_documents(corpus, "val"))


def _prefixes(texts: list[str], sizes: str) -> list[tuple[str, list[str]]]:
    """Whole documents from the start of the train split until each size (MB) is reached."""
    out = []
    for size in sizes.split(","):
        if size == "full":
            out.append(("full", texts))
            continue
        limit, total, prefix = float(size) * _MB, 0, []
        for text in texts:
            if total >= limit:
                break
            prefix.append(text)
            total += len(text.encode())
        out.append((f"{size} MB", prefix))
    return out


def _spawn(trainer: str, text_file: Path, val_file: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", trainer, "--texts", str(text_file), "--val", str(val_file),
           "--vocab-size", str(args.vocab_size), "--pattern", args.pattern]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"the {trainer} trainer failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stream_table(texts: list[str], tmp: Path, args: argparse.Namespace) -> str:
    """Ours reading 1 and N copies of the train split from corpus folders, as the stage does: time grows
    with the text, memory with the distinct chunks only (the same in every copy)."""
    from nanollm.data.corpus import write_corpus
    from nanollm.data.sources import Document

    lines = [
        "| streamed from disk | seconds | MB/s | vocab | peak RSS MB (at start) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for copies in (1, args.stream_copies):
        folder = tmp / f"copies-{copies}"
        docs = (Document(f"{k}/{i}", text) for k in range(copies) for i, text in enumerate(texts))
        manifest = write_corpus(docs, folder, seed=0, val_fraction=0.01, shard_bytes=64 * _MB, source_description={})
        nbytes = manifest["splits"]["train"]["bytes"]
        run = _spawn("stream", folder, folder, args)
        lines.append(
            f"| {copies} x train split ({nbytes / _MB:.1f} MB) | {run['seconds']:.2f} | "
            f"{nbytes / _MB / run['seconds']:.1f} | {run['vocab_size']} | "
            f"{run['peak_rss_mb']:.0f} ({run['start_rss_mb']:.0f}); "
            f"counting workers {run['workers_peak_rss_mb']:.0f} each |"
        )
    return "\n".join(lines)


def _header(args: argparse.Namespace, corpus: Path, texts: list[str], val: list[str], hf_version: str) -> str:
    import tiktoken

    train_mb = sum(len(t.encode()) for t in texts) / _MB
    val_mb = sum(len(t.encode()) for t in val) / _MB
    return (
        f"command: python benchmarks/bpe_train.py {' '.join(sys.argv[1:])}\n"
        f"machine: {describe_machine()}, Python "
        f"{platform.python_version()}, tokenizers {hf_version}, tiktoken {tiktoken.__version__}; "
        f"load average before: {_load()}\n"
        f"corpus: {corpus if args.corpus else 'stdlib (built in a temp dir)'}: train {train_mb:.2f} MB, "
        f"val {val_mb:.2f} MB; vocab {args.vocab_size} incl. 256 bytes and {SPECIAL}; our split regex: "
        f"{args.pattern}; min and median of {args.repeats} runs each, ours first in even rounds\n"
    )


def _table(rows: list[tuple[str, int, dict[str, list[dict]]]]) -> str:
    lines = [
        "| train text | trainer | wall s, min | wall s, median | ours / theirs, min | ours / theirs, median "
        "| MB/s (median) | vocab | val bytes/token | ours / theirs | learned tokens in theirs (at the same rank) "
        "| peak RSS MB (at start) | phases (median run) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for label, nbytes, runs in rows:
        fastest = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
        wall = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        bpt = {k: v[0]["val_bytes_per_token"] for k, v in runs.items()}  # deterministic: equal in every run
        ratios = {
            "ours": (
                f"{fastest['ours'] / fastest['tokenizers']:.2f}x",
                f"{wall['ours'] / wall['tokenizers']:.2f}x",
                f"{bpt['ours'] / bpt['tokenizers'] - 1:+.2%}",
            )
        }
        ours, theirs = runs["ours"][0]["tokens"], runs["tokenizers"][0]["tokens"]  # deterministic too
        same_rank = sum(a == b for a, b in zip(ours, theirs, strict=False))
        shared = {"ours": f"{len(set(ours) & set(theirs))} of {len(ours)} ({same_rank})"}
        for trainer, results in runs.items():
            peak = max(r["peak_rss_mb"] for r in results)
            start = min(r["start_rss_mb"] for r in results)
            workers = max(r["workers_peak_rss_mb"] for r in results)
            memory = f"{peak:.0f} ({start:.0f})" + (f"; counting workers {workers:.0f} each" if workers else "")
            min_ratio, median_ratio, bpt_ratio = ratios.get(trainer, ("", "", ""))
            median_run = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
            lines.append(
                f"| {label} ({nbytes / _MB:.2f} MB) | {trainer} | {fastest[trainer]:.2f} | {wall[trainer]:.2f} | "
                f"{min_ratio} | {median_ratio} | {nbytes / _MB / wall[trainer]:.1f} | {results[0]['vocab_size']} | "
                f"{bpt[trainer]:.4f} | {bpt_ratio} | {shared.get(trainer, '')} | {memory} | {median_run['phases']} |"
            )
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------- child


@dataclass
class _Trained:
    seconds: float
    vocab_size: int
    count_tokens: Callable[[list[str]], int]  # tokens of a batch of texts
    tokens: list[bytes]  # the learned (merged) tokens, in rank order
    phases: str = ""


def _child(args: argparse.Namespace) -> dict:
    if args.child == "stream":
        return _child_stream(args.texts, args.vocab_size, args.pattern)
    texts = json.loads(args.texts.read_text())
    val = json.loads(args.val.read_text())
    if args.child == "ours":
        import nanollm.tokenizer  # noqa: F401  (so the start RSS holds the libraries and the text)
    else:
        import tokenizers  # noqa: F401
    start_rss = _rss_mb()
    train = _train_ours if args.child == "ours" else _train_tokenizers
    trained = train(texts, args.vocab_size, args.pattern)
    val_bytes = sum(len(t.encode()) for t in val)
    return {
        "seconds": trained.seconds,
        "phases": trained.phases,
        "vocab_size": trained.vocab_size,
        "tokens": [token.hex() for token in trained.tokens],
        "val_bytes_per_token": val_bytes / trained.count_tokens(val),
        "start_rss_mb": start_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _child_stream(corpus: Path, vocab_size: int, pattern_name: str) -> dict:
    from nanollm.data.corpus import iter_documents
    from nanollm.tokenizer import SPLIT_PATTERNS, train_bpe

    start_rss = _rss_mb()
    start = time.perf_counter()
    merges = train_bpe(
        iter_documents(corpus, "train"), vocab_size - 256 - 1, SPLIT_PATTERNS[pattern_name], progress=False
    )
    return {
        "seconds": time.perf_counter() - start,
        "vocab_size": 256 + len(merges) + 1,
        "start_rss_mb": start_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _train_ours(texts: list[str], vocab_size: int, pattern_name: str) -> _Trained:
    from nanollm.tokenizer import SPLIT_PATTERNS, bpe, load_tokenizer, save_bpe

    pattern = SPLIT_PATTERNS[pattern_name]
    start = time.perf_counter()  # train_bpe's two phases, timed apart
    chunks = bpe.count_chunks(texts, pattern)
    counted = time.perf_counter()
    merges = bpe.learn_merges(chunks, vocab_size - 256 - 1)
    end = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bpe-ours-") as folder:  # the file round trip, as the stage's; gone after
        save_bpe(Path(folder) / "tokenizer.json", merges, pattern_name, pattern, [SPECIAL])
        tok = load_tokenizer(folder)  # read whole: the folder is not needed past here
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    return _Trained(
        seconds=end - start,
        vocab_size=tok.vocab_size,
        count_tokens=lambda batch: sum(map(len, tok.encode_batch(batch))),
        tokens=tokens[256:],
        phases=f"count {counted - start:.2f} s ({len(chunks) / 1000:.0f}k distinct chunks) "
        f"+ merge {end - counted:.2f} s",
    )


def _train_tokenizers(texts: list[str], vocab_size: int, pattern_name: str) -> _Trained:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, as ours has
        show_progress=False,
    )
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - start
    merges = json.loads(tok.to_str())["model"]["merges"]  # [[a, b], ...] (older versions: ["a b", ...])
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    to_byte = _byte_level_decoder()
    return _Trained(
        seconds=seconds,
        vocab_size=tok.get_vocab_size(),
        count_tokens=lambda batch: sum(len(e.ids) for e in tok.encode_batch(batch)),
        tokens=[bytes(to_byte[c] for c in a + b) for a, b in pairs],
    )


def _byte_level_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in character -> byte (GPT-2's bytes_to_unicode, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


if __name__ == "__main__":
    main()
