"""Files a run rewrites in its workdir, written so that a process killed meanwhile leaves the old file whole."""

import os
from collections.abc import Callable
from typing import TextIO


def replace_file(path: str, write: Callable[[TextIO], None]) -> None:
    """Writes `path` by `write(file)` into a file beside it, then renames that over `path` in one step: a kill -9
    at any moment leaves the old file or the new one, never a torn one."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        write(f)
    os.replace(partial, path)
