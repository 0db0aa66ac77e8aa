"""The KV-cache benchmark: row shape, the equality check between modes, summary, CSV and chart."""

import csv

import pytest
import torch

from nanollm.bench import COLUMNS, KVCacheMismatchError, bench_kvcache, plot, speedup, summarize, write_table
from nanollm.config import ModelConfig
from nanollm.errors import NanollmError
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

    def forward(self, idx, start_pos=None):
        logits = super().forward(idx, start_pos)
        if start_pos:  # a decode step against the cache
            logits[..., 0] += 100.0
        return logits


def test_rows_have_one_point_per_pair_and_sane_numbers():
    model = _model()
    rows = bench_kvcache(model, prompt_lengths=[4, 12], new_tokens=[3, 6], repeats=2, warmup=1, seed=0)
    assert [(r["prompt_len"], r["new_tokens"]) for r in rows] == [(4, 3), (4, 6), (12, 3), (12, 6)]
    for r in rows:
        assert set(r) == set(COLUMNS)
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


def test_prompts_are_seeded(monkeypatch):
    import nanollm.bench as bench

    seen = []
    real = bench._timed_greedy

    def spy(model, prompt, *args, **kwargs):
        seen.append(prompt.tolist())
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(bench, "_timed_greedy", spy)
    model = _model()
    for _ in range(2):
        bench_kvcache(model, prompt_lengths=[3, 7], new_tokens=[2], repeats=1, warmup=0, seed=5)
    first, second = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert first == second
    assert first[-1][:3] == first[0]  # shorter prompts are prefixes of the longest


def test_summary_csv_and_chart(tmp_path):
    rows = [
        {"prompt_len": p, "new_tokens": n, "cached_tok_s": 100.0 + p, "uncached_tok_s": 50.0,
         "speedup": speedup(100.0 + p, 50.0), "cached_ttft_ms": 1.0, "uncached_ttft_ms": 1.5,
         "cache_mb": p * n / 1e3}
        for p in (16, 128) for n in (8, 32)
    ]  # fmt: skip
    summary = summarize(rows)
    assert summary["p128_n32_speedup"] == pytest.approx(228 / 50)
    assert summary["p16_n8_cached_tok_s"] == 116.0
    assert summary["max_speedup"] == pytest.approx(228 / 50)
    assert summary["cache_mb_max"] == pytest.approx(128 * 32 / 1e3)
    assert all(isinstance(v, float) for v in summary.values())

    write_table(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(COLUMNS)
    assert [(int(r["prompt_len"]), int(r["new_tokens"])) for r in back] == [(16, 8), (16, 32), (128, 8), (128, 32)]

    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "t.csv"]  # no temporary files left behind


def test_speedup_of_a_stalled_baseline():
    assert speedup(10.0, 0.0) == float("inf")
    assert speedup(10.0, 4.0) == 2.5
