"""`nanollm bench_kvcache` on a tiny real checkpoint, re-opening its pretrain run in a sqlite MLflow store."""

import csv
import json
import logging

import pytest
import torch
import yaml
from click.testing import CliRunner

from nanollm.checkpoint import architecture_model, load_model, save_checkpoint
from nanollm.config import ModelConfig, TrackingConfig
from nanollm.model import Transformer
from nanollm.tracking.runs import make_tracker, sectioned
from stages.cli import cli

PARAMS = {
    "seed": 11,
    "bench": {
        "prompt_lengths": [4, 16],
        "new_tokens": [3, 5],
        "repeats": 1,
        "warmup": 1,
        "batch_sizes": [1, 3],
        "batch_prompt_len": 6,
        "batch_new_tokens": 4,
    },
    "tracking": {"experiment": "stage-test"},
}
# the tests of other things than the compiled step spare themselves its compiles
UNTRACKED = {**PARAMS, "bench": {**PARAMS["bench"], "compile": False}, "tracking": {"enabled": False}}
OUTPUTS = (
    "metrics/bench_kvcache.json",
    "reports/bench_kvcache.csv",
    "reports/bench_kvcache.png",
    "reports/bench_kvcache_batching.csv",
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # init_std 0.3: an untrained model whose greedy tokens vary, so the equality check has teeth
    model = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, init_std=0.3), vocab_size=97)
    save_checkpoint(
        tmp_path / "models" / "checkpoint",
        model,
        train_state={"step": 1, "tokens_seen": 0},
        info={"tokenizer_sha256": "a" * 64, "corpus_sha256": "c" * 64},
    )
    return tmp_path


def _run(root, params):
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(cli, ["--params", "params.yaml", "bench_kvcache"], catch_exceptions=False)


def test_bench_writes_summary_table_chart_and_extends_the_pretrain_run(project):
    from mlflow.tracking import MlflowClient

    tracker = make_tracker(TrackingConfig(experiment="stage-test"), project)
    tracker.start(run_name="pretrain")
    tracker.end()
    (project / "models" / "run.json").write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.uri}))

    result = _run(project, PARAMS)
    assert result.exit_code == 0, result.output

    summary = json.loads((project / OUTPUTS[0]).read_text())
    described = {k: v for k, v in summary.items() if isinstance(v, str)}  # where it ran, what it timed
    summary = {k: v for k, v in summary.items() if k not in described}
    assert set(described) == {"device", "machine", "timed_weights", "int8_kernel"}
    assert (
        described["timed_weights"]
        == "seeded random weights (seed 11) of the trained architecture, not the trained ones"
    )
    from nanollm.inference.native import int8_gemm

    assert described["int8_kernel"] == ("nanollm" if int8_gemm() is not None else "aten")  # 1 thread: any build serves
    points = [(p, n) for p in (4, 16) for n in (3, 5)]
    per_point = ("speedup", "cached_tok_s", "uncached_tok_s", "transformers_tok_s", "vs_transformers")
    per_point += ("transformers_dynamic_tok_s", "transformers_static_tok_s", "transformers_compiled_tok_s")  # raced
    per_point += ("compiled_tok_s", "compiled_ttft_ms", "compile_s", "compiled_vs_cached", "compiled_speedup")
    per_point += ("compiled_vs_transformers",)
    expected = {f"p{p}_n{n}_{k}" for p, n in points for k in per_point}
    which = {f"p{p}_n{n}_transformers_static_is_peer" for p, n in points}
    bandwidth = {"weight_mb", "weight_read_gb_s", "memory_copy_gb_s", "bandwidth_utilisation"}
    extremes = {"max_speedup", "cache_mb_max", "min_vs_transformers", "threads", "peer_on_llama_counterpart"}
    extremes |= {"min_compiled_vs_cached", "max_compiled_speedup", "min_compiled_vs_transformers", "compile_s_max"}
    kinds = ("fp32", "int8", "fp32_compiled", "int8_compiled")
    serving = {f"decode_{w}_tok_s" for w in kinds} | {"int8_vs_fp32", "max_batch_vs_batch1"}
    serving |= {"int8_vs_fp32_compiled", "max_batch_vs_batch1_compiled"}
    serving |= {f"batch{b}_{w}_{k}" for b in (1, 3) for w in kinds for k in ("tok_s", "vs_batch1")}
    assert set(summary) == expected | which | bandwidth | extremes | serving
    assert summary.pop("peer_on_llama_counterpart") == 0.0  # a Llama architecture meets the peer itself
    assert all(isinstance(v, (int, float)) and v > 0 for k, v in summary.items() if k not in which)
    for p, n in points:
        theirs = max(summary[f"p{p}_n{n}_transformers_{cache}_tok_s"] for cache in ("dynamic", "static", "compiled"))
        assert summary[f"p{p}_n{n}_transformers_tok_s"] == theirs
        ours = summary[f"p{p}_n{n}_compiled_tok_s"]
        assert summary[f"p{p}_n{n}_compiled_vs_transformers"] == pytest.approx(
            ours / theirs, rel=1e-3, abs=1e-4
        )  # ratios are kept to 4 decimals
        assert summary[f"p{p}_n{n}_compiled_vs_cached"] == pytest.approx(
            ours / summary[f"p{p}_n{n}_cached_tok_s"], rel=1e-3, abs=1e-4
        )
        static_won = summary[f"p{p}_n{n}_transformers_static_tok_s"] == theirs
        assert summary[f"p{p}_n{n}_transformers_static_is_peer"] == float(static_won)
    assert summary["threads"] == torch.get_num_threads()
    model = load_model(project / "models" / "checkpoint")
    assert summary["weight_mb"] == pytest.approx(4 * model.num_params() / 1e6, abs=1e-4)  # tied: all read
    fastest = max(summary[f"p{p}_n{n}_cached_tok_s"] for p, n in points)
    assert summary["weight_read_gb_s"] == pytest.approx(
        summary["weight_mb"] * fastest / 1e3, rel=1e-3, abs=1e-4
    )  # rounded to 4 places
    # 2 (K, V) x 2 layers x 2 heads x (16 + 5) positions x 16 dims x 4 bytes
    assert summary["cache_mb_max"] == pytest.approx(2 * 2 * 2 * 21 * 16 * 4 / 1e6, abs=1e-4)

    with open(project / OUTPUTS[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["prompt_len"]), int(r["new_tokens"])) for r in rows] == points
    assert list(rows[0]) == [
        "prompt_len", "new_tokens", "cached_tok_s", "uncached_tok_s", "speedup",
        "cached_ttft_ms", "uncached_ttft_ms", "cache_mb", "transformers_dynamic_tok_s",
        "transformers_static_tok_s", "transformers_compiled_tok_s", "transformers_peer", "transformers_tok_s",
        "vs_transformers", "compiled_tok_s", "compiled_ttft_ms", "compile_s", "compiled_vs_cached", "compiled_speedup",
        "compiled_vs_transformers",
    ]  # fmt: skip
    assert {r["transformers_peer"] for r in rows} <= {"dynamic", "static", "compiled"}
    assert (project / OUTPUTS[2]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(project / OUTPUTS[3], newline="") as f:
        batching = list(csv.DictReader(f))
    assert [(r["weights"], int(r["batch"])) for r in batching] == [(w, b) for w in kinds for b in (1, 3)]
    assert summary["int8_vs_fp32"] == pytest.approx(summary["decode_int8_tok_s"] / summary["decode_fp32_tok_s"], 1e-3)
    assert summary["max_batch_vs_batch1"] == summary["batch3_fp32_vs_batch1"]
    assert summary["max_batch_vs_batch1_compiled"] == summary["batch3_fp32_compiled_vs_batch1"]

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    keys = (
        "max_speedup",
        "p16_n5_speedup",
        "weight_read_gb_s",
        "min_vs_transformers",
        "p4_n3_transformers_static_tok_s",
    )
    for name, value in sectioned("bench", {k: summary[k] for k in keys}).items():
        assert run.data.metrics[name] == pytest.approx(value)
    assert run.data.tags["bench.device"] == described["device"] == "cpu"
    assert run.data.tags["bench.machine"] == described["machine"] and described["machine"]
    assert run.data.tags["bench.timed_weights"] == described["timed_weights"]  # what the figures are of
    assert ("bench.int8_kernel" in run.data.tags) == ("int8_kernel" in described)
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "bench_kvcache")}
    assert artifacts == {f"bench_kvcache/{name}" for name in ("bench_kvcache.csv", "bench_kvcache.png")} | {
        "bench_kvcache/bench_kvcache_batching.csv"
    }
    assert len(client.search_runs([run.info.experiment_id])) == 1  # re-opened, not a new run


def test_bench_fails_in_one_line_when_the_cache_path_disagrees(project, monkeypatch):
    import nanollm.checkpoint

    def broken(path, *, seed, device="cpu"):
        model = architecture_model(path, seed=seed, device=device)
        plain = model.forward

        def forward(idx, start_pos=None, **kwargs):
            logits = plain(idx, start_pos, **kwargs)
            return (
                logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(0), logits.size(-1)) if start_pos else logits
            )

        model.forward = forward  # cached decode steps now favour token 0
        return model

    monkeypatch.setattr(nanollm.checkpoint, "architecture_model", broken)
    result = _run(project, UNTRACKED)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "KV cache mismatch at prompt_len=4, new_tokens=3" in lines[0]
    assert not any((project / out).exists() for out in OUTPUTS)


def test_a_near_tie_between_the_paths_does_not_fail_the_stage(project, monkeypatch, caplog):
    import nanollm.checkpoint

    def near_tie(path, *, seed, device="cpu"):
        model = architecture_model(path, seed=seed, device=device)
        plain = model.forward

        def forward(idx, start_pos=None, **kwargs):
            logits = plain(idx, start_pos, **kwargs)
            top = logits.amax(dim=-1)  # (B, T)
            logits[..., 7] = top + 1.0
            logits[..., 9] = top + 1.0 + (1e-5 if start_pos else -1e-5)  # decode steps round towards 9
            return logits

        model.forward = forward  # tokens 7 and 9 tie to 1e-5 at every step, as on a trained model
        return model

    monkeypatch.setattr(nanollm.checkpoint, "architecture_model", near_tie)
    with caplog.at_level(logging.WARNING, logger="nanollm.inference.bench"):
        result = _run(project, {**UNTRACKED, "bench": {**UNTRACKED["bench"], "compare_transformers": False}})
    assert result.exit_code == 0, result.output
    assert all((project / out).exists() for out in OUTPUTS)
    notes = [r.getMessage() for r in caplog.records if "near-tie" in r.getMessage()]
    assert len(notes) == 4 and "at prompt_len=4, new_tokens=3" in notes[0]  # one per point, none fatal


def test_bench_without_the_transformers_comparison_and_on_atens_int8_kernel(project, monkeypatch):
    from nanollm.inference import native

    monkeypatch.setenv("NANOLLM_INT8_KERNEL", "aten")  # the metrics say which kernel served int8
    native.int8_gemm.cache_clear()
    try:
        result = _run(project, {**UNTRACKED, "bench": {**UNTRACKED["bench"], "compare_transformers": False}})
    finally:
        native.int8_gemm.cache_clear()
    assert result.exit_code == 0, result.output
    summary = json.loads((project / OUTPUTS[0]).read_text())
    assert summary["max_speedup"] > 0 and not [k for k in summary if "transformers" in k]
    assert summary["int8_kernel"] == "aten" and "(aten kernel)" in result.output


def test_bench_without_int8_names_no_int8_kernel(project):
    result = _run(project, {**UNTRACKED, "bench": {**UNTRACKED["bench"], "compare_transformers": False, "int8": False}})
    assert result.exit_code == 0, result.output
    summary = json.loads((project / OUTPUTS[0]).read_text())
    assert "int8_kernel" not in summary and "int8_vs_fp32" not in summary and "timed_weights" in summary


def test_bench_says_in_one_line_when_transformers_is_missing(project, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets where it is absent
    result = _run(project, UNTRACKED)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install transformers" in lines[0] and "bench.compare_transformers" in lines[0]
    assert not any((project / out).exists() for out in OUTPUTS)


def _with_architecture(project, **options) -> dict:
    arch = project / "models" / "checkpoint" / "architecture.json"
    info = json.loads(arch.read_text())
    info["model"].update(options)
    arch.write_text(json.dumps(info))
    return info["model"]


def test_an_architecture_llama_cannot_express_meets_the_peer_on_its_llama_counterpart(project, caplog):
    model = _with_architecture(project, qk_norm=True, value_residual=True)
    with caplog.at_level(logging.INFO):
        result = _run(project, {**UNTRACKED, "model": model})
    assert result.exit_code == 0, result.output
    summary = json.loads((project / OUTPUTS[0]).read_text())
    assert summary["peer_on_llama_counterpart"] == 1.0 and summary["min_vs_transformers"] > 0
    for point in ("p4_n3", "p16_n5"):  # the model's own cached/uncached figures, and ours on the counterpart
        assert summary[f"{point}_speedup"] > 0 and summary[f"{point}_counterpart_cached_tok_s"] > 0
        ratio = summary[f"{point}_counterpart_cached_tok_s"] / summary[f"{point}_transformers_tok_s"]
        assert summary[f"{point}_vs_transformers"] == pytest.approx(ratio, rel=1e-3, abs=1e-4)
    assert any("compared on its Llama counterpart" in r.getMessage() for r in caplog.records)


def test_zero_initialised_projections_are_no_other_architecture(project, caplog):
    """The bench compares the architecture the checkpoint records, not the seeded model it measures."""
    model = _with_architecture(project, zero_init_proj=True)
    bench = {**UNTRACKED["bench"], "int8": False, "compare_transformers": False}
    with caplog.at_level(logging.WARNING):
        result = _run(project, {**UNTRACKED, "model": model, "bench": bench})
    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if "another architecture" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # a real difference still warns
        _run(project, {**UNTRACKED, "model": {**model, "n_head": 1}, "bench": bench})
    assert any("model.n_head: 2 in checkpoint, 1 in params" in r.getMessage() for r in caplog.records)


def test_an_architecture_with_no_llama_counterpart_is_benched_without_the_peer(project, caplog):
    model = _with_architecture(project, mlp="relu2", qk_norm=True)
    with caplog.at_level(logging.WARNING):
        result = _run(project, {**UNTRACKED, "model": model})
    assert result.exit_code == 0, result.output
    summary = json.loads((project / OUTPUTS[0]).read_text())
    assert summary["max_speedup"] > 0 and not [k for k in summary if "transformers" in k]
    assert summary["peer_on_llama_counterpart"] == 0.0
    assert any("no comparison with transformers: model.mlp is 'relu2'" in r.getMessage() for r in caplog.records)
