"""Warnings that point at the user's line, not at ours."""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the innermost caller outside this package.

    The same warning is reached through several call chains (``step``, ``meta_step``, fast
    mode, a backend's fallback), so a fixed ``stacklevel`` would point inside the library on
    some of them; this walks the stack instead.
    """
    held = getattr(_HELD, "stack", None)
    if held:  # inside a constructor's held_warnings(): emitted only once it has succeeded
        held[-1].append((message, category))
        return
    frame = sys._getframe(1)
    level = 2  # the frame that called warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


_HELD = threading.local()


class HeldWarnings(list):
    """The warnings :func:`warn_user` was asked for inside :func:`held_warnings`, as ``(message, category)``."""

    def emit(self) -> None:
        """Emit them (attributed to the user's line, as :func:`warn_user` does), once: call it where the
        constructor has succeeded."""
        held, self[:] = list(self), []
        for message, category in held:
            warn_user(message, category)


@contextmanager
def held_warnings() -> Iterator[HeldWarnings]:
    """Hold :func:`warn_user`'s warnings instead of emitting them (a fallback chosen while a constructor still
    validates): the constructor calls ``held.emit()`` once it has succeeded, so a refused construction warns
    nothing. Nested holds hold for the innermost; emitting inside an outer hold passes them on to it."""
    held = HeldWarnings()
    stack = getattr(_HELD, "stack", None)
    if stack is None:
        stack = _HELD.stack = []
    stack.append(held)
    try:
        yield held
    finally:
        stack.remove(held)


def warns_after_construction(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a constructor: the warnings it asks for are held (:func:`held_warnings`) and emitted once it has
    returned, so that a construction refused after a warning was chosen (a backend's fallback, then a bad
    option) warns nothing: validation first, then what it warns of."""

    @functools.wraps(init)
    def construct(self: Any, *args: Any, **kwargs: Any) -> None:
        with held_warnings() as held:
            init(self, *args, **kwargs)
        held.emit()

    return construct


SKIP_META_STEPS = " (Or pass nonfinite='skip' to skip such meta steps.)"  # (said where one is raised, not skipped)


def raise_or_skip_step(owner: Any, message: str) -> None:
    """A refused model step, by ``owner.nonfinite``: ``"raise"`` raises a ``ValueError`` with
    ``message``; ``"skip"`` counts it in ``owner.num_skipped`` and warns."""
    if owner.nonfinite == "raise":
        raise ValueError(message + " (Pass nonfinite='skip' to skip such steps.)")
    owner.num_skipped += 1
    warn_user(f"Skipped a model step ({owner.num_skipped} skipped so far): {message}")
