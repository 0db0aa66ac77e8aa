"""The compiled decode step: one call into generated code per token, over a static KV cache.

Owns the static cache's shape (max_batch rows of max_seq_len positions, set up once), the
compiled step over it, the batch buckets it is compiled for and the compile-time ledger.
What a step computes is the model's (Transformer.forward with a RaggedStep over the whole
cache); prefill stays eager and is its callers' (generate.py, engine.py), as is sampling.

Why: a decode step of the default model is a few hundred thousand multiply-adds spread over
~100 small ops, so eager mode spends most of a token in dispatch. torch.compile (inductor)
turns the step into fused C++/OpenMP loops. Fixed shapes are what make one compiled graph
serve every step: the cache is read whole, masked past each row's position
(RaggedStep.over_cache), so the position is data, not a shape. A batch of B rows runs in the
smallest bucket >= B (powers of two up to max_batch), the spare rows computing into cache
rows nobody reads, so a server compiles a handful of graphs, not one per batch size.

Our settings, passed per compile and never set globally (benchmarks/compiled_step.py takes
each one back in turn and measures what it buys):
- decompose_mm_pass: a matmul of one row (batch-1 decoding) becomes a product and a sum,
  which inductor fuses with the norms, RoPE and the value mix around it instead of calling
  BLAS once per weight;
- cpp_wrapper: the generated code calls its kernels from C++, not from a Python wrapper
  function, which at ~30 kernels a step is a fixed cost per token;
- tensor guards only (tensor_guards_only): before each call dynamo checks that the step's
  inputs still look as they did when it was compiled. The checks on tensors (shape, dtype,
  strides, device) stay: they are what sends a batch to its bucket's graph. The checks on
  Python objects go: the modules' identities and attributes, globals, the grad mode. A
  decoder is built for one model and calls it only under inference mode, so those never
  change under it, and checking them took a tenth of a batch-1 step. What this asks of
  callers: don't change the model's structure (swap or quantize its modules, drop its
  packs) once a decoder is built over it; build a new decoder instead. Weights changed in
  place are read as they are: they are the graph's inputs, not constants;
- the compile is fullgraph: a graph break is an error here, not a silent slowdown
  (tests/test_compiled.py checks there is none with torch._dynamo.explain).

Compiling costs seconds per bucket the first time on a machine; inductor keeps the compiled
code in its cache, so a second process pays far less. compile_seconds records what each
bucket cost in this process. That cache holds shared libraries the process loads, so it must
be a folder no one else can write: inductor's default, /tmp/torchinductor_<user>, is a name
anyone on the machine could create first. The decoder points inductor at
<nanollm's cache>/inductor instead, or checks the folder TORCHINDUCTOR_CACHE_DIR names, and
refuses to compile with any other (nanollm/private.py, as for the int8 kernel's folder).
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nanollm.errors import NanollmError, first_line
from nanollm.model.attention import RaggedStep
from nanollm.private import NotPrivate, private_inductor_cache

__all__ = [
    "COMPILE_OPTIONS",
    "CompileFailed",
    "CompiledDecoder",
    "INDUCTOR_OPTIONS",
    "batch_buckets",
    "tensor_guards_only",
]

log = logging.getLogger(__name__)

INDUCTOR_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "cpp_wrapper": True}


def tensor_guards_only(guards: Sequence) -> list[bool]:
    """Dynamo's guard filter for the decode step: keep the checks on tensors, drop the rest (module docstring)."""
    return [guard.guard_type == "TENSOR_MATCH" for guard in guards]


# What the decode step compiles with: the inductor settings and the guard filter.
COMPILE_OPTIONS = {**INDUCTOR_OPTIONS, "guard_filter_fn": tensor_guards_only}


class CompileFailed(NanollmError):
    """torch.compile could not build the decode step here: most often no working C++ compiler (inductor's CPU
    code needs one: g++, or clang++ on macOS, or $CXX)."""


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a step is compiled for: powers of two below max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


def _step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1), positions (B,) int64 -> logits (B, V): one token per row against the whole cache."""
    span = model.layers[0].attention.cache.k.size(2)
    return model(tokens, RaggedStep.over_cache(positions, span))[:, -1, :]  # (B, V)


def _own_step() -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """_step under a code object of its own.

    Dynamo keeps compiled graphs per code object and stops compiling one past its recompile
    limit (8), running it eagerly from then on. Every decoder specialises on its model and
    cache shape, so a process holding several (the bench, a test session) would share one
    count; a copy per decoder keeps each one's graphs its own.
    """
    code = _step.__code__.replace()  # a new code object, the same bytecode
    return types.FunctionType(code, _step.__globals__, _step.__name__, _step.__defaults__, _step.__closure__)


class CompiledDecoder:
    """A model's static KV cache and its compiled decode step; call it as decoder(tokens, positions).

    Setting it up allocates a cache (Transformer.setup_cache(max_batch, max_seq_len)) that the
    decoder keeps until close(), and moves the weights to their decode layout. The model has
    one cache slot, which eager decoding (generate without a decoder) replaces and clears:
    attach() puts the decoder's cache back, the same objects each time, so the compiled
    graph's guards still hold; generate and the engine attach before they prefill. Rows are
    the cache's: a caller prefills row r eagerly (model.cache_rows(r, r + 1), or rows [0, B)
    at batch B) and then decodes it here. Greedy tokens equal the eager path's up to
    floating-point rounding (fused loops add in another order), the same contract as the
    batching engine's.
    """

    def __init__(self, model: nn.Module, *, max_batch: int = 1, max_seq_len: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or model.cfg.block_size
        self.buckets = batch_buckets(max_batch)
        self.device = next(model.parameters()).device
        self.compile_seconds: dict[int, float] = {}  # bucket -> seconds its first call took
        try:  # before anything compiles
            self.cache_dir = private_inductor_cache("the decode step", "decode eagerly (--no-compile)")
        except NotPrivate as err:
            raise CompileFailed(str(err)) from None
        with torch.inference_mode():
            model.pack_for_decode()  # the compiled graph trusts the packs (packing.py): pack first
            model.setup_cache(max_batch, self.max_seq_len)
        self._caches = [layer.attention.cache for layer in model.layers]
        self._compiled = torch.compile(_own_step(), fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)

    def attach(self) -> None:
        """Make the decoder's cache the model's again (eager decoding in between replaces it)."""
        for layer, cache in zip(self.model.layers, self._caches, strict=True):
            if layer.attention.cache is not cache:
                layer.attention.cache = cache

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows` rows."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed the decoder's max_batch of {self.max_batch}")

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """tokens (B, 1) at positions (B,) in rows [0, B) -> logits (B, V) fp32, B <= max_batch."""
        rows = tokens.size(0)
        if not tokens.is_inference():  # made outside inference mode: another dispatch key, so another graph
            tokens = tokens.clone()
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.device).view(rows)
        if not positions.is_inference():
            positions = positions.clone()
        b = self.bucket(rows)
        if b != rows:  # spare rows decode token 0 at position 0 of rows nobody reads
            tokens = torch.cat([tokens, tokens.new_zeros(b - rows, 1)])
            positions = torch.cat([positions, positions.new_zeros(b - rows)])
        if b in self.compile_seconds:
            return self._compiled(self.model, tokens, positions)[:rows]
        start = time.perf_counter()
        # one graph per bucket is expected: room for them all under dynamo's limit (8 by default), which
        # only a new graph is checked against
        limit = max(torch._dynamo.config.recompile_limit, len(self.buckets))
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                logits = self._compiled(self.model, tokens, positions)  # the first call at this bucket compiles
        except Exception as err:
            raise CompileFailed(
                f"compiling the decode step failed ({first_line(err)}); install a C++ compiler or set CXX to one, "
                "or decode eagerly (--no-compile; bench.compile: false)"
            ) from None
        self.compile_seconds[b] = time.perf_counter() - start
        log.info("compiled the decode step for batch %d in %.1f s", b, self.compile_seconds[b])
        return logits[:rows]

    def warmup(self, buckets: Sequence[int] | None = None) -> float:
        """Compile every bucket now (a server does, so no request waits for a compile); returns the seconds.

        Each compile runs a real step on row 0 at position 0, which a prefill then overwrites.
        """
        self.attach()
        start = time.perf_counter()
        for b in buckets or self.buckets:
            if b not in self.compile_seconds:  # __call__ makes its tensors inference tensors, as every step's are
                self(torch.zeros(b, 1, dtype=torch.long, device=self.device), [0] * b)
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the cache (the model's too, when it holds the decoder's)."""
        if all(layer.attention.cache is cache for layer, cache in zip(self.model.layers, self._caches, strict=True)):
            self.model.clear_cache()
        self._caches = []
