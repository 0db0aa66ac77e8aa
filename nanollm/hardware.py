"""What the machine offers training: the device, the compute dtype, its peak FLOP/s, TF32.

The training loop (nanollm/training/loop.py) asks these questions; how much memory a run will need
is nanollm/training/memory.py's business, and process groups are nanollm/training/distributed.py's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

# CPU feature flags that mean bf16 matmuls run in hardware, as Linux's /proc/cpuinfo spells them:
# x86 AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+) and AMX-BF16 (Intel
# Sapphire Rapids+), Arm's BF16 extension (Neoverse V1/N2: Graviton 3/4). oneDNN's own
# `_is_mkldnn_bf16_supported()` is no guide: it is true on any AVX-512 CPU, where bf16 is
# emulated, and there bf16 autocast trained the default model at 1,485 tokens/s against 4,331
# in fp32 (2-core Intel Xeon without avx512_bf16, benchmarks/pretrain_mfu.py).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def pick_device(name: str = "auto", local_rank: int = 0, key: str = "train.device") -> torch.device:
    """auto: cuda if available, then mps, then cpu; or the device named (cpu, mps, cuda, cuda:N).

    The one rule every command that runs the model uses. An explicit device that is absent is
    an error naming `key`, the setting it came from. Under torchrun each process of a node
    takes the GPU numbered by its LOCAL_RANK (a plain "cuda" or "auto"); "cuda:N" is taken as is.
    """
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise NanollmError(f"{key} is {name!r}; use auto, cpu, mps, cuda or cuda:N")
    if (kind == "cuda" and not cuda) or (kind == "mps" and not mps):
        raise NanollmError(f"{key} is {name!r} but this machine has none; set {key}: auto or cpu")
    if kind == "cuda":
        gpu = int(index) if index else local_rank
        if gpu >= torch.cuda.device_count():
            raise NanollmError(
                f"{key} asks for GPU {gpu} but this node has {torch.cuda.device_count()} GPU(s); "
                + ("pick another index" if index else "lower torchrun --nproc_per_node")
            )
        return torch.device("cuda", gpu)
    return torch.device(kind)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (Arm) on Linux.

    On macOS (no /proc) the Arm BF16 extension is read from `sysctl hw.optional.arm.FEAT_BF16`
    and reported as "bf16". Elsewhere, or when nothing can be read, the set is empty, which
    makes auto pick fp32: the safe side, never slower than emulated bf16.
    """
    return _cpu_flags(platform.system())


@functools.cache
def _cpu_flags(system: str) -> frozenset[str]:
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("flags", "features"):
                return frozenset(value.split())  # every core lists the same flags: the first line will do
        return frozenset()
    if system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset({"bf16"}) if out.stdout.strip() == "1" else frozenset()
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, sysctl on macOS), or the architecture when unknown."""
    return _cpu_model(platform.system())


@functools.cache
def _cpu_model(system: str) -> str:
    if system == "Linux":
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
        except OSError:
            pass
    elif system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str = "cpu") -> str:
    """One line naming what a measured figure came from: the CPU (model, cores, the SIMD and bf16 features
    that decide its speed) or the GPU (name, compute capability). Printed beside every figure."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), CUDA {torch.version.cuda}"
    if device.type == "mps":
        return f"Apple GPU (MPS) of {cpu_model()}"
    flags = cpu_flags()
    simd = next((name for flag, name in _SIMD if flag in flags), None)
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & flags)
    bf16 = f"native bf16 ({', '.join(native)})" if native else "no native bf16"
    return ", ".join(filter(None, [cpu_model(), f"{os.cpu_count()} CPUs", simd, bf16 if flags else None]))


# widest SIMD first: the first flag present names the machine's vector unit
_SIMD = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype of a run and, in words, why: logged at the start and recorded with the run."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(name: str, device: torch.device) -> DtypeChoice:
    """The compute dtype for train.dtype and why; "auto" picks bf16 only where the hardware runs it natively.

    auto, by device:
    - cuda: bf16 on compute capability 8.0+ (Ampere, Hopper, Ada, Blackwell: bf16 tensor cores);
      fp16 with loss scaling on 7.x (V100, T4: fp16 tensor cores, bf16 only emulated, which
      `torch.cuda.is_bf16_supported()` counts as support); fp32 below.
    - cpu: bf16 when the CPU flags show native bf16 (NATIVE_BF16_CPU_FLAGS; 1.6x the fp32
      tokens/s of the default model on a 2-core AMD EPYC with avx512_bf16), else fp32. On macOS
      the CPU's BF16 extension is not used: torch's macOS wheels run CPU matmuls through Apple's
      Accelerate in fp32, so bf16 autocast there only adds casts.
    - mps: fp32. Apple GPUs run fp16/bf16 autocast, but no gain has been measured for models
      of this size; set train.dtype explicitly to try.
    The choice depends only on the hardware, never on a timing, so the same machine always
    picks the same dtype and a seeded run stays repeatable.
    """
    if name != "auto":
        return DtypeChoice(DTYPES[name], f"train.dtype: {name}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        if major >= 8:
            return DtypeChoice(torch.bfloat16, f"auto: {gpu} has bf16 tensor cores")
        if major == 7:
            return DtypeChoice(torch.float16, f"auto: {gpu} has fp16 but no bf16 tensor cores; fp16 with loss scaling")
        return DtypeChoice(torch.float32, f"auto: {gpu} has no tensor cores")
    if device.type == "cpu":
        if platform.system() == "Darwin":
            return DtypeChoice(torch.float32, "auto: CPU matmuls on macOS run in fp32 (Accelerate)")
        native = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
        if native:
            return DtypeChoice(torch.bfloat16, f"auto: the CPU runs bf16 natively ({', '.join(native)})")
        return DtypeChoice(
            torch.float32,
            "auto: the CPU has no native bf16 (no avx512_bf16, amx_bf16 or Arm bf16); emulated bf16 is slower",
        )
    return DtypeChoice(torch.float32, f"auto: fp32 on {device.type} (no faster dtype measured)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for train.dtype (see choose_dtype for what auto picks and why)."""
    return choose_dtype(name, device).dtype


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
    """Measured FLOP/s of a square matmul in `dtype` on the CPU with `threads` threads (cached).

    Takes ~0.15 s once. CPUs publish no usable peak, so MFU on a CPU is relative to what
    torch's own best-case GEMM reaches here (~165 GFLOP/s fp32 on 2 cores of our machines). The
    fastest of `repeats` single matmuls is kept: other processes only ever slow a matmul
    down, so the minimum time is the least disturbed estimate. A 128 x 128 probe first sizes
    the matmul down where the dtype is slow: emulated bf16 on a CPU without native bf16 runs
    at ~1-3 GFLOP/s, where eleven 1024 x 1024 matmuls would hold up the start of training ~45 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        probe = _best_matmul_seconds(128, dtype, repeats=2)
        # the largest size up to `size` whose matmul takes ~0.1 s at the probe's rate (cube law);
        # smaller ones understate a multi-core peak (fp32 on 2 cores: 94 GFLOP/s at 512, 178 at 1024)
        size = max(128, min(size, int(128 * (0.1 / probe) ** (1 / 3))))
        best = _best_matmul_seconds(size, dtype, repeats)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def _best_matmul_seconds(size: int, dtype: torch.dtype, repeats: int) -> float:
    # a generator of its own: the probe's size depends on timing, so draws from the global stream would leave
    # it wherever this machine's speed put it, and a resumed run's RNG state would differ from an unbroken one's
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up: thread pool start, page faults
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


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
