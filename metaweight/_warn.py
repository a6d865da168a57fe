"""Warnings that point at the user's line, not at ours."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the innermost caller outside this package.

    The same warning is reached through several call chains (``step``, ``meta_step``, fast
    mode, a backend's fallback), so a fixed ``stacklevel`` would point inside the library on
    some of them; this walks the stack instead.
    """
    frame = sys._getframe(1)
    level = 2  # the frame that called warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def raise_or_skip_step(owner: Any, message: str) -> None:
    """A refused model step, by ``owner.nonfinite``: ``"raise"`` raises a ``ValueError`` with
    ``message``; ``"skip"`` counts it in ``owner.num_skipped`` and warns."""
    if owner.nonfinite == "raise":
        raise ValueError(message + " (Pass nonfinite='skip' to skip such steps.)")
    owner.num_skipped += 1
    warn_user(f"Skipped a model step ({owner.num_skipped} skipped so far): {message}")
