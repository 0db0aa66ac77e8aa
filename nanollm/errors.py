"""The one exception type the library raises for problems a user can fix, and the checked JSON read that raises it.

Its message is a single line that names the file, key or value at fault and what to do.
The CLI prints it without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class NanollmError(Exception):
    """A user-fixable problem: bad input data, a missing file, an unreachable service."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """Another library's error as part of a one-line message: its first line (cut at `limit`), or its type."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a one-line NanollmError naming the file and `fix` otherwise (missing, unreadable)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanollmError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NanollmError(f"{path} is unreadable ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise NanollmError(f"{path} must hold a JSON object; {fix}")
    return data
