"""The continuous-batching engine: every sequence of a mixed batch decodes as it would alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from nanollm.checkpoint import seeded_model
from nanollm.config import ModelConfig
from nanollm.inference.engine import Engine, QueueFull, SamplingParams, generate_batch
from nanollm.inference.generate import decode_step, generate, prefill
from nanollm.inference.quantize import quantize_int8
from nanollm.model.attention import RaggedStep

VOCAB = 300
# A batched matmul may round differently from a batch-1 one (different blocking in the BLAS),
# so the argmax may flip where the top two logits are this close: the only divergence allowed.
NEAR_TIE = 1e-4

CONFIGS = {
    "default": ModelConfig(
        n_layer=2, n_head=4, n_embd=64, block_size=128, qk_norm=True, value_residual=True, value_embeddings=1
    ),
    "llama-gqa": ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128),
}


def model_for(name: str) -> torch.nn.Module:
    """A CONFIGS model; "<name>-int8": the same with int8 weights (nanollm's kernel where it runs, else aten's)."""
    model = seeded_model(CONFIGS[name.removesuffix("-int8")], VOCAB, seed=0).eval()
    return quantize_int8(model) if name.endswith("-int8") else model


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def greedy_alone(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Batch-1 greedy ids and, at each step, the gap between the top two logits."""
    model.setup_cache(1, len(prompt) + n)
    logits = prefill(model, torch.tensor([prompt]))
    ids, gaps = [], []
    for i in range(n):
        top2 = logits[0].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        ids.append(int(logits[0].argmax()))
        if i + 1 < n:
            logits = decode_step(model, torch.tensor([[ids[-1]]]), len(prompt) + i)
    model.clear_cache()
    return ids, gaps


def assert_same_unless_near_tie(batched: list[int], alone: list[int], gaps: list[float]) -> None:
    """Equal, or equal up to a step where batch-1's top two logits nearly tie (then anything may follow)."""
    for i, (a, b) in enumerate(zip(batched, alone, strict=True)):
        if a != b:
            assert gaps[i] < NEAR_TIE, f"diverged at token {i} with a top-2 gap of {gaps[i]:.2e}, not a near-tie"
            return


def test_ragged_step_matches_each_row_decoded_alone():
    model = model_for("default")
    prompts = random_prompts([3, 11, 6])
    with torch.inference_mode():
        alone = []
        for p in prompts:
            model.setup_cache(1, 32)
            model(torch.tensor([p]), 0)
            alone.append(model(torch.tensor([[5]]), len(p))[0, -1])
        model.setup_cache(4, 32)
        for row, p in enumerate(prompts):
            with model.cache_rows(row, row + 1):
                model(torch.tensor([p]), 0)
        batched = model(torch.tensor([[5]] * 3), RaggedStep.at([len(p) for p in prompts], torch.device("cpu")))
    for row in range(3):
        torch.testing.assert_close(batched[row, -1], alone[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [*sorted(CONFIGS), "default-int8"])
def test_greedy_batch_equals_batch_one_with_joins_and_leaves(name):
    """Mixed prompt lengths and budgets, more requests than rows: sequences join and leave mid-flight."""
    model = model_for(name)
    prompts = random_prompts([3, 17, 5, 40, 1, 9, 24])
    budgets = [20, 5, 30, 12, 25, 1, 16]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in budgets]
    batched = generate_batch(model, prompts, params, max_batch=3)
    for prompt, n, out in zip(prompts, budgets, batched, strict=True):
        assert len(out) == n
        alone, gaps = greedy_alone(model, prompt, n)
        assert_same_unless_near_tie(out, alone, gaps)


def test_seeded_sampling_equals_generate_with_the_same_seed():
    model = model_for("default")
    prompts = random_prompts([4, 9, 2])
    params = [SamplingParams(max_tokens=15, temperature=0.9, top_k=40, top_p=0.95, seed=10 + i) for i in range(3)]
    batched = generate_batch(model, prompts, params)
    for prompt, sp, out in zip(prompts, params, batched, strict=True):
        generator = torch.Generator().manual_seed(sp.seed)
        alone = generate(model, prompt, 15, temperature=0.9, top_k=40, top_p=0.95, generator=generator)
        assert out == list(alone)


def test_stop_id_ends_a_sequence_without_being_emitted():
    model = model_for("default")
    [prompt] = random_prompts([5])
    alone, _ = greedy_alone(model, prompt, 12)
    stop = alone[4]
    engine = Engine(model, max_batch=2, stop_id=stop)
    request = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0))
    while not engine.idle():
        engine.step()
    assert request.tokens == alone[: alone.index(stop)]
    assert request.finish_reason == "stop"
    assert list(request) == request.tokens
    engine.close()


def test_submit_refuses_what_cannot_fit():
    engine = Engine(model_for("default"), max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the context of 16 tokens"):
        engine.submit(list(range(10)), SamplingParams(max_tokens=7))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    engine.close()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cancel_frees_the_row_for_the_next_request():
    """One row: a cancelled request must leave it, or the second one would never run."""
    model = model_for("default")
    prompts = random_prompts([3, 4])
    with Engine(model, max_batch=1) as engine:
        first = engine.submit(prompts[0], SamplingParams(max_tokens=100, temperature=0))
        tokens = iter(first)
        next(tokens)
        first.cancel()
        second = engine.submit(prompts[1], SamplingParams(max_tokens=8, temperature=0))
        assert len(list(second)) == 8
        assert list(tokens) == first.tokens[1:]  # whatever came before the cancel, then the end
        assert first.finish_reason == "cancelled" and second.finish_reason == "length"
        wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["cancelled"] == 1


def test_async_readers_on_one_loop_each_get_their_own_tokens():
    model = model_for("default")
    prompts = random_prompts([2, 6, 3, 8])

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        with Engine(model, max_batch=4) as engine:
            requests = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0), loop=loop) for p in prompts]

            async def read(request) -> list[int]:
                return [token async for token in request]

            return await asyncio.gather(*(read(r) for r in requests))

    outputs = asyncio.run(main())
    for prompt, out in zip(prompts, outputs, strict=True):
        alone, gaps = greedy_alone(model, prompt, 10)
        assert_same_unless_near_tie(out, alone, gaps)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    model = model_for("default")
    [prompt] = random_prompts([4])
    with Engine(model, max_batch=2) as engine:
        bad = engine.submit([VOCAB + 5], SamplingParams(max_tokens=3))  # out of the embedding's range
        with pytest.raises(RuntimeError, match="failed in the engine"):
            list(bad)
        assert bad.finish_reason == "error"
        good = engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0))
        assert len(list(good)) == 3


def test_rows_at_one_position_take_the_plain_cached_step_and_still_match():
    """Equal prompt lengths and budgets: every step has the rows side by side, decoded without a mask."""
    model = model_for("default")
    prompts = random_prompts([6, 6, 6, 6], seed=3)
    batched = generate_batch(model, prompts, SamplingParams(max_tokens=12, temperature=0))
    for prompt, out in zip(prompts, batched, strict=True):
        alone, gaps = greedy_alone(model, prompt, 12)
        assert_same_unless_near_tie(out, alone, gaps)


def test_a_full_queue_refuses_at_once_and_a_cancelled_wait_gives_its_place_back():
    """max_batch 1 + max_queue 1: a third request is refused in submit(), never queued to wait without end."""
    model = model_for("default")
    prompts = random_prompts([3, 4, 5, 6])
    engine = Engine(model, max_batch=1, max_queue=1)  # not started: nothing leaves the queue by itself
    params = SamplingParams(max_tokens=4, temperature=0)
    first, second = engine.submit(prompts[0], params), engine.submit(prompts[1], params)
    with pytest.raises(QueueFull, match="1 requests run and 1 wait already"):
        engine.submit(prompts[2], params)
    engine.step()  # the first takes the row, the second still waits
    assert (engine.stats()["running"], engine.stats()["waiting"]) == (1, 1)
    with pytest.raises(QueueFull):
        engine.submit(prompts[2], params)
    second.cancel()  # a cancelled wait counts no more, and leaves the queue at the next step
    third = engine.submit(prompts[3], params)
    while not engine.idle():
        engine.step()
    assert (first.finish_reason, second.finish_reason, third.finish_reason) == ("length", "cancelled", "length")
    assert third.tokens == greedy_alone(model, prompts[3], 4)[0]
    engine.close()
    unbounded = Engine(model, max_batch=1)  # generate_batch's engine: no bound
    for prompt in prompts * 3:
        unbounded.submit(prompt, params)
    unbounded.close()


def test_a_request_past_its_deadline_leaves_the_batch_and_the_queue_and_the_next_one_runs():
    model = model_for("default")
    prompts = random_prompts([3, 4, 5])
    want = greedy_alone(model, prompts[2], 5)[0]  # also warms the model up: two steps take far less than 1 s
    engine = Engine(model, max_batch=1)  # stepped by hand: the deadlines pass between two steps
    running = engine.submit(prompts[0], SamplingParams(max_tokens=100, temperature=0), timeout=1.0)
    waiting = engine.submit(prompts[1], SamplingParams(max_tokens=100, temperature=0), timeout=1.0)
    patient = engine.submit(prompts[2], SamplingParams(max_tokens=5, temperature=0))
    engine.step()
    engine.step()
    assert running.finish_reason is None and len(running.tokens) == 3 and waiting.tokens == []  # prefill + 2 steps
    time.sleep(max(0.0, waiting.deadline - time.monotonic()) + 0.01)
    engine.step()  # both expire before this step decodes: the row goes to the patient one
    assert (running.finish_reason, waiting.finish_reason) == ("timeout", "timeout")
    assert len(running.tokens) == 3 and waiting.tokens == [] and list(running) == running.tokens
    assert engine.stats()["running"] == 1 and engine.stats()["timed_out"] == 2
    while not engine.idle():
        engine.step()
    assert patient.finish_reason == "length" and patient.tokens == want
    assert engine.stats()["finished"] == 1 and engine.stats()["cancelled"] == 0
    engine.close()
