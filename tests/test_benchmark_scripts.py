"""Every script under benchmarks/ runs end to end at smoke size (seconds each), so none rots between measurements.

The figures of these runs mean nothing (tiny shapes on a shared machine); what is checked is that
each script still runs, prints the tables the docs quote in their shape, and that its figures are
positive numbers. test_every_benchmark_script_has_a_smoke_test fails for a script added without one.
"""

import importlib
import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tool_env

from nanollm.inference.native import int8_gemm

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SMOKE_TESTED: set[str] = set()  # benchmarks/ files some test below runs (a helper module through its script)


def smoke(*scripts: str):
    """Mark a test as the smoke run of these benchmarks/ files."""
    SMOKE_TESTED.update(scripts)
    return lambda test: test


def _run(script: str, *args: str, timeout: int = 300) -> str:
    command = [sys.executable, f"benchmarks/{script}", *args]
    done = subprocess.run(command, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table(stdout: str, first_columns: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the markdown table whose header starts with `first_columns` ('a' or 'a | b')."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {first_columns} |")), None)
    assert start is not None, f"no table starting with {first_columns!r} in:\n{stdout}"
    assert set(lines[start + 1].replace("|", "").split()) <= {"---", "---:"}  # the separator row
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(cells)
    return header, rows


def _number(cell: str) -> float:
    """The first number in a cell: '1,479' -> 1479, 'x5.05' -> 5.05, '0.93x' -> 0.93, '12.6 GB/s (38%)' -> 12.6."""
    match = re.search(r"\d[\d,]*(\.\d+)?", cell)
    assert match, f"no number in {cell!r}"
    return float(match.group().replace(",", ""))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A corpus folder of 40 short code-like documents (some non-ASCII), ~50 KB."""
    from nanollm.data.corpus import write_corpus
    from nanollm.data.sources import Document

    rng = random.Random(0)
    words = [
        "def",
        "return",
        "self",
        "import",
        "class",
        "for",
        "in",
        "if",
        "    ",
        "\n",
        "x",
        "=",
        "(",
        "):",
        "12",
        "é",
    ]
    docs = (Document(f"d{i}", " ".join(rng.choice(words) for _ in range(400))) for i in range(40))
    folder = tmp_path_factory.mktemp("bench") / "corpus"
    write_corpus(docs, folder, seed=0, val_fraction=0.2, shard_bytes=10**6, source_description={})
    return folder


def _import_script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when the script runs: its helpers are importable
    return importlib.import_module(name)


# ---------------------------------------------------------------------------- the scripts


@smoke("bpe_train.py", "_corpus.py")
def test_bpe_train_on_the_default_corpus_reports_min_and_median_of_both_trainers():
    out = _run("bpe_train.py", "--sizes", "0.02", "--vocab-size", "300", "--repeats", "2")
    assert "corpus: stdlib (built in a temp dir)" in out  # _corpus.stdlib_corpus built it
    assert "min and median of 2 runs each, ours first in even rounds" in out
    header, rows = _table(out, "train text")
    assert header[2:6] == ["wall s, min", "wall s, median", "ours / theirs, min", "ours / theirs, median"]
    assert [r[1] for r in rows] == ["ours", "tokenizers"]
    for r in rows:
        fastest, median = _number(r[2]), _number(r[3])
        assert 0 < fastest <= median and _number(r[6]) > 0 and r[7] == "300" and _number(r[8]) > 1
    assert _number(rows[0][4]) > 0 and _number(rows[0][5]) > 0


@smoke("bpe_train.py")
def test_bpe_train_on_a_corpus_folder_with_streaming(tiny_corpus):
    args = ["--corpus", str(tiny_corpus), "--sizes", "0.01,full", "--vocab-size", "300", "--repeats", "2"]
    out = _run("bpe_train.py", *args, "--stream-copies", "2")
    _, rows = _table(out, "train text")
    assert [(r[0].split(" (")[0], r[1]) for r in rows] == [
        ("0.01 MB", "ours"),
        ("0.01 MB", "tokenizers"),
        ("full", "ours"),
        ("full", "tokenizers"),
    ]
    _, streamed = _table(out, "streamed from disk")
    assert [r[0].split(" (")[0] for r in streamed] == ["1 x train split", "2 x train split"]
    assert all(_number(r[1]) > 0 and r[3] == "300" for r in streamed)


def test_bpe_train_alternates_which_trainer_runs_first(tiny_corpus, monkeypatch):
    bpe_train = _import_script("bpe_train", monkeypatch)
    order = []

    def fake(trainer, text_file, val_file, args):
        order.append(trainer)
        return {"seconds": 1.0, "vocab_size": 300, "val_bytes_per_token": 3.0, "tokens": ["61"], "phases": "",
                "start_rss_mb": 1.0, "peak_rss_mb": 2.0, "workers_peak_rss_mb": 0.0}  # fmt: skip

    monkeypatch.setattr(bpe_train, "_spawn", fake)
    argv = ["bpe_train.py", "--corpus", str(tiny_corpus), "--sizes", "full", "--repeats", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    bpe_train.main()
    assert order == ["ours", "tokenizers", "tokenizers", "ours"] * 2


@smoke("tokenize_throughput.py")
def test_tokenize_throughput_times_the_stage_path_against_raw_tiktoken(tiny_corpus):
    args = ["--corpus", str(tiny_corpus), "--vocab-size", "300", "--repeats", "2", "--threads", "1"]
    out = _run("tokenize_throughput.py", *args)
    header, rows = _table(out, "path")
    assert header == ["path", "median s", "MB/s", "vs raw"]
    assert [r[0] for r in rows] == [
        "raw tiktoken encode_ordinary_batch",
        "ours: encode_documents + write_tokens",
        "ours, reading the corpus folder",
    ]
    assert rows[0][3] == "1.00x" and all(_number(c) > 0 for r in rows for c in r[1:])


@smoke("decode_vs_transformers.py")
def test_decode_vs_transformers_races_every_setting_and_compares_with_the_fastest(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\ntokenizer: {vocab_size: 300}\n")
    args = ["--params", str(params), "--reference", "none", "--points", "4+3,6+2", "--repeats", "2"]
    out = _run("decode_vs_transformers.py", *args, "--uncached-repeats", "2", "--copy-mb", "16", "--threads", "1")
    header, rows = _table(out, "model")
    assert header[2:11] == [
        "transformers dynamic cache",
        "transformers static cache",
        "transformers compiled cache",
        "peer",
        "ours cached",
        "ours / peer",
        "ours compiled",
        "compiled / ours cached",
        "compiled / peer",
    ]
    assert [(r[0], r[1]) for r in rows] == [("pipeline 1L/32d/300v", "4 + 3"), ("pipeline 1L/32d/300v", "6 + 2")]
    for r in rows:
        theirs = {"dynamic": _number(r[2]), "static": _number(r[3]), "compiled": _number(r[4])}
        ours, compiled = _number(r[6]), _number(r[8])
        assert min(*theirs.values(), ours, compiled, _number(r[11]), _number(r[12])) > 0
        assert theirs[r[5]] == max(theirs.values())  # printed rounded: a tie may name either
        assert _number(r[7]) == pytest.approx(ours / max(theirs.values()), rel=0.05, abs=0.01)
        assert _number(r[9]) == pytest.approx(compiled / ours, rel=0.05, abs=0.01)
        assert _number(r[10]) == pytest.approx(compiled / max(theirs.values()), rel=0.05, abs=0.01)
        # same weights, same greedy tokens, on every path
        assert r[15] == "dynamic: identical; static: identical; compiled: identical; ours compiled: identical"
    header, bandwidth = _table(out, "model | weights read per token (MB)")
    assert header[2:] == ["ours: GB/s (share of copy)", "peer: GB/s (share)"]
    assert len(bandwidth) == 1 and _number(bandwidth[0][1]) > 0  # MB per token; GB/s may print 0.0 this small
    assert all(re.fullmatch(r"[\d.]+ \(\d+%\)", c) for c in bandwidth[0][2:])
    assert "note:" not in out


def test_decode_vs_transformers_alternates_which_side_runs_first(monkeypatch):
    import argparse

    script = _import_script("decode_vs_transformers", monkeypatch)
    order = []
    calls = {key: (lambda p, n, key=key: order.append(key) or [0] * n) for key in (*script.CACHED, *script.UNCACHED)}
    args = argparse.Namespace(repeats=3, uncached_repeats=2, warmup=0)
    medians, _ = script.run_point(calls, None, 4, args)
    timed = order[len(script.UNCACHED) :]  # after the short uncached warm-up
    ours_first = ["ours_cached", "ours_compiled", "ours_uncached"]
    ours_first += ["hf_dynamic", "hf_static", "hf_compiled", "hf_uncached"]
    cached_only = [k for k in ours_first if k not in script.UNCACHED]
    assert timed == ours_first + ours_first[::-1] + cached_only
    assert all(rate > 0 for rate in medians.values())


@smoke("weight_layout.py")
def test_weight_layout_times_every_layout_of_the_real_pack_for_decode():
    out = _run("weight_layout.py", "--layers", "1", "--width", "32", "--heads", "2", "--vocab", "100", "--rounds", "1",
               "--steps", "2", "--threads", "1")  # fmt: skip
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) ms \| ([\d.]+) GB/s \|$", out, flags=re.M)
    assert [r[0].split(" ")[0] for r in rows] == ["nn.Linear", "column-major,", "decode", "sum()"], out
    assert all(float(ms) > 0 for _, ms, _ in rows)


@smoke("flash_attention.py")
def test_flash_attention_reports_time_and_peak_memory_of_each_method():
    out = _run("flash_attention.py", "--seq-len", "64", "256", "--heads", "1", "--head-dim", "16", "--repeats", "1",
               "--threads", "1")  # fmt: skip
    header, rows = _table(out, "T")
    assert header[1:4] == ["method", "forward ms", "forward peak MB"]
    assert [(r[0], r[1]) for r in rows] == [(t, m) for t in ("64", "256") for m in ("naive", "flash (ours)", "sdpa")]
    assert all(_number(r[2]) >= 0 and _number(r[4]) > 0 for r in rows)
    assert all(_number(r[3]) > 0 for r in rows if r[:2] == ["256", "naive"])  # its T x T matrices: 0.3 MB
    assert len(re.findall(r"^T=\d+: flash peak memory is at most [\d.]+ of naive's", out, flags=re.M)) == 2


@smoke("train_throughput.py")
def test_train_throughput_trains_ours_and_the_peer_with_the_same_step():
    tiny = "--layers 1 --width 32 --heads 2 --vocab 100 --batch 2 --seq 16 --steps 1 --warmup 1 --rounds 2 --threads 1"
    out = _run("train_throughput.py", *tiny.split())
    _, rows = _table(out, "model")
    assert [r[0] for r in rows] == ["nanollm Transformer", "transformers LlamaForCausalLM (sdpa)"]
    assert all(_number(r[1]) > 0 and _number(r[3]) > 0 for r in rows)
    assert re.search(r"ours / peer, median of per-round ratios: [\d.]+x", out)


@smoke("pretrain_mfu.py")
def test_pretrain_mfu_runs_the_pretrain_loop_and_reports_mfu():
    tiny = "--layers 2 --width 64 --heads 2 --seq 32 --batch 2 --grad-accum 2 --vocab 300 --steps 4"
    out = _run("pretrain_mfu.py", "--device", "cpu", "--no-compile", *tiny.split())
    assert "model: 2 layers x 64 wide, 2 heads, context 32, vocab 300" in out
    assert "2 x grad_accum 2 = 128 tokens per step" in out
    match = re.search(r"tokens/s: ([\d,]+)\s+MFU: ([\d.]+)%", out)
    assert match and float(match.group(1).replace(",", "")) > 0 and float(match.group(2)) > 0, out


def test_pretrain_mfu_races_dtypes_and_says_what_auto_picked():
    tiny = "--layers 1 --width 32 --heads 2 --seq 16 --batch 2 --vocab 300 --steps 3 --rounds 2"
    out = _run("pretrain_mfu.py", "--preset", "params.yaml", "--device", "cpu", "--no-compile",
               "--dtype", "auto,float32,bfloat16", *tiny.split())  # fmt: skip
    rows = re.findall(r"^\| (auto|float32|bfloat16) \| (float32|bfloat16) \| ([\d,]+) \|", out, flags=re.M)
    assert [r[0] for r in rows] == ["auto", "float32", "bfloat16"], out
    assert rows[1][1] == "float32" and rows[2][1] == "bfloat16" and all(float(r[2].replace(",", "")) > 0 for r in rows)
    match = re.search(r"^auto picked (\w+) \((auto: .+)\): x([\d.]+) the tokens/s of the fastest explicit", out, re.M)
    assert match and match.group(1) == rows[0][1], out
    assert re.search(r"^machine: .+; cpu, \d+ threads", out, flags=re.M), out


@smoke("split_leaks.py")
def test_split_leaks_scores_both_splits_against_exact_near_copies():
    out = _run("split_leaks.py", "--max-documents", "120", "--seeds", "3", "--thresholds", "0.5,0.8")
    rows = re.findall(
        r"^\| (each document by its id|by near-duplicate family, J >= [\d.]+) \| .+ \| (\d+) \|$", out, re.M
    )
    assert [r[0] for r in rows] == [
        "each document by its id", "by near-duplicate family, J >= 0.5", "by near-duplicate family, J >= 0.8"
    ], out  # fmt: skip
    assert re.search(r"corpus: stdlib, 120 documents; \d+ pairs with exact Jaccard >= 0.5", out), out


def _tiny_checkpoint(tmp_path: Path) -> None:
    """tmp_path/ckpt (1 layer, 32 wide, seeded weights) and its tokenizer tmp_path/tok (300 tokens)."""
    from nanollm.checkpoint import save_checkpoint, seeded_model
    from nanollm.config import ModelConfig, TokenizerConfig
    from nanollm.tokenizer import create_tokenizer

    tok = create_tokenizer(TokenizerConfig(vocab_size=300), ["def f(x):\n    return x\n"] * 4, tmp_path / "tok",
                           progress=False)  # fmt: skip
    model = seeded_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64), tok.vocab_size, seed=0)
    save_checkpoint(tmp_path / "ckpt", model, train_state={"step": 1, "tokens_seen": 0},
                    info={"tokenizer_sha256": tok.sha256})  # fmt: skip


@smoke("serve_throughput.py", "_server.py")
def test_serve_throughput_races_batch_1_against_concurrent_clients_of_nanollm_serve(tmp_path):
    _tiny_checkpoint(tmp_path)
    out = _run("serve_throughput.py", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"),
               "--max-tokens", "4", "--sequential", "2", "--requests", "4", "--concurrency", "2", "--rounds", "1",
               "--threads", "1")  # fmt: skip
    assert re.search(r"^machine: .+; load average before: [\d. ]+$", out, flags=re.M), out
    header, rows = _table(out, "mode")
    assert header[1:] == ["clients", "requests", "tokens/request", "tokens/s", "vs batch 1", "first text, median"]
    assert [r[:3] for r in rows] == [["batch 1 (one at a time)", "1", "2"], ["concurrent, whole", "2", "4"],
                                     ["concurrent, streamed", "2", "4"]]  # fmt: skip
    assert all(0 < _number(r[3]) <= 4 and _number(r[4]) > 0 and _number(r[5]) > 0 for r in rows)
    assert rows[0][5] == "1.00x" and rows[0][6] == "-" and _number(rows[2][6]) > 0
    assert re.search(r"^2 concurrent clients: [\d.]+x the tokens/s of batch 1", out, flags=re.M), out


@smoke("log_model_cost.py")
def test_log_model_cost_logs_the_model_as_evaluate_does_and_reports_its_time_and_size(tmp_path):
    _tiny_checkpoint(tmp_path)
    out = _run("log_model_cost.py", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"),
               "--repeats", "2")  # fmt: skip
    header, rows = _table(out, "what")
    values = {r[0]: r[1] for r in rows}
    weights = (tmp_path / "ckpt" / "model.pt").stat().st_size / 1e6
    assert _number(values["of which checkpoint + tokenizer + sampling (data/)"]) >= weights
    assert 0.05 < _number(values["of which nanollm's code (code/)"]) < 5  # the package's sources, no caches
    assert _number(values["time (median of 2; min-max)"]) > 0 and _number(values["artifacts"]) > weights


@smoke("serve_flood.py")
def test_serve_flood_runs_on_a_fresh_model_when_no_trained_one_exists(tmp_path):
    """Smoke size, no --checkpoint: the fresh-model path. tests/test_serve.py runs the full flood and its bounds."""
    out = _run("serve_flood.py", "--checkpoint", str(tmp_path / "none"), "--requests", "30", "--connections", "6",
               "--max-batch", "2", "--max-queue", "1", "--max-tokens", "2")  # fmt: skip
    assert "model: a freshly initialized" in out and re.search(r"^machine: .+$", out, flags=re.M), out
    header, rows = _table(out, "status")
    assert header == ["status", "requests"] and {r[0] for r in rows} <= {"200", "503"}
    assert sum(_number(r[1]) for r in rows) == 30
    assert re.search(r"^server RSS: [\d.]+ MiB before, [\d.]+ MiB after", out, flags=re.M), out


@smoke("int8_decode.py")
def test_int8_decode_races_int8_against_fp32_and_transformers_at_each_thread_count():
    out = _run("int8_decode.py", "--shapes", "tiny", "--tiny", "1x32x300", "--prompt", "4", "--new", "3",
               "--threads", "1,2", "--repeats", "2", "--warmup", "0", "--peer-dtypes", "float32")  # fmt: skip
    assert re.search(r"^machine: .+; load average before [\d. ]+$", out, flags=re.M) and "batch 1, greedy" in out
    header, rows = _table(out, "model | threads")
    ours = ["nanollm fp32", "nanollm int8", "nanollm fp32 compiled", "nanollm int8 compiled"]
    ours += ["nanollm int8 aten kernel"] if int8_gemm() is not None else []
    theirs = ["transformers dynamic float32", "transformers static float32", "transformers compiled float32"]
    assert header[2:] == [*ours, *theirs, "peer", "int8 / fp32", "int8 / peer"]
    assert [r[:2] for r in rows] == [["tiny 1L/32d/300v", "1"], ["tiny 1L/32d/300v", "2"]]
    for r in rows:
        rates = [_number(c) for c in r[2 : 2 + len(ours) + len(theirs)]]
        peer, ratio = r[2 + len(ours) + len(theirs) :][:2]
        assert min(rates) > 0 and peer in [t.removeprefix("transformers ") for t in theirs]
        assert _number(ratio) == pytest.approx(rates[1] / rates[0], rel=0.05, abs=0.01)
    header, best = _table(out, "model | nanollm fp32")
    assert header[3:6] == ["transformers, best setting", "int8 / fp32", "int8 / transformers"]
    assert len(best) == 1 and re.fullmatch(r"[\d.]+ \([12]\)", best[0][1]) and _number(best[0][4]) > 0
    assert re.fullmatch(r"[\d.]+ \((dynamic|static|compiled) float32, [12]\)", best[0][3])
    header, compiled = _table(out, "model | nanollm fp32 compiled")
    ratios = ["int8 compiled / fp32 eager", "int8 compiled / fp32 compiled", "int8 compiled / transformers (best)"]
    assert header[3:6] == ratios
    assert len(compiled) == 1 and all(_number(c) > 0 for c in compiled[0][1:6])
    assert compiled[0][6] == "identical"  # the compiled int8 step draws the eager int8 step's greedy tokens


@smoke("int8_matmul.py")
def test_int8_matmul_times_every_path_at_each_row_count_and_thread_count():
    out = _run("int8_matmul.py", "--shape", "1x64x300", "--rows", "1,5", "--threads", "1,2", "--repeats", "2")
    assert re.search(r"^machine: .+; nanollm kernel: .+; load average [\d.]+$", out, flags=re.M), out
    assert "5 matmuls per step" in out
    header, rows = _table(out, "M | threads")
    compiled = ["inductor"] + (["torchao"] if importlib.util.find_spec("torchao") else [])
    paths = (["nanollm"] if int8_gemm() is not None else []) + ["aten", "dequantize", "fp32", *compiled]
    versus = ["aten", "fp32", *compiled]
    assert header[2:] == [f"{p} ms (GB/s)" for p in paths] + [f"{p} / nanollm" for p in versus]
    assert [r[:2] for r in rows] == [["1", "1"], ["1", "2"], ["5", "1"], ["5", "2"]]
    for r in rows:
        assert all(re.fullmatch(r"[\d.]+ \([\d.]+\)", c) and _number(c) > 0 for c in r[2 : 2 + len(paths)])
        ratios = r[2 + len(paths) :]
        assert all(_number(c) > 0 for c in ratios) if int8_gemm() is not None else set(ratios) == {"-"}


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts - SMOKE_TESTED == set(), "benchmarks without a smoke test here; add one marked @smoke(...)"
    assert SMOKE_TESTED - scripts == set(), "smoke tests name benchmarks that no longer exist"


@smoke("compiled_step.py")
def test_compiled_step_times_eager_compiled_and_each_setting_taken_back(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\ntokenizer: {vocab_size: 300}\n")
    out = _run("compiled_step.py", "--params", str(params), "--batches", "1,2", "--seq-len", "16", "--steps", "3",
               "--rounds", "2", "--threads", "1")  # fmt: skip
    header, rows = _table(out, "batch")
    assert header == ["batch", "step", "us a step", "eager / this", "this / compiled", "compile (s)"]
    names = ["eager", "compiled", "no mm decomposition", "python wrapper", "every guard", "matmuls alone",
             "attention alone"]  # fmt: skip
    assert [(r[0], r[1]) for r in rows] == [(b, n) for b in ("1", "2") for n in names]
    assert all(_number(r[2]) > 0 for r in rows)
    assert all(_number(r[5]) > 0 for r in rows if r[1] not in ("eager", "matmuls alone", "attention alone"))
    assert "- batch 2: x" in out  # the bound a batch's floor puts on its gain over batch 1


@smoke("muon_step.py", "_rounds.py")
def test_muon_step_times_the_three_and_checks_batched_against_one_at_a_time(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 16}\ntokenizer: {vocab_size: 300}\n")
    out = _run("muon_step.py", "--params", str(params), "--steps", "2", "--rounds", "2", "--threads", "1")
    assert "batched and one at a time equal after a step: True" in out
    header, rows = _table(out, "step")
    assert header == ["step", "ms a step", "this / batched (ours)"]
    assert [r[0] for r in rows] == ["batched (ours)", "one at a time", "torch.optim.Muon"]
    assert all(_number(r[1]) > 0 for r in rows) and rows[0][2] == "x1.00"


@smoke("loss_chunks.py", "_rounds.py")
def test_loss_chunks_times_each_chunk_size_against_the_whole_logits(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\ntokenizer: {vocab_size: 300}\n"
        "train: {batch_size: 4}\n"
    )
    out = _run("loss_chunks.py", "--params", str(params), "--chunks", "8,64", "--steps", "1", "--rounds", "2")
    assert "losses agree to fp32 rounding: True" in out
    header, rows = _table(out, "forward + backward")
    assert header == ["forward + backward", "ms a step", "this / whole"]
    assert [r[0] for r in rows] == ["chunked, 8 rows", "chunked, 64 rows", "whole"]
    assert all(_number(r[1]) > 0 for r in rows) and rows[-1][2] == "x1.00"
