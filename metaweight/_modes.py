"""Evaluation mode for a while, then every module's own train/eval mode back; torch's attention fast
path off for a while."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_FASTPATH_LOCK = threading.Lock()
_fastpath_off: list[Any] = [0, None]  # the calls inside (threads, nested calls), the setting before the first


@contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """Turn torch's fast path of ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` (and its layers),
    a process-wide setting (``torch.backends.mha``), off while any call of ours is inside, and put the
    user's setting back when the last one leaves: a call that put back what it found on entering turned
    it on again under another still inside (a second thread's forward, interleaved generators), whose
    encoder then took the fast path in the middle of its forward."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    with _FASTPATH_LOCK:
        if _fastpath_off[0] == 0:
            _fastpath_off[1] = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
        _fastpath_off[0] += 1
    try:
        yield
    finally:
        with _FASTPATH_LOCK:
            _fastpath_off[0] -= 1
            if _fastpath_off[0] == 0:
                mha.set_fastpath_enabled(_fastpath_off[1])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode, and give each its own mode back afterwards.

    ``model.train(was)`` would not do: it sets every submodule to the top-level mode, so a
    BatchNorm the user froze in a training model (``model.train(); model.bn.eval()``) would come
    back in training mode and its running statistics would move again.
    """
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True
