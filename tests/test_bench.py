"""The KV-cache benchmark (nanollm/inference/bench/): row shape, the equality check between modes (near-ties
included), the peer race, summary, CSV, chart, bandwidth, report."""

import csv
import dataclasses
import json
import logging
import re

import pytest
import torch

from nanollm.config import ModelConfig
from nanollm.errors import NanollmError
from nanollm.inference.bench import serving, timing
from nanollm.inference.bench.bandwidth import bandwidth, memory_bandwidth, weight_bytes_per_token
from nanollm.inference.bench.chart import plot
from nanollm.inference.bench.equality import KVCacheMismatchError, rounding_tolerance
from nanollm.inference.bench.report import REPORT_BEGIN, REPORT_END, main, render_report
from nanollm.inference.bench.results import (
    read_batch_table,
    read_table,
    summarize,
    summarize_serving,
    write_batch_table,
    write_table,
)
from nanollm.inference.bench.timing import COLUMNS, COMPILED_COLUMNS, PEER_COLUMNS, bench_kvcache, speedup
from nanollm.model import Transformer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the test machine's cores are shared


def _model(cls=Transformer):
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, init_std=0.3)
    torch.manual_seed(0)
    return cls(cfg, vocab_size=53).eval()


class BrokenCache(Transformer):
    """A model whose cached decode steps disagree with its plain forward (they favour token 0)."""

    def forward(self, idx, start_pos=None, **kwargs):
        logits = super().forward(idx, start_pos, **kwargs)
        if start_pos:  # a decode step against the cache
            logits[..., 0] += 100.0
        return logits


class CorruptedCache(Transformer):
    """Each decode step nudges the cached key of the position before it: a subtly stale cache, not a planted token."""

    def forward(self, idx, start_pos=None, **kwargs):
        if start_pos:
            for layer in self.layers:
                layer.attention.cache.k[:, :, start_pos - 1] += 0.2  # (B, nkv, hs) of one position
        return super().forward(idx, start_pos, **kwargs)


class ShiftedRope(torch.nn.Module):
    """RoPE tables one position ahead in decode steps: the classic off-by-one of a cached rotation."""

    def __init__(self, rope):
        super().__init__()
        self.inner = rope

    def forward(self, start_pos, T):
        return self.inner(start_pos + 1 if start_pos else start_pos, T)


class NearTie(Transformer):
    """Tokens 7 and 9 tie on top at every step, to 1e-5: the plain forward rounds towards 7, decode steps towards 9.

    That is a trained model's legitimate near-tie, with the two paths' float rounding made explicit.
    """

    def forward(self, idx, start_pos=None, **kwargs):
        logits = super().forward(idx, start_pos, **kwargs)
        top = logits.amax(dim=-1)  # (B, T)
        logits[..., 7] = top + 1.0
        logits[..., 9] = top + 1.0 + (1e-5 if start_pos else -1e-5)
        return logits


def test_rows_have_one_point_per_pair_and_sane_numbers():
    model = _model()
    rows = bench_kvcache(model, prompt_lengths=[4, 12], new_tokens=[3, 6], repeats=2, warmup=1, seed=0)
    assert [(r["prompt_len"], r["new_tokens"]) for r in rows] == [(4, 3), (4, 6), (12, 3), (12, 6)]
    for r in rows:
        assert set(r) == set(COLUMNS) - set(PEER_COLUMNS) - set(COMPILED_COLUMNS)  # no peer, no compiled step
        assert r["cached_tok_s"] > 0 and r["uncached_tok_s"] > 0
        assert r["speedup"] == pytest.approx(r["cached_tok_s"] / r["uncached_tok_s"])
        assert 0 < r["cached_ttft_ms"] and 0 < r["uncached_ttft_ms"]
        # K and V, per layer, per KV head, per position of prompt + new tokens, fp32
        expected = 2 * 2 * 2 * (r["prompt_len"] + r["new_tokens"]) * 8 * 4
        assert r["cache_mb"] == pytest.approx(expected / 1e6)
    assert model.cache_bytes() == 0  # nothing left allocated


def test_mismatch_between_modes_names_the_point():
    model = _model(BrokenCache)
    with pytest.raises(KVCacheMismatchError, match=r"prompt_len=5, new_tokens=8: .* at new token \d+") as err:
        bench_kvcache(model, prompt_lengths=[5], new_tokens=[8], repeats=1, warmup=0, seed=0)
    assert isinstance(err.value, NanollmError)  # the CLI prints it as one line and exits 1
    assert "\n" not in str(err.value)
    assert "logits differ by up to 100" in str(err.value)


@pytest.mark.parametrize("bug", ["corrupted cache", "rope offset"])
def test_a_subtly_wrong_cache_path_is_caught_not_excused_as_a_near_tie(bug, caplog):
    model = _model(CorruptedCache) if bug == "corrupted cache" else _model()
    if bug == "rope offset":
        model.rope = ShiftedRope(model.rope)
    with pytest.raises(KVCacheMismatchError, match=r"prompt_len=6, new_tokens=12: .* at new token \d+") as err:
        bench_kvcache(model, prompt_lengths=[6], new_tokens=[12], repeats=1, warmup=0, seed=0)
    drift, allowed = map(float, re.search(r"differ by up to (\S+) \(rounding allows (\S+)\)", str(err.value)).groups())
    assert drift > 10 * allowed  # far outside rounding, though each step is only slightly off
    assert "near-tie" not in caplog.text


def test_a_near_tie_between_the_paths_is_logged_and_the_run_goes_on(caplog):
    model = _model(NearTie)
    with caplog.at_level(logging.WARNING, logger="nanollm.inference.bench"):
        rows = bench_kvcache(model, prompt_lengths=[5], new_tokens=[6], repeats=2, warmup=1, seed=0)
    assert rows[0]["cached_tok_s"] > 0 and rows[0]["uncached_tok_s"] > 0
    notes = [r.getMessage() for r in caplog.records if "near-tie" in r.getMessage()]
    assert len(notes) == 1  # once per point, though every round meets it
    # new token 0 comes from the prefill, where both paths round alike; they part at the first decode step
    assert (
        "near-tie at prompt_len=5, new_tokens=6: greedy decoding first differs at new token 1 (cached 9, uncached 7)"
        in notes[0]
    )
    assert "the rest of the run is not compared" in notes[0]


def test_rounding_tolerance_scales_with_the_dtype_and_the_logits():
    small, sharp = torch.tensor([0.5, -0.2]), torch.tensor([20.0, -3.0])
    assert rounding_tolerance(small, torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    assert rounding_tolerance(sharp, torch.float32) == pytest.approx(20 * torch.finfo(torch.float32).eps ** 0.5)
    assert rounding_tolerance(small, torch.bfloat16) > 100 * rounding_tolerance(small, torch.float32)


def test_prompts_are_seeded(monkeypatch):
    seen = []
    real = timing.timed_greedy

    def spy(model, prompt, *args, **kwargs):
        seen.append(prompt.tolist())
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(timing, "timed_greedy", spy)
    model = _model()
    for _ in range(2):
        bench_kvcache(model, prompt_lengths=[3, 7], new_tokens=[2], repeats=1, warmup=0, seed=5)
    first, second = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert first == second
    assert first[-1][:3] == first[0]  # shorter prompts are prefixes of the longest


def _rows():
    return [
        {"prompt_len": p, "new_tokens": n, "cached_tok_s": 100.0 + p, "uncached_tok_s": 50.0,
         "speedup": speedup(100.0 + p, 50.0), "cached_ttft_ms": 1.0, "uncached_ttft_ms": 1.5,
         "cache_mb": p * n / 1e3}
        for p in (16, 128) for n in (8, 32)
    ]  # fmt: skip


def test_summary_csv_and_chart(tmp_path):
    rows = _rows()
    summary = summarize(rows)
    assert summary["p128_n32_speedup"] == pytest.approx(228 / 50)
    assert summary["p16_n8_cached_tok_s"] == 116.0
    assert summary["max_speedup"] == pytest.approx(228 / 50)
    assert summary["cache_mb_max"] == pytest.approx(128 * 32 / 1e3)
    assert all(isinstance(v, float) for v in summary.values())

    write_table(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    base = [c for c in COLUMNS if c not in PEER_COLUMNS and c not in COMPILED_COLUMNS]
    assert list(back[0]) == base
    assert [(int(r["prompt_len"]), int(r["new_tokens"])) for r in back] == [(16, 8), (16, 32), (128, 8), (128, 32)]

    assert read_table(tmp_path / "t.csv") == [{k: r[k] for k in base} for r in rows]

    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "t.csv"]  # no temporary files left behind


def test_speedup_of_a_stalled_baseline():
    assert speedup(10.0, 0.0) == float("inf")
    assert speedup(10.0, 4.0) == 2.5


def test_weight_bytes_count_the_tied_head_and_skip_an_untied_lookup_table():
    tied = _model()
    assert weight_bytes_per_token(tied) == 4 * tied.num_params()
    cfg = dataclasses.replace(tied.cfg, tie_embeddings=False)
    untied = Transformer(cfg, vocab_size=53)
    assert weight_bytes_per_token(untied) == 4 * (untied.num_params() - 53 * 32)  # the LM head is read, the table not


def test_memory_bandwidth_is_a_plausible_rate():
    rate = memory_bandwidth(size_mb=16, repeats=2)
    assert 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s: a rate in bytes per second, not a time


def test_bandwidth_uses_the_fastest_cached_point():
    got = bandwidth(_rows(), weight_bytes=2_000_000, copy_bytes_s=10e9)
    assert got == {
        "weight_mb": 2.0,
        "weight_read_gb_s": pytest.approx(2e6 * 228 / 1e9),
        "memory_copy_gb_s": 10.0,
        "bandwidth_utilisation": pytest.approx(2e6 * 228 / 10e9, abs=1e-4),
    }


def test_report_is_rendered_between_the_markers(tmp_path):
    rows = _rows()
    summary = {**summarize(rows), **bandwidth(rows, 2_000_000, 10e9), "threads": 2}
    text = render_report(summary, rows)
    assert text.count("\n| ") == 5  # header separator and four points
    assert "| 128 | 32 | 228 | 50.0 | x4.6 |" in text and "x2.3 at prompt 16 + 8" in text
    assert "0.5 GB/s, 5% of the 10.0 GB/s" in text and "(2 threads)" in text
    assert "(1 thread)." in render_report({**summary, "threads": 1}, rows)

    (tmp_path / "m.json").write_text(json.dumps(summary))
    write_table(rows, tmp_path / "t.csv")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nprose\n\n{REPORT_BEGIN}\nstale\n{REPORT_END}\n\nmore prose\n")
    argv = [str(doc), "--metrics", str(tmp_path / "m.json"), "--table", str(tmp_path / "t.csv")]
    assert main(argv) == 0
    once = doc.read_text()
    assert "stale" not in once and once.startswith("# Title\n\nprose\n\n") and once.endswith("\n\nmore prose\n")
    assert render_report(summary, read_table(tmp_path / "t.csv")) in once
    assert main(argv) == 0 and doc.read_text() == once  # idempotent

    doc.write_text("no markers")
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 1


def test_every_transformers_setting_races_in_alternating_rounds_and_the_fastest_is_the_peer(
    tmp_path, monkeypatch, caplog
):
    from nanollm.inference.peers import PEER_CACHES, transformers_settings

    model = _model()
    settings = transformers_settings(model)
    assert set(settings) == set(PEER_CACHES) == {"dynamic", "static", "compiled"}
    calls = []
    real = timing.timed_greedy

    def ours(model, prompt, n, *, use_cache, device):
        calls.append(("cached" if use_cache else "uncached", prompt.numel(), n))
        return real(model, prompt, n, use_cache=use_cache, device=device)

    def counted(cache):
        def peer(prompt, n):
            calls.append((cache, prompt.numel(), n))
            return settings[cache](prompt, n)

        return peer

    monkeypatch.setattr(timing, "timed_greedy", ours)
    points = {"prompt_lengths": [4, 9], "new_tokens": [5]}
    peers = {cache: counted(cache) for cache in PEER_CACHES}
    with caplog.at_level(logging.WARNING, logger="nanollm.inference.bench"):
        rows = bench_kvcache(model, **points, repeats=2, warmup=1, seed=0, transformers=peers)
    ours_first = ["cached", "uncached", "dynamic", "static", "compiled"]
    peer_first = ours_first[::-1]
    for prompt_len in (4, 9):
        rounds = [name for name, p, n in calls if p == prompt_len and n == 5]
        # warm-up (without uncached decoding, which warms nothing), then the timed rounds: ours leads the
        # first timed round, the peer the next
        assert rounds == [name for name in peer_first if name != "uncached"] + ours_first + peer_first
    assert not [r for r in caplog.records if "part from ours" in r.getMessage()]  # same weights, same tokens
    for r in rows:
        assert set(r) == set(COLUMNS) - set(COMPILED_COLUMNS)
        assert all(r[f"transformers_{cache}_tok_s"] > 0 for cache in PEER_CACHES)
        best = max(PEER_CACHES, key=lambda cache: r[f"transformers_{cache}_tok_s"])
        assert r["transformers_peer"] == best and r["transformers_tok_s"] == r[f"transformers_{best}_tok_s"]
        assert r["vs_transformers"] == pytest.approx(r["cached_tok_s"] / r["transformers_tok_s"])
    summary = summarize(rows)
    assert summary["min_vs_transformers"] == pytest.approx(min(r["vs_transformers"] for r in rows), abs=1e-4)
    assert summary["p9_n5_transformers_tok_s"] == pytest.approx(rows[1]["transformers_tok_s"], abs=1e-4)
    assert summary["p9_n5_transformers_static_tok_s"] == pytest.approx(rows[1]["transformers_static_tok_s"], abs=1e-4)
    assert summary["p4_n5_transformers_static_is_peer"] == float(rows[0]["transformers_peer"] == "static")
    assert all(isinstance(v, float) for v in summary.values())  # MLflow metrics are numbers

    write_table(rows, tmp_path / "t.csv")
    back = read_table(tmp_path / "t.csv")
    assert [list(r) for r in back] == [[c for c in COLUMNS if c not in COMPILED_COLUMNS]] * 2
    assert [r["transformers_peer"] for r in back] == [r["transformers_peer"] for r in rows]
    report = render_report(summary, rows)
    header = report.splitlines()[0]
    assert (
        "| transformers dynamic cache tok/s | transformers static cache tok/s | transformers compiled cache tok/s "
        "| peer | ours / peer |" in header
    )
    assert f"| {rows[0]['transformers_peer']} | x{rows[0]['vs_transformers']:.2f} |" in report.splitlines()[2]
    low, high = sorted(r["vs_transformers"] for r in rows)
    assert f"our eager cached decoding is x{low:.2f} to x{high:.2f} as fast" in report
    static, compiled = (sum(r["transformers_peer"] == cache for r in rows) for cache in ("static", "compiled"))
    assert f"the fastest at each point (the static one at {static} of 2, the compiled one at {compiled})" in report
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_min_seconds_gives_the_fast_setting_more_samples_in_each_round(monkeypatch):
    """A timed round decodes a setting again until its runs there add up to min_seconds; warm-up runs once."""
    calls = []
    real = timing.timed_greedy
    clock = {True: 0.01, False: 0.2}  # seconds a run "took": cached, uncached

    def ours(model, prompt, n, *, use_cache, device):
        calls.append("cached" if use_cache else "uncached")
        tokens, _, _ = real(model, prompt, n, use_cache=use_cache, device=device)
        return tokens, clock[use_cache] / 2, clock[use_cache]

    monkeypatch.setattr(timing, "timed_greedy", ours)
    (row,) = bench_kvcache(_model(), prompt_lengths=[4], new_tokens=[5], repeats=2, warmup=1, seed=0, min_seconds=0.05)
    # warm-up: cached once; round 1: cached to 0.05 s (5 runs), uncached once (0.2 s >= 0.05); round 2 reversed
    assert calls == ["cached"] + ["cached"] * 5 + ["uncached"] + ["uncached"] + ["cached"] * 5
    assert row["cached_tok_s"] == pytest.approx(5 / 0.01) and row["uncached_tok_s"] == pytest.approx(5 / 0.2)


def test_the_peer_is_the_faster_setting_at_each_point():
    import time as clock

    model = _model()

    def slow(prompt, n):
        clock.sleep(0.02)
        return [-1] * n

    rows = bench_kvcache(
        model,
        prompt_lengths=[4],
        new_tokens=[3],
        repeats=1,
        warmup=0,
        seed=0,
        transformers={"dynamic": slow, "static": lambda p, n: [-1] * n},
    )
    assert rows[0]["transformers_peer"] == "static"
    assert rows[0]["transformers_static_tok_s"] > rows[0]["transformers_dynamic_tok_s"]
    assert rows[0]["vs_transformers"] == pytest.approx(rows[0]["cached_tok_s"] / rows[0]["transformers_static_tok_s"])


def test_a_peer_that_decodes_other_tokens_is_logged_not_fatal(caplog):
    model = _model()
    other = {cache: (lambda p, n: [-1] * n) for cache in ("dynamic", "static")}
    rows = bench_kvcache(model, prompt_lengths=[4], new_tokens=[3], repeats=2, warmup=0, seed=0, transformers=other)
    assert rows[0]["vs_transformers"] > 0
    assert caplog.text.count("transformers' greedy tokens (static cache) part from ours at 0") == 1  # once per point


def test_an_unknown_peer_setting_is_refused():
    with pytest.raises(ValueError, match="among"):
        bench_kvcache(
            _model(), prompt_lengths=[4], new_tokens=[3], repeats=1, warmup=0, seed=0, transformers={"paged": None}
        )


def test_batching_rows_count_every_sequences_tokens(tmp_path):
    model = _model()
    rows = serving.bench_batching(
        {"fp32": model},
        batch_sizes=[1, 2, 4],
        prompt_len=5,
        new_tokens=4,
        repeats=1,
        warmup=0,
        seed=0,
        device=torch.device("cpu"),
    )
    assert [(r["weights"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("fp32", 4)]
    assert rows[0]["vs_batch1"] == 1.0
    for r in rows:
        assert r["per_sequence_tok_s"] == pytest.approx(r["tok_s"] / r["batch"])
        assert r["vs_batch1"] == pytest.approx(r["tok_s"] / rows[0]["tok_s"])
    int8 = [{**r, "weights": "int8", "tok_s": 1.8 * r["tok_s"]} for r in rows]
    summary = summarize_serving(rows + int8)
    assert summary["int8_vs_fp32"] == pytest.approx(1.8, abs=1e-4)
    assert summary["decode_fp32_tok_s"] == round(rows[0]["tok_s"], 4)
    assert summary["max_batch_vs_batch1"] == round(rows[2]["vs_batch1"], 4)
    assert summary["batch2_fp32_tok_s"] == round(rows[1]["tok_s"], 4)
    write_batch_table(rows, tmp_path / "b.csv")
    assert read_batch_table(tmp_path / "b.csv") == [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows
    ]
    plot(_rows(), tmp_path / "c.png", batch_rows=rows)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_int8_and_the_batching_table():
    batch_rows = [
        {"weights": w, "batch": b, "tok_s": rate, "per_sequence_tok_s": rate / b, "vs_batch1": rate / base}
        for w, base in (("fp32", 300.0), ("int8", 450.0))
        for b, rate in ((1, base), (16, base * 9))
    ]
    summary = {**summarize(_rows()), **summarize_serving(batch_rows)}
    text = render_report(summary, _rows(), batch_rows)
    assert "at 450 tokens/s against 300 with fp32 weights: x1.50" in text
    assert "| sequences at once | fp32 tok/s | fp32 / batch 1 | int8 tok/s | int8 / batch 1 |" in text
    assert "| 16 | 2700 | x9.0 | 4050 | x9.0 |" in text


def test_int8_and_fp32_weights_alternate_within_every_round_and_lead_in_turn(monkeypatch):
    """The int8-vs-fp32 figure is a ratio of medians: it is fair only if both kinds run in the same rounds,
    side by side at each batch size, each leading every other round (the real engine, its calls recorded)."""
    from nanollm.inference.quantize import quantize_int8

    fp32, int8 = _model(), quantize_int8(_model())
    names = {id(fp32): "fp32", id(int8): "int8"}
    calls = []
    real = serving.generate_batch

    def recorded(model, prompts, params, **kwargs):
        calls.append((names[id(model)], len(prompts)))
        return real(model, prompts, params, **kwargs)

    monkeypatch.setattr(serving, "generate_batch", recorded)
    rows = serving.bench_batching({"fp32": fp32, "int8": int8}, batch_sizes=[1, 3], prompt_len=4, new_tokens=3,
                                  repeats=4, warmup=1, seed=0, device=torch.device("cpu"))  # fmt: skip
    forward = [("fp32", 1), ("int8", 1), ("fp32", 3), ("int8", 3)]
    backward = forward[::-1]
    # the warm-up round runs backward, so the first timed round leads with fp32, the next with int8, ...
    assert calls == backward + forward + backward + forward + backward
    assert [(r["weights"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("int8", 1), ("int8", 3)]
    assert all(r["tok_s"] > 0 for r in rows)


def test_round_orders_flip_every_round_after_the_warmup():
    orders = list(timing.round_orders(["a", "b", "c"], warmup=2, repeats=3))
    assert orders == [
        (False, ["a", "b", "c"]),
        (False, ["c", "b", "a"]),
        (True, ["a", "b", "c"]),
        (True, ["c", "b", "a"]),
        (True, ["a", "b", "c"]),
    ]


def test_report_names_the_weights_timed_and_the_int8_kernel_when_the_metrics_do():
    batch_rows = [{"weights": w, "batch": 1, "tok_s": rate, "per_sequence_tok_s": rate, "vs_batch1": 1.0}
                  for w, rate in (("fp32", 300.0), ("int8", 450.0))]  # fmt: skip
    summary = {**summarize(_rows()), **summarize_serving(batch_rows)}
    older = render_report(summary, _rows(), batch_rows)  # metrics from before the stage wrote these keys
    assert "Weights timed" not in older and "(the engine's batch-1 rows below)." in older
    summary.update(timed_weights="seeded random weights (seed 3) of the trained architecture", int8_kernel="aten")
    text = render_report(summary, _rows(), batch_rows)
    assert "Weights timed: seeded random weights (seed 3) of the trained architecture." in text
    assert "each leading every other round; int8 matmuls on torch's aten._weight_int8pack_mm)." in text


def test_compiled_rows_time_the_compiled_step_beside_the_eager_ones():
    model = _model()
    rows = bench_kvcache(model, prompt_lengths=[6], new_tokens=[10], repeats=2, warmup=1, seed=0, compiled=True)
    [r] = rows
    assert set(r) == set(COLUMNS) - set(PEER_COLUMNS) - {"compiled_vs_transformers"}
    assert r["compiled_tok_s"] > 0 and r["compile_s"] > 0 and r["compiled_ttft_ms"] > 0
    assert r["compiled_vs_cached"] == pytest.approx(r["compiled_tok_s"] / r["cached_tok_s"])
    assert r["compiled_speedup"] == pytest.approx(r["compiled_tok_s"] / r["uncached_tok_s"])
    assert model.cache_bytes() == 0
    [r] = bench_kvcache(model, prompt_lengths=[6], new_tokens=[10], repeats=1, warmup=0, seed=0, compiled=True)
    assert r["compile_s"] > 0 and r["compiled_tok_s"] > 0  # compiled before the rounds, with no warm-up round


def test_a_compiled_step_that_reads_unwritten_positions_is_caught(monkeypatch):
    """The compiled step's tokens are checked as the cached path's are: unmask it and it attends over the whole
    static cache, written or not."""
    import nanollm.inference.compiled as compiled
    from nanollm.model.attention import RaggedStep

    class Unmasked(RaggedStep):
        @classmethod
        def over_cache(cls, positions, span):
            step = RaggedStep.over_cache(positions, span)
            return step._replace(mask=torch.ones_like(step.mask))

    monkeypatch.setattr(compiled, "RaggedStep", Unmasked)
    with pytest.raises(KVCacheMismatchError, match=r"prompt_len=6, new_tokens=10: .* at new token \d+"):
        bench_kvcache(_model(), prompt_lengths=[6], new_tokens=[10], repeats=1, warmup=1, seed=0, compiled=True)
