"""nanollm.hardware: the one device rule, what dtype auto picks on each kind of machine and why, peaks."""

import pytest
import torch

from nanollm import hardware
from nanollm.errors import NanollmError
from nanollm.hardware import choose_dtype, cpu_flags, cpu_matmul_peak, pick_device, resolve_dtype

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------- devices


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for cuda, mps, expected in [(True, True, "cuda:0"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert str(pick_device("auto")) == expected


def test_explicit_devices_and_cuda_index(monkeypatch):
    assert pick_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index wins
    with pytest.raises(NanollmError, match=r"bench.device asks for GPU 2 but this node has 2 GPU\(s\)"):
        pick_device("cuda:2", key="bench.device")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "mps:1", ""])
def test_unknown_device_names_are_one_line_errors(name):
    with pytest.raises(NanollmError, match=r"eval.device is .*; use auto, cpu, mps, cuda or cuda:N"):
        pick_device(name, key="eval.device")


def test_absent_device_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(NanollmError, match="train.device is 'cuda' but this machine has none"):
        pick_device("cuda")
    with pytest.raises(NanollmError, match="eval.device is 'mps' but this machine has none; set eval.device"):
        pick_device("mps", key="eval.device")


# ---------------------------------------------------------------------------- dtype auto


def _cpu(monkeypatch, flags, system="Linux"):
    monkeypatch.setattr(hardware.platform, "system", lambda: system)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Intel Sapphire Rapids
        ({"fp", "asimd", "bf16", "i8mm"}, torch.bfloat16),  # Arm Neoverse V1 (Graviton 3)
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, torch.float32),  # Intel Xeon, AVX-512 but emulated bf16
        ({"avx2", "fma"}, torch.float32),  # AMD Zen 3, older Intel
        ({"fp", "asimd"}, torch.float32),  # Arm without BF16 (Graviton 2)
        (set(), torch.float32),  # flags unreadable: the safe side
    ],
)
def test_cpu_auto_is_bf16_only_with_native_bf16_flags(monkeypatch, flags, expected):
    _cpu(monkeypatch, flags)
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: ")
    if expected == torch.bfloat16:
        assert any(flag in choice.reason for flag in hardware.NATIVE_BF16_CPU_FLAGS)
    else:
        assert "no native bf16" in choice.reason


def test_cpu_auto_ignores_onednns_bf16_support(monkeypatch):
    """oneDNN says yes on any AVX-512 CPU, emulated or not: the flags decide."""
    _cpu(monkeypatch, {"avx512f", "avx512bw"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert choose_dtype("auto", CPU).dtype == torch.float32


def test_macos_cpu_is_fp32_even_with_arm_bf16(monkeypatch):
    _cpu(monkeypatch, {"bf16"}, system="Darwin")
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.float32 and "macOS" in choice.reason


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16), ((7, 5), torch.float16),
     ((7, 0), torch.float16), ((6, 1), torch.float32)],
)  # fmt: skip
def test_cuda_auto_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there: ignored
    choice = choose_dtype("auto", torch.device("cuda", 0))
    assert choice.dtype == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_mps_auto_is_fp32():
    choice = choose_dtype("auto", torch.device("mps"))
    assert choice.dtype == torch.float32 and "mps" in choice.reason


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_explicit_dtype_wins(monkeypatch, name):
    _cpu(monkeypatch, set())
    choice = choose_dtype(name, CPU)
    assert choice.name == name and choice.reason == f"train.dtype: {name}"
    assert resolve_dtype(name, CPU) == choice.dtype


def test_auto_is_repeatable_on_this_machine():
    assert len({choose_dtype("auto", CPU) for _ in range(5)}) == 1


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    hardware._cpu_flags.cache_clear()
    real = cpu_flags()
    if hardware.platform.system() == "Linux":
        assert real, "this Linux machine's /proc/cpuinfo lists no flags"
    text = "processor\t: 0\nmodel name\t: Test\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n"
    fake = tmp_path / "cpuinfo"
    fake.write_text(text)
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    hardware._cpu_flags.cache_clear()
    try:
        assert hardware._cpu_flags("Linux") == {"fpu", "sse2", "avx512_bf16"}
    finally:
        hardware._cpu_flags.cache_clear()


# ---------------------------------------------------------------------------- peaks


def test_cpu_peak_is_measured_once():
    peak = cpu_matmul_peak(1)
    assert peak > 1e8 and cpu_matmul_peak(1) == peak  # > 0.1 GFLOP/s on anything; cached


def test_the_peak_probe_leaves_the_global_rng_alone():
    """Its matmul size depends on timing: drawn from torch's stream, a resumed run's RNG state would differ."""
    before = torch.get_rng_state()
    cpu_matmul_peak.cache_clear()
    cpu_matmul_peak(1, dtype=torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------- naming the machine


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "Test CPU, 2 CPUs, AVX-512, native bf16 (avx512_bf16)"),
        ({"avx2", "avx512f"}, "Test CPU, 2 CPUs, AVX-512, no native bf16"),
        ({"avx2", "fma"}, "Test CPU, 2 CPUs, AVX2, no native bf16"),
        ({"asimd", "bf16"}, "Test CPU, 2 CPUs, NEON, native bf16 (bf16)"),
        (set(), "Test CPU, 2 CPUs"),  # nothing readable: say nothing rather than something wrong
    ],
)
def test_describe_machine_names_the_cpu_features_that_decide_speed(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Test CPU")
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    assert hardware.describe_machine("cpu") == expected


def test_describe_machine_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    text = hardware.describe_machine(torch.device("cuda", 0))
    assert text.startswith("NVIDIA H100 80GB HBM3 (compute capability 9.0)")


def test_this_machine_has_a_cpu_model():
    assert hardware.cpu_model() and hardware.describe_machine().startswith(hardware.cpu_model())
