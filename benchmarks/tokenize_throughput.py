"""The tokenize stage's end-to-end throughput against raw tiktoken, on the same text and threads.

"Ours" is what `nanollm tokenize` runs: `encode_documents` + `write_tokens` (text in, uint16
memmap and meta.json written). "Raw" is one `encoding.encode_ordinary_batch(texts, num_threads)`
call over the same list of texts, which writes nothing. A third row times ours reading the
texts from the corpus folder (JSONL parsing and the sha256 check included), as the stage does.

    python benchmarks/tokenize_throughput.py                 # stdlib corpus, vocab-8192 BPE, all CPUs
    python benchmarks/tokenize_throughput.py --corpus data/corpus --tokenizer data/tokenizer --threads 2

Prints a markdown table; target (issue 3): ours >= 0.90x raw.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _corpus import stdlib_corpus  # benchmarks/ is on sys.path when a script runs

from nanollm.hardware import describe_machine

_MB = 10**6  # megabytes are 10^6 bytes, as in the pipeline's metrics


def main() -> None:
    args = _parse()
    import tiktoken

    from nanollm.config import TokenizerConfig
    from nanollm.data.corpus import iter_documents
    from nanollm.tokenizer import create_tokenizer, load_tokenizer

    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        corpus = args.corpus or stdlib_corpus(Path(tmp) / "corpus")
        texts = list(iter_documents(corpus, "train"))
        mb = sum(len(t.encode()) for t in texts) / _MB
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        else:
            config = TokenizerConfig(vocab_size=args.vocab_size)
            tok = create_tokenizer(config, texts, Path(tmp) / "tok", progress=False)
        print(
            f"command: python benchmarks/tokenize_throughput.py {' '.join(sys.argv[1:])}\n"
            f"machine: {describe_machine()}, Python {platform.python_version()}, "
            f"tiktoken {tiktoken.__version__}; load average before: {_load()}\n"
            f"text: {corpus if args.corpus else 'stdlib corpus'} train split, {len(texts)} documents, {mb:.2f} MB; "
            f"tokenizer: {tok.encoding.name}; {threads} threads; median of {args.repeats} runs\n"
        )
        out = Path(tmp) / "tokens"
        encode_batch = tok.encoding.encode_ordinary_batch
        cases: dict[str, Callable[[], object]] = {
            "raw tiktoken encode_ordinary_batch": lambda: encode_batch(texts, num_threads=threads),
            "ours: encode_documents + write_tokens": lambda: _write(tok, texts, out, threads),
            "ours, reading the corpus folder": lambda: _write(tok, iter_documents(corpus, "train"), out, threads),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every case alike
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    raw = statistics.median(times["raw tiktoken encode_ordinary_batch"])
    print("| path | median s | MB/s | vs raw |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in times.items():
        seconds = statistics.median(runs)
        print(f"| {name} | {seconds:.3f} | {mb / seconds:.1f} | {raw / seconds:.2f}x |")
    print(f"\nload average after: {_load()}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, help="an existing corpus folder (default: build the stdlib corpus)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: train a BPE on the text)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocab of that BPE (without --tokenizer)")
    parser.add_argument("--threads", type=int, help="encoder threads for both paths (default: all CPUs)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path; the median is shown")
    return parser.parse_args()


def _write(tok, texts, out: Path, threads: int) -> None:
    from nanollm.data.tokens import encode_documents, write_tokens

    write_tokens(
        out,
        {"train": encode_documents(tok, texts, num_threads=threads)},
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        tokenizer_sha256=tok.sha256,
        corpus_sha256="benchmark",
        progress=False,
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
