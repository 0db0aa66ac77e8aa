"""Val-split metrics over a real memmap (loss, perplexity, accuracy, bits per byte) and compressor baselines."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from nanollm import evaluate
from nanollm.config import ModelConfig
from nanollm.evaluate import (
    compressor_bits_per_byte,
    evaluate_lm,
    lzma_with_context_bits_per_byte,
    text_tail,
    windows,
)
from nanollm.model import Transformer

V = 10
EOT = 9


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the test machine's cores are shared


class FixedLogits(nn.Module):
    """Predicts the same logits (V,) at every position, whatever the context."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, idx, start_pos=None):
        return self.logits.expand(*idx.shape, -1)  # (B, T, V)


def _memmap(tmp_path, ids):
    path = tmp_path / "val.bin"
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _token_bytes():
    lengths = np.arange(1, V + 1) % 4 + 1  # token i stands for 1-4 bytes
    lengths[EOT] = 0  # the document separator stands for no text
    return lengths


@pytest.mark.parametrize(("n", "block"), [(2, 4), (9, 4), (10, 4), (11, 4), (100, 7)])
def test_windows_predict_every_token_but_the_first_exactly_once(n, block):
    spans = windows(n, block)
    targets = [t for s, length in spans for t in range(s + 1, s + length + 1)]
    assert targets == list(range(1, n))
    assert all(0 < length <= block for _, length in spans)


def test_uniform_model_scores_ln_vocab(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V - 1, size=203)  # 202 predictions: 9 windows of 23 would not divide evenly
    tokens = _memmap(tmp_path, ids)
    tb = _token_bytes()
    got = evaluate_lm(FixedLogits(torch.zeros(V)), tokens, block_size=23, batch_size=4, token_bytes=tb)
    n_bytes = int(tb[ids[1:]].sum())
    assert got["tokens"] == 202
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(math.log(V))
    assert got["perplexity"] == pytest.approx(V)
    # every token costs ln V nats = log2 V bits, spread over the bytes it stands for
    assert got["bits_per_byte"] == pytest.approx(math.log2(V) * 202 / n_bytes)
    # argmax of equal logits is token 0
    assert got["accuracy"] == pytest.approx(np.mean(ids[1:] == 0))


def test_special_tokens_are_left_out_of_bits_per_byte(tmp_path):
    ids = [1, 2, 3, EOT, 4, 5, EOT, 6, 7, 8, EOT, 1]
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5, 1.5, 0.0, -2.0, 3.0])  # EOT cheapest to predict
    tb = _token_bytes()
    got = evaluate_lm(FixedLogits(logits), _memmap(tmp_path, ids), block_size=5, batch_size=2, token_bytes=tb)

    nll = (torch.logsumexp(logits, 0) - logits).double().numpy()  # nats to predict each token
    targets = np.array(ids[1:])
    text = targets != EOT
    assert got["loss"] == pytest.approx(nll[targets].mean())  # loss counts every prediction
    assert got["bytes"] == tb[targets].sum() == tb[targets[text]].sum()
    assert got["bits_per_byte"] == pytest.approx(nll[targets[text]].sum() / math.log(2) / tb[targets[text]].sum())
    assert got["accuracy"] == pytest.approx(np.mean(targets == EOT))


def test_max_tokens_truncates_the_split(tmp_path):
    ids = np.arange(50) % (V - 1)
    got = evaluate_lm(
        FixedLogits(torch.zeros(V)),
        _memmap(tmp_path, ids),
        block_size=8,
        batch_size=3,
        token_bytes=_token_bytes(),
        max_tokens=20,
    )
    assert got["tokens"] == 19


def test_batching_and_window_length_change_nothing_but_context(tmp_path):
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, init_std=0.2)
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size=V).eval()
    tokens = _memmap(tmp_path, np.random.default_rng(1).integers(0, V, size=61))
    kwargs = {"block_size": 8, "token_bytes": _token_bytes()}
    one = evaluate_lm(model, tokens, batch_size=1, **kwargs)
    many = evaluate_lm(model, tokens, batch_size=5, **kwargs)
    assert one["tokens"] == many["tokens"] == 60
    for key in ("loss", "bits_per_byte", "accuracy"):
        assert one[key] == pytest.approx(many[key], rel=1e-5)
    # a context-dependent model scores differently with other windows, so windows really are used
    assert evaluate_lm(model, tokens, batch_size=1, block_size=3, token_bytes=_token_bytes())["loss"] != pytest.approx(
        one["loss"], rel=1e-4
    )


def test_too_few_tokens(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_lm(
            FixedLogits(torch.zeros(V)), _memmap(tmp_path, [1]), block_size=4, batch_size=1, token_bytes=_token_bytes()
        )


def test_compressors_squeeze_repetition_and_not_noise():
    repetitive = compressor_bits_per_byte(b"def f(x):\n    return x\n" * 4000)
    noise = compressor_bits_per_byte(os.urandom(100_000))
    assert set(repetitive) == set(noise) == {"gzip", "bz2", "lzma"}
    assert all(v < 0.1 for v in repetitive.values())
    assert all(7.95 < v < 8.2 for v in noise.values())  # random bytes do not compress; headers cost a little


def test_compressor_figures_are_8_bits_times_the_ratio():
    import gzip

    data = bytes(range(256)) * 40 + b"tail"
    got = compressor_bits_per_byte(data)
    assert got["gzip"] == pytest.approx(8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data))
    with pytest.raises(ValueError, match="empty"):
        compressor_bits_per_byte(b"")


def test_xz_given_the_train_text_copies_what_it_has_seen():
    rng = np.random.default_rng(0)
    val = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()  # incompressible alone: ~8 bits per byte
    other = rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    alone = compressor_bits_per_byte(val)["lzma"]
    assert alone > 7.9
    assert lzma_with_context_bits_per_byte(val, other + val) < 0.1  # a copy of val in the context: nearly free
    unrelated = lzma_with_context_bits_per_byte(val, other)
    assert abs(unrelated - alone) < 0.1  # context that does not help costs (almost) nothing either


def test_xz_context_is_cut_to_the_window_it_can_see(monkeypatch):
    monkeypatch.setattr(evaluate, "LZMA_WINDOW", 30_000)
    rng = np.random.default_rng(1)
    val = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    # val sits 40 kB back in the context: beyond the (patched) window, so the context is cut and it cannot help
    assert lzma_with_context_bits_per_byte(val, val + bytes(40_000)) > 7.9
    with pytest.raises(ValueError, match="empty"):
        lzma_with_context_bits_per_byte(b"", b"abc")


@pytest.mark.parametrize("n", [0, 1, 5, 17, 40, 1000])
def test_text_tail_is_the_tail_of_the_whole_utf8_text(n):
    texts = ["déjà vu ", "", "x" * 9, "日本語のテキスト", "tail"]  # multi-byte characters may be cut mid-way, as bytes
    whole = "".join(texts).encode("utf-8")
    assert text_tail(iter(texts), n) == (whole[-n:] if n else b"")
