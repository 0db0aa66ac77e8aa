"""nanollm's own CPU kernel for int8 decoding (int8_gemm.c), built with the system C compiler on first use.

`int8_gemm()` returns the kernel, or None where it cannot run here: not an x86 CPU with AVX2
and FMA, no C compiler, a failed build, or NANOLLM_INT8_KERNEL=aten in the environment.
quantize.py then falls back to torch's aten._weight_int8pack_mm, so nothing depends on the
build; the reason is logged once.

The build: `cc -O3 -mavx2 -mfma -fopenmp -shared -fPIC` (CC overrides the compiler), into
$NANOLLM_CACHE_DIR, else $XDG_CACHE_HOME/nanollm, else ~/.cache/nanollm (where that cannot be
made, <tmp>/nanollm-<uid>), in kernels/ under a name that hashes the source, the flags and the
compiler's version, so an edit or a new compiler builds afresh and machines sharing a home
directory share the file (the flags name an instruction set, not the build machine's CPU).
It is written to a temporary name and renamed into place, so processes building at once, or
one killed mid-build, never load half a file. Building takes about a second. Without OpenMP
(Apple's clang) it is built single-threaded and only used when torch runs one thread.

Loading a library runs its code as us, and its name is one anyone can compute: so a kernel
is loaded only from a private folder (nanollm/private.py: owned by us, not writable by group
or others, every folder above it owned by us or root and writable by others only with the
sticky bit, as /tmp is) and only from a file owned by us that nobody else can write. Folders
it creates are mode 0700. Anything else is refused with one warning naming the folder and
the fix, and aten's kernel serves: on a shared machine another user could otherwise plant a
library in a folder they can write, and run code as whoever decodes next.

The call goes through ctypes, which releases the GIL for its duration (the server's event
loop keeps running), on raw pointers: `Int8Gemm.__call__` checks dtypes, devices and
contiguity first, as a wrong pointer would crash the process rather than raise. OpenMP
threads: the library links libgomp.so.1 by name, which resolves to the copy torch has
already loaded, so the kernel and torch share one thread pool; it runs with
torch.get_num_threads() threads. (A torch built on another OpenMP runtime, Intel's libiomp5
or LLVM's libomp as in some conda builds, leaves the kernel its own GNU pool beside torch's;
if that measures slower there, NANOLLM_INT8_KERNEL=aten turns the kernel off.)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from nanollm.atomic import atomic_path
from nanollm.private import NotPrivate, cache_dir, check_ours, private_folder

__all__ = ["Int8Gemm", "int8_gemm", "int8_kernel", "int8_kernel_name"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemm.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]
OPENMP = ["-fopenmp"]
ENV = "NANOLLM_INT8_KERNEL"  # "auto" (default): build and use it where it can run; "aten": never
REFUSED = "refused to load a compiled kernel"  # how a security refusal's reason starts (logged as a warning)


class Int8Gemm:
    """y (..., N) fp32 = (x (..., K) fp32 @ w (N, K) int8 ^T) * scales (N,) fp32, on the CPU."""

    def __init__(self, path: Path, parallel: bool):
        self.path, self.parallel = path, parallel
        lib = ctypes.CDLL(str(path))
        self._fn = lib.nanollm_int8_gemm
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        lib.nanollm_int8_isa.restype = ctypes.c_char_p
        self.isa = lib.nanollm_int8_isa().decode()

    def serves(self, threads: int) -> bool:
        """Whether it is the better choice at this torch thread count (a serial build only at one thread)."""
        return self.parallel or threads == 1

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N): every row of x times the int8 matrix. A decode step makes ~50 of these
        calls, so they skip reshape/view (~3 us each): the kernel reads x's rows as one (M, K) block."""
        if not (x.dtype == torch.float32 and weight.dtype == torch.int8 and scales.dtype == torch.float32):
            raise ValueError(_dtype_error(x, weight, scales))  # raw fp32/int8 memory: refuse, never reinterpret
        if not (x.is_cpu and weight.is_cpu and scales.is_cpu):
            raise ValueError("int8 kernel: CPU tensors only")
        *lead, K = x.shape
        N = weight.size(0)
        if weight.shape != (N, K) or scales.shape != (N,):
            raise ValueError(f"int8 kernel: shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                             f"scales {tuple(scales.shape)} do not match")  # fmt: skip
        if not (weight.is_contiguous() and scales.is_contiguous()):
            raise ValueError("int8 kernel: weight and scales must be contiguous")
        x = x.contiguous()
        y = torch.empty(*lead, N, dtype=torch.float32)  # (..., N): fp32 whatever the default dtype
        threads = torch.get_num_threads()
        self._fn(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), x.numel() // K, N, K, threads)
        return y


def _dtype_error(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> str:
    """One line naming the first operand of the wrong dtype and the fix."""
    for name, tensor, dtype in (
        ("x", x, torch.float32),
        ("weight", weight, torch.int8),
        ("scales", scales, torch.float32),
    ):
        if tensor.dtype != dtype:
            return (f"int8 kernel: {name} is {tensor.dtype}, needs {dtype}; cast it first "
                    f"(or call quantize.Int8Linear, which picks a path for each dtype)")  # fmt: skip
    return "int8 kernel: operands of the wrong dtype"


def _check_library(path: Path) -> None:
    """The compiled file itself: a regular file (not a link), ours, writable by nobody else."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotPrivate(f"{path} is not a regular file")
    check_ours(path, st, "library")


def _cpu_has_avx2() -> bool:
    """x86 with AVX2 and FMA: torch's own dispatch check (AVX512 implies both)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


class _BuildFailed(Exception):
    pass


def _build(cc: str, flags: list[str], dst: Path) -> str | None:
    """Compile SOURCE into dst (atomic_path: renamed into place whole, mode 0700); None on success, else the
    compiler's first error line."""
    try:
        with atomic_path(dst) as tmp:
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            if proc.returncode != 0:
                lines = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()
                raise _BuildFailed(lines[0] if lines else f"{cc} exited with {proc.returncode}")
            os.chmod(tmp, 0o700)  # writable by us alone, whatever the umask: _check_library refuses anything else
    except _BuildFailed as failed:
        return str(failed)
    return None


def _library_name(flags: list[str], compiler_version: str) -> str:
    """The file name a build of SOURCE with these flags and this compiler gets: by content, so edits rebuild."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, compiler_version]).encode()).hexdigest()[:16]
    return f"int8_gemm-{key}.so"


def _load() -> tuple[Int8Gemm | None, str]:
    """The kernel and how it was found, or None and why not (starting with REFUSED where loading was unsafe)."""
    if os.environ.get(ENV, "auto") == "aten":
        return None, f"{ENV}=aten"
    if not _cpu_has_avx2():
        return None, f"this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}) lacks AVX2/FMA"
    if not hasattr(os, "getuid"):
        return None, "no POSIX file ownership here, so a private folder for the kernel cannot be checked"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    errors = []
    for flags, parallel in ((FLAGS + OPENMP, True), (FLAGS, False)):
        for base in (cache_dir(), Path(tempfile.gettempdir()) / f"nanollm-{os.getuid()}"):
            folder = base / "kernels"
            try:
                path = private_folder(folder) / _library_name(flags, version)
                if not os.path.lexists(path) and (error := _build(cc, flags, path)) is not None:
                    errors.append(error)
                    break  # the flags, not the folder, are the problem
                _check_library(path)
                return Int8Gemm(path, parallel), f"built with {cc} {' '.join(flags)} at {path}"
            except NotPrivate as unsafe:
                return None, (f"{REFUSED}: {unsafe}; make it yours alone (chown it to you, chmod go-w; delete "
                              f"any library you did not build), or set NANOLLM_CACHE_DIR to a folder only you can "
                              f"write")  # fmt: skip
            except (OSError, AttributeError) as e:  # an unmakeable folder or a broken file: try the next
                errors.append(str(e))
    return None, f"building {SOURCE.name} failed: {errors[0] if errors else 'unknown error'}"


@functools.cache
def int8_gemm() -> Int8Gemm | None:
    """nanollm's int8 kernel for this process, built on first call; None (reason logged once) where it cannot run."""
    kernel, how = _load()
    if kernel is None:
        level = logging.WARNING if how.startswith(REFUSED) else logging.INFO
        log.log(level, "int8 matmuls use torch's aten._weight_int8pack_mm: %s", how)
    else:
        log.debug("int8 kernel (%s, %s): %s", kernel.isa, "OpenMP" if kernel.parallel else "serial", how)
    return kernel


def int8_kernel() -> Int8Gemm | None:
    """nanollm's kernel where it serves at torch's current thread count, else None: aten's serves then."""
    kernel = int8_gemm()
    return kernel if kernel is not None and kernel.serves(torch.get_num_threads()) else None


def int8_kernel_name() -> str:
    """Which kernel serves few-row fp32 int8 matmuls on the CPU now: "nanollm" (int8_gemm.c) or "aten"."""
    return "nanollm" if int8_kernel() is not None else "aten"
