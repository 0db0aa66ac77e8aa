"""Typed, documented configuration: one frozen dataclass per params.yaml section.

This module owns the schema and its validation. It imports only the standard library,
so it loads anywhere (the CLI validates params before importing torch). Reading
params.yaml from disk is the caller's job: `Config.from_dict` takes a plain mapping.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NO_VALUE",
    "ConfigError",
    "Config",
    "DataConfig",
    "TokenizerConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "BenchConfig",
    "TrackingConfig",
    "flatten",
]


class _NoValue:
    """ConfigError's value for a mistake that is not one bad value (a missing file, a pattern matching nothing)."""

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()


class ConfigError(ValueError):
    """A params value that is missing, unknown, of the wrong type or out of range.

    `str(err)` is one line: the dotted key (or the params file), the bad value and what is
    allowed; with value=NO_VALUE just the key and the reason ("params.yaml: params file not found").
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = key if key.isprintable() else key.encode("unicode_escape").decode("ascii")  # keep it one line
        super().__init__(f"{shown}: {allowed}" if value is NO_VALUE else f"{shown}: got {value!r}; {allowed}")


def _spec(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field with a docstring and validation rules (min, max, gt, choices)."""
    meta = {"doc": doc, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- sections

_DEVICE_DOC = "where to run the model: auto picks cuda, then mps, then cpu; or cpu, mps, cuda, cuda:N"


def _check_device(key: str, value: str) -> None:
    """The device names nanollm.hardware.pick_device takes (checked here too, so params fail before torch loads)."""
    kind, _, index = value.partition(":")
    if value == "auto" or (kind in ("cpu", "mps", "cuda") and not index) or (kind == "cuda" and index.isdigit()):
        return
    raise ConfigError(key, value, "must be auto, cpu, mps, cuda or cuda:N")


@dataclass(frozen=True)
class DataConfig:
    """Where the raw text comes from and how it is split into train and val documents."""

    source: str = _spec("stdlib", doc="corpus source", choices=("stdlib", "files", "hf"))
    paths: tuple[str, ...] = _spec(
        factory=tuple,
        doc="source=files: paths or globs; .jsonl and .parquet hold a document per line or row, any other "
        "file is one document if it is text (binary files are skipped and counted)",
    )
    text_field: str = _spec("text", doc="field/column holding the text in .jsonl, .parquet and hf data")
    hf_name: str = _spec(
        "Skylion007/openwebtext", doc="source=hf: dataset name on the Hugging Face hub, or a local folder"
    )
    hf_config: str | None = _spec(None, doc="source=hf: dataset configuration name")
    hf_split: str = _spec("train", doc="source=hf: split to read (streamed)")
    max_documents: int | None = _spec(None, doc="stop after this many documents (null: no limit)", min=1)
    max_bytes: int | None = _spec(None, doc="stop after this many UTF-8 bytes of text (null: no limit)", min=1)
    val_fraction: float = _spec(
        0.05, doc="share of documents held out for validation, chosen by a seeded hash", gt=0.0, max=0.5
    )
    shard_mb: int = _spec(64, doc="split each text output into shards of about this many MB", min=1)
    near_dup_threshold: float | None = _spec(
        0.5,
        doc="documents whose estimated Jaccard similarity (of word shingles) is at least this, directly or "
        "through a chain, form a family that the split keeps on one side (null: split each document alone)",
        gt=0.0,
        max=1.0,
    )
    near_dup_num_perm: int = _spec(
        128,
        doc="MinHash slots per document: the similarity estimate's sd is ~sqrt(J(1-J)/num_perm) (0.044 at "
        "J=0.5 with 128); the index holds ~3.4 KB per document at the defaults, mostly LSH bands",
        min=16,
        max=1024,
    )
    near_dup_shingle: int = _spec(
        5, doc="words per shingle: fewer also match documents that only share short phrases", min=1, max=64
    )


@dataclass(frozen=True)
class TokenizerConfig:
    """The byte-level BPE tokenizer (or tiktoken's GPT-2 encoding when available locally)."""

    kind: str = _spec("bpe", doc="bpe: train our own; gpt2: tiktoken's GPT-2 encoding", choices=("bpe", "gpt2"))
    vocab_size: int = _spec(
        4096,
        doc="tokens in the vocabulary, the 256 bytes and the special tokens included (kind=bpe)",
        min=1,
        max=2**20,  # ids must fit the uint32 memmaps with room to spare; GPT-4o's is ~200k
    )
    split_pattern: str = _spec("gpt4", doc="pre-tokenizer regex", choices=("gpt2", "gpt4"))
    special_tokens: tuple[str, ...] = _spec(
        factory=lambda: ("<|endoftext|>",), doc="special tokens; the first separates documents"
    )

    def __post_init__(self) -> None:
        if not self.special_tokens:
            raise ConfigError("tokenizer.special_tokens", list(self.special_tokens), "needs at least <|endoftext|>")
        if len(set(self.special_tokens)) != len(self.special_tokens) or not all(self.special_tokens):
            raise ConfigError(
                "tokenizer.special_tokens", list(self.special_tokens), "must be distinct non-empty strings"
            )
        floor = 256 + len(self.special_tokens)
        if self.kind == "bpe" and self.vocab_size < floor:
            raise ConfigError(
                "tokenizer.vocab_size",
                self.vocab_size,
                f"must be >= {floor} (256 bytes + {len(self.special_tokens)} special tokens)",
            )


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder-only Transformer. The vocabulary size comes from the tokenizer."""

    n_layer: int = _spec(4, doc="Transformer blocks", min=1)
    n_head: int = _spec(4, doc="attention heads (query)", min=1)
    n_kv_head: int | None = _spec(None, doc="key/value heads for grouped-query attention (null: n_head)", min=1)
    n_embd: int = _spec(256, doc="residual stream width", min=8)
    block_size: int = _spec(256, doc="training context length in tokens", min=8)
    mlp: str = _spec(
        "swiglu",
        doc="feed-forward type: swiglu (Llama's), gelu (GPT-2's) or relu2 (w2(relu(w1 x)^2), modded-nanogpt's: "
        "two matrices like gelu, cheaper to compute; gelu and relu2 do not export to Llama)",
        choices=("swiglu", "gelu", "relu2"),
    )
    mlp_hidden: int | None = _spec(
        None,
        doc="MLP hidden width (null: 8/3*n_embd rounded up to 64 for swiglu, 4*n_embd for gelu and relu2)",
        min=1,
    )
    tie_embeddings: bool = _spec(True, doc="share the token embedding with the LM head")
    attention: str = _spec(
        "sdpa",
        doc="attention backend: sdpa (PyTorch's fused kernels, fastest), flash (our from-scratch tiled "
        "FlashAttention: O(T) memory, slower on CPU), naive (the T x T reference)",
        choices=("sdpa", "flash", "naive"),
    )
    rope_theta: float = _spec(10000.0, doc="RoPE base frequency", gt=0.0)
    norm_eps: float = _spec(1e-5, doc="RMSNorm epsilon", gt=0.0)
    init_std: float = _spec(0.02, doc="std of the normal weight init", gt=0.0)
    # Options from modded-nanogpt's record runs; all off is the plain Llama block above.
    qk_norm: bool = _spec(
        False,
        doc="RMSNorm each head's queries and keys (learned gain per head dimension) before RoPE: bounded "
        "attention logits, steadier at high learning rates; exports as Qwen3 (docs/export.md)",
    )
    zero_init_proj: bool = _spec(
        False, doc="start attention wo and MLP w2 at zero, so every block starts as the identity; exports to Llama"
    )
    logit_softcap: float | None = _spec(
        None,
        doc="squash the LM head's logits to cap * tanh(logits / cap) (modded-nanogpt: 15 to 30; null: off); "
        "meant with tie_embeddings: false; exports as the custom form only",
        gt=0.0,
    )
    value_residual: bool = _spec(
        False,
        doc="mix every later layer's attention values with the first layer's, v = a v + b v_first, "
        "a and b learned per layer from 0.5 (ResFormer); exports as the custom form only",
    )
    value_embeddings: int = _spec(
        0,
        doc="extra token-embedding tables added to attention values (modded-nanogpt): table j feeds layers j "
        "and n_layer-1-j as v + c ve, c learned per layer from 0.5; at most n_layer/2 rounded up (0: off); "
        "vocab x n_kv_head*head_dim parameters each; exports as the custom form only",
        min=0,
    )
    unet_skips: bool = _spec(
        False,
        doc="U-net skips (modded-nanogpt): layer i's output is added, times a learned weight from 1, to the "
        "input of layer n_layer-1-i for the first n_layer/2 layers; exports as the custom form only",
    )

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError("model.n_embd", self.n_embd, f"must be divisible by model.n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError("model.n_embd", self.n_embd, "n_embd / n_head must be even for RoPE")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError("model.n_kv_head", self.n_kv_head, f"must divide model.n_head ({self.n_head})")
        if self.value_embeddings > -(-self.n_layer // 2):
            raise ConfigError(
                "model.value_embeddings",
                self.value_embeddings,
                f"must be at most n_layer/2 rounded up ({-(-self.n_layer // 2)}): table j feeds layers j and "
                "n_layer-1-j",
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.n_embd
        # SwiGLU has three matrices, so 8/3 * n_embd keeps the parameter count of a 4x GELU
        # MLP; rounding up to a multiple of 64 keeps matmul shapes friendly.
        return -(-int(8 * self.n_embd / 3) // 64) * 64


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop: AdamW or Muon, warmup then cosine or WSD, accumulation, clipping."""

    batch_size: int = _spec(16, doc="sequences per micro-batch: the most one process forwards at once", min=1)
    grad_accum: int = _spec(
        1,
        doc="micro-batches per optimizer step, summed over all processes: the effective batch is "
        "batch_size * grad_accum sequences whatever the world size (fewer micro-batches than processes: "
        "each process takes one, of its equal share)",
        min=1,
    )
    max_steps: int = _spec(650, doc="optimizer steps", min=1)
    small_batch_steps: int = _spec(
        0,
        doc="the first this many steps train on the first half of each micro-batch's sequences (more, smaller "
        "steps early: raise max_steps by half this to keep the tokens); 0: off",
        min=0,
    )
    optimizer: str = _spec(
        "adamw",
        doc="adamw: AdamW on every parameter; muon: Muon (orthogonalised momentum) on the blocks' matrices "
        "at muon_lr, AdamW on the embedding, the LM head and the norms at lr",
        choices=("adamw", "muon"),
    )
    lr: float = _spec(3e-3, doc="peak learning rate (of AdamW's parameters)", gt=0.0, max=1.0)
    min_lr: float = _spec(3e-4, doc="learning rate at the end of the schedule (scaled alike for Muon)", min=0.0)
    muon_lr: float = _spec(0.02, doc="optimizer=muon: peak learning rate of the matrices", gt=0.0, max=1.0)
    muon_momentum: float = _spec(0.95, doc="optimizer=muon: Nesterov momentum of the matrices", min=0.0, max=0.999)
    muon_momentum_warmup: int = _spec(
        0,
        doc="optimizer=muon: steps over which the momentum rises linearly from 0.85 to muon_momentum "
        "(modded-nanogpt's: 300); 0: muon_momentum from the first step",
        min=0,
    )
    muon_ns_steps: int = _spec(
        5, doc="optimizer=muon: Newton-Schulz iterations that orthogonalise each update (fewer: cheaper, rougher)",
        min=1, max=20,
    )  # fmt: skip
    schedule: str = _spec(
        "cosine",
        doc="after warmup: cosine (decay to min_lr over all steps) or wsd (constant, then a linear "
        "cooldown to min_lr over the last cooldown_frac of the steps)",
        choices=("cosine", "wsd"),
    )
    cooldown_frac: float = _spec(
        0.3, doc="schedule=wsd: share of the steps after warmup spent cooling down", gt=0.0, max=1.0
    )
    warmup_steps: int = _spec(50, doc="steps of linear warmup from 0 to lr", min=0)
    weight_decay: float = _spec(0.1, doc="AdamW decay on matrices (never on norms or embeddings)", min=0.0)
    beta1: float = _spec(0.9, doc="AdamW beta1", min=0.0, max=0.999999)
    beta2: float = _spec(0.95, doc="AdamW beta2", min=0.0, max=0.999999)
    grad_clip: float = _spec(1.0, doc="clip the global gradient norm to this (0: no clipping)", min=0.0)
    ema_decay: float | None = _spec(
        None,
        doc="e.g. 0.99: keep an exponential moving average of the weights and save it as the final model "
        "(nanollm/training/average.py); null: the last step's weights",
        gt=0.0, max=0.9999,
    )  # fmt: skip
    eval_interval: int = _spec(100, doc="steps between val-loss estimates", min=1)
    eval_batches: int = _spec(10, doc="micro-batches per val-loss estimate", min=1)
    log_interval: int = _spec(10, doc="steps between logged step metrics", min=1)
    device: str = _spec("auto", doc=_DEVICE_DOC)
    dtype: str = _spec(
        "auto",
        doc="compute dtype, via autocast for bf16/fp16; auto: bf16 where the hardware has native bf16, else fp32",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    checkpoint_interval: int = _spec(
        100, doc="steps between resumable checkpoints in the output folder (0: only the final one)", min=0
    )
    compile: bool = _spec(
        False,
        doc="torch.compile the model (minutes of compilation; faster steps on GPUs); its compiled code is kept "
        "in a folder only you can write (~/.cache/nanollm/inductor, or TORCHINDUCTOR_CACHE_DIR, checked)",
    )
    activation_checkpointing: bool = _spec(
        False, doc="recompute each block's activations in backward: ~1/3 more compute for a fraction of the memory"
    )

    def __post_init__(self) -> None:
        _check_device("train.device", self.device)
        if self.min_lr > self.lr:
            raise ConfigError("train.min_lr", self.min_lr, f"must be <= train.lr ({self.lr})")
        if self.warmup_steps > self.max_steps:
            raise ConfigError("train.warmup_steps", self.warmup_steps, f"must be <= train.max_steps ({self.max_steps})")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out metrics and text samples."""

    batch_size: int = _spec(16, doc="sequences per forward pass", min=1)
    max_tokens: int | None = _spec(None, doc="evaluate at most this many val tokens (null: all)", min=1)
    prompts: tuple[str, ...] = _spec(
        factory=lambda: ("import ", "def main():\n", "class Parser:\n    def "), doc="fixed prompts for samples"
    )
    sample_tokens: int = _spec(128, doc="new tokens per sample", min=1)
    temperature: float = _spec(0.8, doc="sampling temperature (0: greedy)", min=0.0)
    top_k: int | None = _spec(50, doc="sample among the k most likely tokens (null: all)", min=1)
    top_p: float | None = _spec(None, doc="nucleus sampling threshold (null: off)", gt=0.0, max=1.0)
    int8: bool = _spec(True, doc="also score an int8-weight copy of the model on the same val tokens (docs/serving.md)")
    device: str = _spec("auto", doc=_DEVICE_DOC + " (also nanollm generate's default)")

    def __post_init__(self) -> None:
        _check_device("eval.device", self.device)


@dataclass(frozen=True)
class BenchConfig:
    """The KV-cache benchmark: greedy decoding with and without the cache."""

    prompt_lengths: tuple[int, ...] = _spec(factory=lambda: (16, 128, 512), doc="prompt lengths in tokens", min=1)
    new_tokens: tuple[int, ...] = _spec(factory=lambda: (256,), doc="tokens generated per measurement", min=1)
    repeats: int = _spec(2, doc="timed repetitions per point (the median is reported)", min=1)
    warmup: int = _spec(1, doc="untimed repetitions before timing", min=0)
    min_seconds: float = _spec(
        0.0,
        doc="within each timed round, a setting decodes again until its runs add up to this many seconds, each "
        "run a sample: the fast settings (compiled, a few ms a token) get enough for a steady median",
        min=0.0,
    )
    compare_transformers: bool = _spec(
        True, doc="also time transformers' generate on the same weights (LlamaForCausalLM) in every round"
    )
    int8: bool = _spec(True, doc="also time the batched measurements with int8 weights (nanollm.inference.quantize)")
    compile: bool = _spec(
        True,
        doc="also time the compiled decode step (nanollm.inference.compiled) at every point and batch size; "
        "its first call at each shape compiles, in the untimed warm-up (compile_s reports it)",
    )
    batch_sizes: tuple[int, ...] = _spec(
        factory=lambda: (1, 4, 16),
        doc="sequences the batching engine decodes at once, one measurement each ([]: none)",
        min=1,
    )
    batch_prompt_len: int = _spec(128, doc="prompt tokens of each sequence in the batched measurements", min=1)
    batch_new_tokens: int = _spec(128, doc="tokens each sequence decodes in the batched measurements", min=1)

    device: str = _spec("auto", doc=_DEVICE_DOC)

    def __post_init__(self) -> None:
        _check_device("bench.device", self.device)
        for key in ("prompt_lengths", "new_tokens"):
            if not getattr(self, key):
                raise ConfigError(f"bench.{key}", [], "needs at least one value")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. MLFLOW_TRACKING_URI, when set, overrides `uri`."""

    enabled: bool = _spec(True, doc="log runs to MLflow")
    uri: str | None = _spec(None, doc="tracking URI (null: sqlite:///<project root>/mlflow.db)")
    experiment: str = _spec("nanollm", doc="MLflow experiment name")
    system_metrics: bool = _spec(True, doc="sample CPU/memory/GPU into system/* metrics during pretrain")
    system_metrics_interval: float = _spec(10.0, doc="seconds between system-metric samples", gt=0.0)
    log_model: bool = _spec(
        True,
        doc="evaluate logs the checkpoint and tokenizer as the run's MLflow model `model` (a pyfunc that "
        "mlflow models serve and `nanollm register` take), with nanollm's code inside it; false saves its "
        "size per experiment in the store (docs/experiments.md)",
    )


@dataclass(frozen=True)
class Config:
    """All of params.yaml."""

    seed: int = _spec(1337, doc="seeds the data split, initialisation, batches and sampling", min=0)
    threads: int | None = _spec(
        None,
        doc="CPU threads of every stage (null: the CPUs divided among this node's torchrun processes and dvc "
        "queue workers); no stage depends on it, so changing it re-runs nothing",
        min=1,
    )
    data: DataConfig = _spec(factory=DataConfig, doc="corpus")
    tokenizer: TokenizerConfig = _spec(factory=TokenizerConfig, doc="tokenizer")
    model: ModelConfig = _spec(factory=ModelConfig, doc="model architecture")
    train: TrainConfig = _spec(factory=TrainConfig, doc="training")
    eval: EvalConfig = _spec(factory=EvalConfig, doc="evaluation")
    bench: BenchConfig = _spec(factory=BenchConfig, doc="KV-cache benchmark")
    tracking: TrackingConfig = _spec(factory=TrackingConfig, doc="MLflow")

    @classmethod
    def from_dict(cls, raw: Any) -> Config:
        """Build and validate a Config; raises ConfigError naming the first bad key."""
        return _build(cls, raw, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


# ---------------------------------------------------------------------------- parsing


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, "must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{prefix}{key}", raw[key], f"unknown key; known keys here: {known}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", f.metadata)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, meta: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, meta)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"must be a list of {args[0].__name__}")
        return tuple(_coerce(args[0], v, key, meta) for v in value)
    return _check_scalar(hint, value, key, meta)


def _check_scalar(hint: type, value: Any, key: str, meta: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, value, "must be a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, value, "must be one of " + ", ".join(map(str, meta["choices"])))
    if "min" in meta and value < meta["min"]:
        raise ConfigError(key, value, f"must be >= {meta['min']}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(key, value, f"must be > {meta['gt']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(key, value, f"must be <= {meta['max']}")
    return value


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_layer': 4}} -> {'model.n_layer': 4}; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
