"""nanollm's int8 kernel (nanollm/inference/int8_gemm.c through native.py): built with the real compiler, run for real.

Where it cannot run (not x86 with AVX2/FMA, or no C compiler) the tests that need it skip and
the fallback tests still run: quantize.py then uses aten's kernel, which test_quantize.py covers.
"""

import os
import re
import stat
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
        ((torch.randn(2, 8).double(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)), "x is torch.float64"),
        ((torch.randn(2, 8).bfloat16(), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)), "x is torch.bfloat16"),
        ((torch.randn(2, 8), torch.zeros(4, 8), torch.ones(4)), "weight is torch.float32, needs torch.int8"),
        ((torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4).bfloat16()), "scales is torch.bf"),
        ((torch.randn(2, 8), torch.zeros(4, 9, dtype=torch.int8), torch.ones(4)), "do not match"),
        ((torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(5)), "do not match"),
        ((torch.randn(2, 8), torch.zeros(8, 4, dtype=torch.int8).t(), torch.ones(4)), "contiguous"),
    ],
)
def test_wrong_operands_raise_instead_of_reading_wild_pointers(args, error):
    with pytest.raises(ValueError, match=error):
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


# --- who may have put the library there: a kernel is loaded from a private folder only ---

PLANTED = r"""
#include <stdio.h>
/* Runs at dlopen, before any symbol is looked up: proof that the library was loaded. */
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
void nanollm_int8_gemm(const float *x, const signed char *w, const float *s, float *y, long M, long N, long K,
                       int threads) {
    for (long i = 0; i < M * N; i++) y[i] = 42.0f;
}
const char *nanollm_int8_isa(void) { return "planted"; }
"""


def plant(folder, marker):
    """A library at every name the loader would look for in `folder`, whose constructor writes `marker`."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    source = folder.parent / "planted.c"
    source.write_text(PLANTED)
    cc = native._compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    paths = []
    for flags in (native.FLAGS + native.OPENMP, native.FLAGS):
        path = folder / native._library_name(flags, version)
        subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(path)], check=True)
        path.chmod(0o700)
        paths.append(path)
    return paths


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of our own (NANOLLM_CACHE_DIR) with a planted library in its kernels/, and the marker's path."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(root))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))  # not a way round the refusal
    marker = tmp_path / "marker"
    plant(root / "kernels", marker)
    return root, marker


NOBODY = 65534  # another user's uid: chown needs root, which these tests run as in CI
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another uid needs root")


@needs_kernel
def test_a_library_in_a_private_folder_is_loaded(cache):
    """The control: the plant is loadable, so the refusals below are the checks' doing, not a broken plant."""
    root, marker = cache
    (root / "kernels").chmod(0o700)
    kernel, how = native._load()
    assert kernel is not None and kernel.isa == "planted" and marker.exists(), how


@needs_kernel
@pytest.mark.parametrize(
    ("unsafe", "words"),
    [
        (lambda root: (root / "kernels").chmod(0o775), r"kernels is writable by group or others \(mode 775\)"),
        (lambda root: (root / "kernels").chmod(0o777), r"kernels is writable by group or others \(mode 777\)"),
        (lambda root: root.chmod(0o777), "above a private one, is writable by others without the sticky bit"),
        pytest.param(lambda root: os.chown(root / "kernels", NOBODY, -1), f"owned by uid {NOBODY}", marks=as_root),
        pytest.param(lambda root: os.chown(root, NOBODY, -1), f"owned by uid {NOBODY}", marks=as_root),
        pytest.param(
            lambda root: [os.chown(p, NOBODY, -1) for p in (root / "kernels").glob("*.so")],
            f"library .* is owned by uid {NOBODY}",
            marks=as_root,
        ),  # fmt: skip
        (lambda root: [p.chmod(0o766) for p in (root / "kernels").glob("*.so")], "library .* writable by group"),
    ],
    ids=[
        "group-writable",
        "world-writable",
        "parent-world-writable",
        "other-owned",
        "parent-other-owned",
        "library-other-owned",
        "library-writable",
    ],  # fmt: skip
)
def test_a_library_planted_where_others_can_write_is_never_loaded(cache, unsafe, words, caplog):
    root, marker = cache
    unsafe(root)
    kernel, why = native._load()
    assert kernel is None and why.startswith(native.REFUSED) and str(root) in why and "NANOLLM_CACHE_DIR" in why
    assert re.search(words, why), why
    assert not marker.exists(), "the planted library's code ran"


@needs_kernel
def test_a_link_to_someone_elses_folder_is_refused(tmp_path, monkeypatch):
    """The checks look where the files really are: a link in our path to a folder another user can write."""
    theirs = tmp_path / "theirs"
    marker = tmp_path / "marker"
    plant(theirs / "kernels", marker)
    theirs.chmod(0o777)
    (theirs / "kernels").chmod(0o777)
    (tmp_path / "ours").mkdir(mode=0o700)
    (tmp_path / "ours" / "nanollm").symlink_to(theirs)
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "ours" / "nanollm"))
    kernel, why = native._load()
    assert kernel is None and why.startswith(native.REFUSED) and str(theirs) in why, why
    assert not marker.exists()


@needs_kernel
def test_a_refused_kernel_leaves_the_int8_matmul_to_aten_with_one_warning(cache, monkeypatch, caplog):
    """End to end through quantize.py: the planted library never runs, aten's kernel computes the right numbers."""
    from nanollm.inference.quantize import Int8Linear, int8_native_kernel

    root, marker = cache
    (root / "kernels").chmod(0o775)
    native.int8_gemm.cache_clear()
    try:
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 24, bias=False))
        x = torch.randn(3, 64)
        with caplog.at_level("INFO", logger=native.__name__):
            y = layer(x)
        assert native.int8_kernel_name() == "aten" and not marker.exists()
        refusals = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(refusals) == 1 and str(root) in refusals[0].getMessage()
        with int8_native_kernel(layer, False):
            assert torch.equal(y, layer(x))  # aten's path (bf16 activations) served: bit for bit the same
        torch.testing.assert_close(y, reference(x, layer.weight, layer.scales), rtol=2e-2, atol=2e-2)
    finally:
        native.int8_gemm.cache_clear()


@needs_kernel
def test_folders_the_loader_makes_are_private_and_the_library_is_ours_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "a" / "b"))
    old = os.umask(0o002)  # a umask that would leave files group-writable
    try:
        kernel, how = native._load()
    finally:
        os.umask(old)
    assert kernel is not None, how
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "kernels"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(kernel.path.stat().st_mode) & 0o022 == 0


# --- the output buffer is fp32 whatever torch's default dtype; other dtypes are refused, never reinterpreted ---


@needs_kernel
@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16, torch.float16])
def test_the_output_is_fp32_under_any_default_dtype(default):
    x, w, s = operands(5, 33, 40, seed=3)
    expected = reference(x, w, s)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        y = int8_gemm()(x, w, s)
    finally:
        torch.set_default_dtype(before)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_int8_layers_are_right_or_refuse_cleanly_under_float64_and_with_bf16_inputs():
    """Through quantize.py, the way decoding calls the kernel: fp32, bf16 and fp64 activations, default dtype fp64."""
    from nanollm.inference.quantize import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(64, 24, bias=False))
    x = torch.randn(3, 64)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).t()  # float64 reference
        for xs, tol in ((x, 1e-5), (x.double(), 1e-9), (x.bfloat16(), 3e-2)):
            y = layer(xs)
            assert y.dtype == xs.dtype and y.shape == (3, 24)
            torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol * 10)
    finally:
        torch.set_default_dtype(before)
    with pytest.raises(ValueError, match=r"x is torch\.bfloat16, needs torch\.float32; cast it first"):
        int8_gemm()(x.bfloat16(), layer.weight, layer.scales)
