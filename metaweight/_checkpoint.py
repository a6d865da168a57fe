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
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` should be a file path (str or Path). Found `{type(path).__name__}`.")
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


def _safe_types() -> list[Any]:
    """Types common in training checkpoints that hold data and run no code of their own when
    unpickled: NumPy scalars, dtypes and arrays (their items go through the same restricted
    unpickler), ``argparse.Namespace`` (plain attributes) and ``pathlib`` paths (strings)."""
    import argparse
    import pathlib

    types: list[Any] = [argparse.Namespace, pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                        pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return types
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    if multiarray is None:  # NumPy 1.x
        multiarray = np.core.multiarray
    types += [multiarray.scalar, multiarray._reconstruct, np.dtype, np.ndarray]
    types += [getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None)) if name.endswith("DType")]
    return types


def _refused_globals(path: Path) -> list[str]:
    """The globals a ``weights_only`` load refuses in an intact file; empty if it cannot tell (damaged)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # pragma: no cover - torch < 2.5
        return []
    try:
        return list(finder(path))
    except Exception:
        return []


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = None,
                    weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or ``torch.save``).

    With ``weights_only=True`` (the default, safe for files from elsewhere) the common harmless
    types of training checkpoints load too: NumPy scalars and arrays, ``argparse.Namespace`` and
    ``pathlib`` paths (an allow-list, ``torch.serialization.safe_globals``). Two failures are told
    apart, each with a ``ValueError`` that names the file and what to do: an intact file holding
    other types (named; load it with ``weights_only=False`` if you trust it), and a missing,
    truncated or otherwise damaged file (resume from an earlier checkpoint).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).
        weights_only: passed to ``torch.load``; ``True`` (tensors, dicts, numbers, strings and the
            types above only) is safe for files from elsewhere.
    """
    if not isinstance(weights_only, bool):
        raise TypeError(f"`weights_only` should be a bool. Found {weights_only!r}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` should be a file path (str or Path). Found `{type(path).__name__}`.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        if weights_only and allow is not None:
            with allow(_safe_types()):
                state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        refused = _refused_globals(path) if weights_only and isinstance(exc, pickle.UnpicklingError) else []
        if refused:
            raise ValueError(f"The checkpoint {path} is intact, but holds types that loading with weights_only=True "
                             f"refuses: {refused}. If you trust the file, load it with "
                             f"load_checkpoint(path, weights_only=False); or allow those types with "
                             f"torch.serialization.add_safe_globals([...]) before loading.") from None
        raise ValueError(f"The checkpoint {path} is damaged or not a torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Resume from an earlier checkpoint.") from None
    if not isinstance(state, dict):
        raise ValueError(f"The checkpoint {path} holds a `{type(state).__name__}`, not a dict of states.")
    return state
