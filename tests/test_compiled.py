"""The compiled decode step: one graph with no break, and the tokens of the eager path, batch 1 and batched."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch._dynamo.utils import counters

from nanollm.checkpoint import seeded_model
from nanollm.config import ModelConfig
from nanollm.inference.compiled import CompiledDecoder, _step, batch_buckets
from nanollm.inference.engine import Engine, SamplingParams, generate_batch
from nanollm.inference.generate import generate
from nanollm.inference.quantize import quantize_int8

VOCAB = 300
# init_std 0.3 (0.02 in training) makes an untrained model's greedy output vary token to token
# instead of repeating one id, so the equality checks compare real sequences.
CONFIGS = {
    "default": ModelConfig(
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=32,
        qk_norm=True,
        value_residual=True,
        value_embeddings=1,
        init_std=0.3,
    ),
    "llama-gqa": ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32, init_std=0.3),
}
NAMES = [*sorted(CONFIGS), "default-int8"]


def model_for(name: str) -> torch.nn.Module:
    model = seeded_model(CONFIGS[name.removesuffix("-int8")], VOCAB, seed=0).eval()
    return quantize_int8(model) if name.endswith("-int8") else model


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_batch_buckets_are_powers_of_two_then_the_maximum():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [1, 3])
def test_the_decode_step_is_one_graph_with_no_break(name, rows):
    """What makes a token one call into generated code: dynamo traces the whole step, packs and int8 included."""
    model = model_for(name)
    decoder = CompiledDecoder(model, max_batch=4, max_seq_len=24)  # packs the weights, sets up the cache
    tokens = torch.tensor([[7]] * rows)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(_step)(model, tokens, torch.arange(rows) + 2)
    decoder.close()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # int8 matmuls stay nanollm's kernel inside the graph: one opaque operator each (quantize.py)
    assert ("nanollm.int8_matmul" in explanation.graphs[0].code) == name.endswith("-int8")


@pytest.mark.parametrize("name", NAMES)
def test_compiled_generate_equals_eager_generate(name):
    """Greedy, past block_size (32), and again after an eager call replaced the model's cache in between."""
    model = model_for(name)
    model.pack_for_decode()
    prompt = prompts([9])[0]
    eager = list(generate(model, prompt, 40, temperature=0.0))
    decoder = CompiledDecoder(model, max_seq_len=64)
    compiled = list(generate(model, prompt, 40, temperature=0.0, decoder=decoder))
    assert len(set(eager)) > 5  # a real sequence, not one token repeated
    assert compiled == eager
    assert list(generate(model, prompt[:4], 30, temperature=0.0)) == list(
        generate(model, prompt[:4], 30, temperature=0.0, decoder=decoder)
    )
    assert list(decoder.compile_seconds) == [1]  # the eager call in between cost no recompile
    decoder.close()


def test_the_tensor_guards_stay_a_cache_of_another_shape_is_never_read_as_the_old_one():
    """The guard filter drops the checks on Python objects, not on tensors: a step over a cache the graph was not
    compiled for (attach() skipped after an eager call replaced it) gets a graph of its own, and the eager logits."""
    from nanollm.model.attention import RaggedStep

    model = model_for("default")
    decoder = CompiledDecoder(model, max_seq_len=24)
    decoder.warmup()
    model.setup_cache(1, 16)  # as eager decoding would: the model's cache, another shape
    with torch.inference_mode():
        model(torch.tensor([[3, 4, 5]]), start_pos=0)  # rows of the 16-position cache, written eagerly
        tokens, positions = torch.tensor([[6]]), torch.tensor([3])
        eager = model(tokens, RaggedStep.over_cache(positions, 16))[:, -1, :]
        compiled = decoder._compiled(model, tokens, positions)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    decoder.close()


def test_compiled_generate_refuses_what_the_cache_cannot_hold():
    model = model_for("default")
    decoder = CompiledDecoder(model, max_seq_len=16)
    with pytest.raises(ValueError, match="holds 16"):
        list(generate(model, [1, 2, 3], 14, temperature=0.0, decoder=decoder))


@pytest.mark.parametrize("name", ["default", "llama-gqa"])
def test_compiled_engine_equals_eager_engine_with_joins_and_leaves(name):
    """More requests than rows, mixed lengths: every bucket (1, 2, 3) runs, with spare rows in the buckets."""
    model = model_for(name)
    ps = prompts([3, 17, 5, 20, 1, 9, 24])
    budgets = [20, 5, 30, 12, 25, 1, 16]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in budgets]
    eager = generate_batch(model, ps, params, max_batch=3, max_seq_len=64)
    compiled = generate_batch(model, ps, params, max_batch=3, max_seq_len=64, compile=True)
    assert sum(len(set(out)) for out in eager) > 30  # real sequences, not one token repeated
    assert compiled == eager


def test_engine_warmup_compiles_every_bucket_before_the_first_request():
    model = model_for("default")
    engine = Engine(model, max_batch=4, max_seq_len=32, compile=True)
    try:
        seconds = engine.warmup()
        assert engine.decoder is not None
        assert sorted(engine.decoder.compile_seconds) == [1, 2, 4]
        assert seconds >= sum(engine.decoder.compile_seconds.values()) * 0.99
        compiled_so_far = counters["stats"]["unique_graphs"]  # dynamo's own count of the graphs it made
        requests = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0))
                    for p, n in zip(prompts([3, 9, 4, 6, 2]), [4, 9, 2, 7, 5], strict=True)]  # fmt: skip
        while not engine.idle():  # 1 to 4 rows at a time, as requests join and leave
            engine.step()
        assert [len(r.tokens) for r in requests] == [4, 9, 2, 7, 5]
        assert sorted(engine.decoder.compile_seconds) == [1, 2, 4]
        # no graph compiled after the warm-up: the requests' tensors are the ones it compiled for
        assert counters["stats"]["unique_graphs"] == compiled_so_far
    finally:
        engine.close()
    assert model.cache_bytes() == 0


def test_the_compile_cache_is_a_folder_only_we_can_write(tmp_path, monkeypatch):
    """Inductor loads the libraries it finds in its cache: never from /tmp/torchinductor_<user>, which anyone could
    create first, nor from a folder others can write."""
    from nanollm.inference.compiled import CompileFailed

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "nanollm"))
    decoder = CompiledDecoder(model_for("default"), max_seq_len=16)
    assert decoder.cache_dir == (tmp_path / "nanollm" / "inductor").resolve()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(decoder.cache_dir)
    assert stat.S_IMODE(decoder.cache_dir.stat().st_mode) == 0o700
    decoder.close()

    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(planted))
    with pytest.raises(CompileFailed, match=r"refused to compile .*/planted is writable by group or others \(mode 7"):
        CompiledDecoder(model_for("default"), max_seq_len=16)
