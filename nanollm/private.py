"""Folders only we can write: where nanollm keeps code it loads (the int8 kernel, inductor's compiled code).

Loading a shared library runs its code as us, and a cache's path is one anyone can compute.
So a folder that holds code we load must be private (`private_folder`): owned by us, not
writable by group or others, every folder above it owned by us or root and writable by
others only with the sticky bit (as /tmp is: nobody renames what is ours). Folders made here
are mode 0700. Anything else raises NotPrivate, naming the folder and why: on a shared machine
another user could otherwise plant a library in a folder they can write, and run code as
whoever loads it next.

torch.compile (inductor) keeps the code it generates in /tmp/torchinductor_<user> by default,
a name anyone on the machine could create first; `private_inductor_cache` points it at
<nanollm's cache>/inductor instead, or checks the folder TORCHINDUCTOR_CACHE_DIR names.
Decoding (inference/compiled.py) and training (train.compile) both call it before compiling.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nanollm.errors import NanollmError

__all__ = ["NotPrivate", "cache_dir", "check_ours", "private_folder", "private_inductor_cache"]


class NotPrivate(NanollmError):
    """A folder or file code could be planted in by someone else; the message says which and why."""


def cache_dir() -> Path:
    """nanollm's cache: NANOLLM_CACHE_DIR, else XDG_CACHE_HOME/nanollm, else ~/.cache/nanollm (not made here)."""
    if os.environ.get("NANOLLM_CACHE_DIR"):
        return Path(os.environ["NANOLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanollm"


def check_ours(path: Path, st: os.stat_result, what: str) -> None:
    """`path` (lstat'ed as `st`) is owned by us and writable by nobody else; else NotPrivate naming `what`."""
    if st.st_uid != os.getuid():
        raise NotPrivate(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise NotPrivate(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _check_folder(path: Path, *, ours: bool) -> None:
    """A real folder (not a link); ours: owned by us and writable by nobody else; else (a folder above it):
    owned by us or root, and writable by others only with the sticky bit."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotPrivate(f"{path} is not a folder")
    if ours:
        check_ours(path, st, "folder")
    elif st.st_uid not in (0, os.getuid()):
        raise NotPrivate(f"folder {path}, above a private one, is owned by uid {st.st_uid}, neither you nor root")
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise NotPrivate(f"folder {path}, above a private one, is writable by others without the sticky bit "
                         f"(mode {stat.S_IMODE(st.st_mode):o})")  # fmt: skip


def private_folder(folder: Path) -> Path:
    """`folder`, made where missing (mode 0700 for each folder created), as a resolved path only we can change.

    Every folder created is checked as it is made (another process may have made it first),
    then the resolved path (symbolic links followed, so the checks see where files really go)
    and every folder above it. Raises NotPrivate (naming the folder) where someone else could
    put a file there, OSError where it cannot be made.
    """
    if not hasattr(os, "getuid"):
        raise NotPrivate(f"{folder}: no POSIX file ownership here, so a private folder cannot be checked")
    folder = Path(os.path.abspath(folder))
    missing, path = [], folder
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # made meanwhile, perhaps by someone else: the check says
        _check_folder(path, ours=True)
    real = Path(os.path.realpath(folder))
    _check_folder(real, ours=True)
    for above in real.parents:
        _check_folder(above, ours=False)
    return real


def private_inductor_cache(what: str, instead: str) -> Path:
    """Point inductor's compile cache at a folder only we can write; returns it.

    TORCHINDUCTOR_CACHE_DIR, when set, names the folder; else <cache_dir()>/inductor. Inductor
    reads the variable each time it looks for its cache (and sets it itself when unset), so
    setting it here is what it would do with its own default. Raises NotPrivate, a one-line
    message naming `what` would have compiled, the folder, and what to do `instead`, where the
    folder is not private or cannot be made.
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    folder = Path(chosen) if chosen else cache_dir() / "inductor"
    try:
        folder = private_folder(folder)
    except (NotPrivate, OSError) as err:
        raise NotPrivate(
            f"refused to compile {what}: {err} (its compile cache); make it yours alone, or set "
            f"TORCHINDUCTOR_CACHE_DIR to a folder only you can write, or {instead}"
        ) from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder
