"""nanollm.training.optim: Muon's orthogonalised updates and its parameter split, its AdamW half, the schedules."""

import pytest
import torch

from nanollm.config import ModelConfig, TrainConfig
from nanollm.model import Transformer
from nanollm.training.optim import Muon, lr_at, make_optimizer, muon_momentum_at, muon_param_groups, orthogonalize


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **overrides}), 64)


@pytest.mark.parametrize("shape", [(64, 64), (64, 176), (176, 64)])
def test_newton_schulz_makes_every_singular_value_about_one(shape):
    """A gradient whose singular values span two decades comes out with all of them near one.

    (Five quintic steps multiply a small singular value by up to 3.4445^5 ~ 480 after the
    Frobenius normalisation, so directions 100x weaker than the strongest still reach the band;
    a direction weaker still stays small, as in every Muon.)
    """
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    g = 3.0 * u @ torch.diag(torch.logspace(-2, 0, k)) @ v.T  # (rows, cols), condition number 100
    out = orthogonalize(g)
    singular = torch.linalg.svdvals(out)
    # the quintic's band (Keller Jordan): every direction moves by about one, none by more than ~1.2
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    assert out.shape == g.shape
    # and it is U V^T's direction: the singular vectors are kept
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), (u @ v.T).flatten(), dim=0)
    assert cosine > 0.95


def test_muon_update_on_a_matrix_is_orthogonalised():
    """With no momentum history, lr 1 and no decay, the step on a 2-D weight is -sqrt(max(1, out/in)) U V^T."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(48, 32))
    before = weight.detach().clone()
    weight.grad = torch.randn(48, 32)  # tall and random: singular values within a factor ~10 of each other
    optimizer = Muon([{"params": [weight], "use_muon": True, "max_lr": 1.0}], momentum=0.0)
    optimizer.param_groups[0]["lr"] = 1.0
    optimizer.step()
    update = (before - weight.detach()) / (48 / 32) ** 0.5
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    # the same direction as U V^T of the gradient (cosine similarity near 1)
    u, _, vh = torch.linalg.svd(weight.grad, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(update.flatten(), (u @ vh).flatten(), dim=0)
    assert cosine > 0.95


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    model = _model(tie_embeddings=tied)
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    groups = muon_param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["use_muon"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    muon = by_kind[(True, 0.1)]
    assert muon == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {"layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"} <= muon
    adamw = set().union(*(v for (use_muon, _), v in by_kind.items() if not use_muon))
    assert "tok_embeddings.weight" in adamw and "norm.weight" in adamw and "layers.0.attention_norm.weight" in adamw
    assert ("output.weight" in adamw) == (not tied)  # an untied head is Adam's, decayed as a matrix
    if not tied:
        assert "output.weight" in by_kind[(False, 0.1)]
    assert len(muon) + len(adamw) == len(list(model.parameters()))  # each parameter exactly once
    assert {g["max_lr"] for g in groups if g["use_muon"]} == {0.02}
    assert {g["max_lr"] for g in groups if not g["use_muon"]} == {3e-3}


def test_muons_adamw_half_equals_torch_adamw():
    torch.manual_seed(2)
    ours, theirs = torch.nn.Parameter(torch.randn(20, 8)), torch.nn.Parameter(torch.randn(20, 8))
    with torch.no_grad():
        theirs.copy_(ours)
    mine = Muon([{"params": [ours], "use_muon": False, "max_lr": 1e-2, "weight_decay": 0.1}], betas=(0.9, 0.95))
    mine.param_groups[0]["lr"] = 1e-2
    reference = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for step in range(5):
        grad = torch.randn(20, 8, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_make_optimizer_picks_by_config_and_sets_each_groups_peak():
    model = _model()
    adamw = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and {g["max_lr"] for g in adamw.param_groups} == {3e-3}
    muon = make_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.05), torch.device("cpu"))
    assert isinstance(muon, Muon) and {g["max_lr"] for g in muon.param_groups} == {0.05, 3e-3}


def test_wsd_is_warmup_then_constant_then_a_linear_cooldown():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110, schedule="wsd", cooldown_frac=0.2)
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(0.5)
    assert all(lr_at(s, cfg) == 1.0 for s in range(10, 91))  # stable until the last 20 steps
    assert lr_at(100, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == 0.0  # linear to min_lr
    cooldown = [lr_at(s, cfg) for s in range(90, 111)]
    steps = {round(a - b, 9) for a, b in zip(cooldown, cooldown[1:], strict=False)}
    assert steps == {0.05}  # the same decrement every step: linear


def test_muon_momentum_warms_up_linearly_from_085_then_stays():
    cfg = TrainConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=100)
    assert muon_momentum_at(0, cfg) == pytest.approx(0.85) and muon_momentum_at(50, cfg) == pytest.approx(0.90)
    assert all(muon_momentum_at(s, cfg) == 0.95 for s in (100, 101, 5000))
    assert muon_momentum_at(0, TrainConfig(muon_momentum=0.95)) == 0.95  # no warmup: flat from the start
    low = TrainConfig(muon_momentum=0.5, muon_momentum_warmup=10)
    assert {muon_momentum_at(s, low) for s in range(12)} == {0.5}  # never above the target


def test_the_loop_steps_muons_momentum_and_ns_steps_reach_the_update():
    """train() sets the Muon group's momentum every step; muon_ns_steps changes the orthogonalisation."""
    from nanollm.training.loop import train

    data = torch.randint(0, 64, (2000,)).numpy()
    cfg = TrainConfig(
        optimizer="muon", batch_size=2, max_steps=3, warmup_steps=0, eval_interval=3, eval_batches=1,
        log_interval=1, checkpoint_interval=0, muon_momentum_warmup=10, device="cpu", dtype="float32",
    )  # fmt: skip
    result = train(_model(), data, data, cfg, seed=0)
    muon = next(g for g in result.optimizer.param_groups if g["use_muon"])
    assert muon["momentum"] == pytest.approx(muon_momentum_at(3, cfg))

    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    updates = {}
    for steps in (1, 5):
        weight = torch.nn.Parameter(torch.zeros(32, 48))
        weight.grad = g.clone()
        optimizer = make_optimizer(_model(), TrainConfig(optimizer="muon", muon_ns_steps=steps), torch.device("cpu"))
        optimizer.param_groups[0]["params"] = [weight]
        optimizer.param_groups[0]["lr"] = 1.0
        optimizer.param_groups[0]["momentum"] = 0.0
        optimizer.step()
        updates[steps] = -weight.detach()
    assert torch.allclose(updates[5], orthogonalize(g, 5)) and torch.allclose(updates[1], orthogonalize(g, 1))
    assert not torch.allclose(updates[1], updates[5], atol=1e-3)
