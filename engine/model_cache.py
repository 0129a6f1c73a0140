"""Tandem's cache directory of built and converted checkpoints, and its atomic publish.

Whatever goes in the cache is built in a temporary sibling directory and renamed into place, so a
reader (or a concurrent builder) sees either a whole checkpoint or none, and a failed build
leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem"
    )
    return Path(root)


def is_published(target: Path) -> bool:
    """A checkpoint directory is whole once it has its config.json (renamed in last)."""
    return (target / "config.json").is_file()


def publish(build: Callable[[Path], object], target: Path) -> Path:
    """`target`, built by `build(tmp)` into a temporary directory and renamed into place.

    Already published: returned as is, `build` not called. Two processes building the same
    target race harmlessly: the loser's rename fails, finds the winner's checkpoint, and drops
    its own. Any exception from `build` propagates after the temporary directory is removed."""
    if is_published(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not is_published(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
