"""What the machine offers training: the device, the compute dtype, its peak FLOP/s, TF32.

The training loop (nanollm/train.py) asks these questions; how much memory a run will need
is nanollm/memory.py's business, and process groups are nanollm/distributed.py's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator

import torch

from nanollm.errors import NanollmError

# Dense peak FLOP/s per GPU (vendor spec sheets, no sparsity): (bf16/fp16 tensor cores, plain fp32).
# Matched by substring of torch.cuda.get_device_name, first hit wins, so longer names come first.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("H200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: cuda if available, then mps, then cpu. An explicit device that is absent is an error.

    Under torchrun each process of a node takes the GPU numbered by its LOCAL_RANK.
    """
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise NanollmError(f"train.device is {name!r} but this machine has none; set train.device: auto or cpu")
    if name == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise NanollmError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "lower torchrun --nproc_per_node"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for train.dtype; "auto" picks bf16 wherever the hardware runs it natively.

    auto: bf16 on CUDA when supported (else fp16 with loss scaling); on a CPU, bf16 when oneDNN
    has native bf16 kernels (AVX512-BF16/AMX: 1.6x the fp32 tokens/s of the default model on
    our 2-core EPYC), else fp32, where emulated bf16 would be slower; fp32 on MPS. The choice
    depends only on the hardware, so a seeded run stays repeatable on the same machine.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def fast_fp32_matmuls(device: torch.device) -> Iterator[None]:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores for the duration; restore after.

    TF32 keeps fp32's range with a 10-bit mantissa: ~8x the fp32 matmul rate on A100/H100 for
    a loss curve indistinguishable from fp32 (nanoGPT, PyTorch's own default for cuDNN).
    Under bf16 autocast it only touches the few fp32 matmuls left. Set here, not at import,
    so importing nanollm changes no global state.
    """
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@functools.cache
def cpu_matmul_peak(threads: int, size: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a (size x size) matmul in `dtype` on the CPU with `threads` threads (cached).

    Takes ~0.15 s once. CPUs publish no usable peak, so MFU on a CPU is relative to what
    torch's own best-case GEMM reaches here (~165 GFLOP/s on 2 cores of our machines). The
    fastest of `repeats` single matmuls is kept: other processes only ever slow a matmul
    down, so the minimum time is the least disturbed estimate.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: thread pool start, page faults
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for MFU: the GPU table, a measured matmul peak on CPU, None if unknown.

    An fp32 run on an Ampere or newer GPU trains with TF32 tensor cores (fast_fp32_matmuls), so
    it is measured against the dense TF32 rate, half the bf16 one on A100/H100/L40S; older GPUs
    have no TF32 and get their plain fp32 rate.
    """
    if device.type == "cpu":
        return cpu_matmul_peak(torch.get_num_threads(), dtype=dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, low_precision, fp32 in GPU_PEAK_FLOPS:
            if key in name:
                if dtype != torch.float32:
                    return low_precision
                return low_precision / 2 if torch.cuda.get_device_capability(device)[0] >= 8 else fp32
    return None
