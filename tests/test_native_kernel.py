"""nanollm's int8 kernel (nanollm/inference/int8_gemm.c through native.py): built with the real compiler, run for real.

Where it cannot run (not x86 with AVX2/FMA, or no C compiler) the tests that need it skip and
the fallback tests still run: quantize.py then uses aten's kernel, which test_quantize.py covers.
"""

import threading

import pytest
import torch

from nanollm.inference import native
from nanollm.inference.native import Int8Gemm, int8_gemm

CAN_BUILD = native._cpu_has_avx2() and native._compiler() is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="needs an x86 CPU with AVX2/FMA and a C compiler")


def reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return ((x.double() @ w.double().t()) * s.double()).float()


def operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x, w, torch.rand(n, generator=g) / 100


@needs_kernel
def test_the_kernel_builds_here_with_openmp():
    kernel = int8_gemm()
    assert isinstance(kernel, Int8Gemm) and kernel.isa == "avx2+fma"
    assert kernel.parallel and kernel.serves(1) and kernel.serves(8)
    assert kernel.path.is_file() and kernel.path.suffix == ".so"


# every code path: M = 1 (blocks of 4 output rows, a tail of 1-3), M > 1 (tiles of 4 rows,
# remainders of 1-3, blocks of 2 output rows, an odd last one); K with and without a 16, 8 tail
@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 9, 64])
@pytest.mark.parametrize("k", [1, 7, 8, 16, 24, 37, 768])
def test_the_kernel_matches_a_float64_matmul_on_every_shape(m, n, k):
    x, w, s = operands(m, n, k)
    y = int8_gemm()(x, w, s)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(x, w, s), rtol=1e-5, atol=1e-6 * k**0.5)


@needs_kernel
def test_rows_give_the_same_bits_alone_in_a_batch_and_at_any_thread_count():
    """The continuous-batching engine relies on it: a row's output does not depend on its neighbours."""
    x, w, s = operands(6, 50, 200, seed=1)
    kernel = int8_gemm()
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(kernel(x, w, s))
            alone = torch.cat([kernel(x[i : i + 1], w, s) for i in range(6)])
            assert torch.equal(alone, outputs[-1])
        assert torch.equal(*outputs)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_row_slices_and_non_contiguous_activations_are_read_correctly():
    x, w, s = operands(3, 40, 64, seed=2)
    kernel = int8_gemm()
    torch.testing.assert_close(kernel(x, w[8:24], s[8:24]), reference(x, w, s)[:, 8:24])  # a fused matrix's slice
    xt = torch.randn(64, 3).t()  # non-contiguous rows: copied first
    torch.testing.assert_close(kernel(xt, w, s), reference(xt, w, s), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((torch.randn(2, 8).double(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)), "fp32 x"),
        ((torch.randn(2, 8), torch.zeros(4, 8), torch.ones(4)), "int8 weight"),
        ((torch.randn(2, 8), torch.zeros(4, 9, dtype=torch.int8), torch.ones(4)), "do not match"),
        ((torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(5)), "do not match"),
        ((torch.randn(2, 8), torch.zeros(8, 4, dtype=torch.int8).t(), torch.ones(4)), "contiguous"),
    ],
)
def test_wrong_operands_raise_instead_of_reading_wild_pointers(args, error):
    with pytest.raises((TypeError, ValueError), match=error):
        int8_gemm()(*args)


@needs_kernel
def test_the_build_is_cached_by_content_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path))
    kernel, how = native._load()
    assert kernel is not None and kernel.path.parent == tmp_path / "kernels", how
    built = kernel.path.stat().st_mtime_ns
    again, _ = native._load()  # a second process: loads the file, builds nothing
    assert again.path == kernel.path and kernel.path.stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [kernel.path.name]  # no temporary left

    # processes building at once each rename a whole file into place
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "race"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(native._load()[0])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    x, w, s = operands(2, 8, 16)
    for r in results:
        torch.testing.assert_close(r(x, w, s), reference(x, w, s))
    assert [p.suffix for p in (tmp_path / "race" / "kernels").iterdir()] == [".so"]


def test_a_failing_compiler_falls_back_with_its_error_and_leaves_nothing(tmp_path, monkeypatch):
    if not native._cpu_has_avx2():
        pytest.skip("no AVX2: the kernel is never built here")
    broken = tmp_path / "cc"
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo broken 1.0; exit 0; }\necho 'cc: error: out of luck' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "cache"))
    kernel, why = native._load()
    assert kernel is None and "cc: error: out of luck" in why
    leftovers = list((tmp_path / "cache").rglob("*"))
    assert all(p.is_dir() for p in leftovers)


def test_aten_in_the_environment_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("NANOLLM_INT8_KERNEL", "aten")
    kernel, why = native._load()
    assert kernel is None and why == "NANOLLM_INT8_KERNEL=aten"


def test_the_kernel_needs_x86_with_avx2(monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "arm64")
    kernel, why = native._load()
    assert kernel is None and "lacks AVX2" in why


@needs_kernel
def test_an_unusable_cache_folder_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file, whoever runs the test (root too)
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    kernel, how = native._load()
    assert kernel is not None and kernel.path.is_relative_to(tmp_path / "tmp"), how


def test_the_installed_package_carries_the_kernel_source(tmp_path):
    """A wheel (pip install ., or the MLflow model's environment) builds the kernel from its own copy."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for package in ("nanollm", "stages"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("nanollm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanollm/inference/int8_gemm.c" in names and "nanollm/inference/native.py" in names
