"""Checkpoints that an interrupted save or a damaged file cannot cost you."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it.

    The rename is atomic on POSIX and Windows file systems, so a save interrupted at any point
    (a crash, a full disk, a killed job) leaves the previous checkpoint at ``path`` intact and
    never a half-written one.

    Args:
        state: what to save, e.g. ``{"model": model.state_dict(), "optimizer": ...,
            "weighter": weighter.state_dict()}``.
        path: the checkpoint file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(state, dict):
        raise TypeError(f"`state` should be a dict of what to save. Found `{type(state).__name__}`.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = None,
                    weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or ``torch.save``).

    A missing, truncated or otherwise damaged file raises a ``ValueError`` that names the file
    and says what to do, instead of an unpickling error from deep inside ``torch.load``.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).
        weights_only: passed to ``torch.load``; ``True`` (tensors, dicts, numbers and strings
            only) is safe for files from elsewhere.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"The checkpoint {path} is damaged or not a torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Resume from an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise ValueError(f"The checkpoint {path} holds a `{type(state).__name__}`, not a dict of states.")
    return state
