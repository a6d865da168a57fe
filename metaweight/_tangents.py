r"""A shorter forward-mode derivative for BatchNorm in training mode (the ``jvp`` backend's tangent forward).

ATen's forward-mode formula for ``native_batch_norm`` with batch statistics runs some 36 ops per
layer beyond the primal (means through integer divisions with their dtype copies, the variance's
tangent through ``pow``, several broadcast passes); on a network of small layers, where the number
of ops rather than their FLOPs decides the cost, that is most of the tangent forward. With
:math:`\hat x = (x - \mu)\,\sigma^{-1}` over the batch (and spatial) dimensions,

.. math::
    \dot y = \gamma\,\sigma^{-1}\big(\dot x - \overline{\dot x} - \hat x\,\overline{\dot x \hat x}\big)
             + \dot\gamma\,\hat x + \dot\beta ,

the same derivative in about half the ops. :class:`ShortTangents` computes ``F.batch_norm`` that way
while it is active; the primal is ``torch.batch_norm``'s own
(the same kernel, the same running-statistics update), the tangent equal to ATen's within
rounding. Every other call, and BatchNorm with running statistics (eval mode), is ATen's.

:func:`make_dual` and :func:`unpack_dual` are ``torch.autograd.forward_ad``'s, without the Python checks
and the export hook each of those runs at every call (about 3.5 and 3 us on a CPU core, against 1.5 for
the binding: the tangent forward of the CIFAR MSDNet makes some 550 duals and unpacks some 400);
:func:`dual_level` runs the checks' one side effect once, the loading of the decompositions TorchScript
needs for forward AD.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor


_ONE_LEVEL = threading.RLock()


@contextlib.contextmanager
def dual_level() -> Iterator[None]:
    """``torch.autograd.forward_ad.dual_level()``, entered by one thread at a time. torch's forward-AD levels are
    process-wide, not per thread: a step's tangent forward in one thread while another thread's was open failed
    with "Nested forward mode AD is not supported at the moment" (two weighters stepping in a thread pool). The
    other threads wait for it (a few forwards); the level's own ops stay per thread."""
    global _loaded
    with _ONE_LEVEL, fwAD.dual_level():
        if not _loaded:  # (what fwAD.make_dual does at every call: an import, after its first time a lookup)
            with warnings.catch_warnings():
                # torch's decompositions run torch.jit.script as they load, which warns that it is deprecated: under
                # a user's warnings-as-errors (pytest's filterwarnings = error, python -W error) the step failed
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
                _load_decompositions()
            _loaded = True
        yield


_load_decompositions = getattr(fwAD, "_maybe_load_decompositions", lambda: None)
_loaded = False


def make_dual(primal: Tensor, tangent: Tensor) -> Tensor:
    """``torch.autograd.forward_ad.make_dual(primal, tangent)`` at the current level, through the binding: both
    must be floating point (torch's check raises an internal assert otherwise)."""
    return torch._make_dual(primal, tangent, level=fwAD._current_level)


def unpack_dual(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """``torch.autograd.forward_ad.unpack_dual(t)`` at the current level, through the binding: ``(primal,
    tangent)``, the tangent ``None`` where ``t`` has none (or no level is open)."""
    return torch._unpack_dual(t, level=fwAD._current_level)


class _Depth(threading.local):
    """How many :class:`ShortTangents` blocks this thread is inside (0 in every other thread)."""

    value = 0


_depth = _Depth()


class ShortTangents:
    """While the block runs, ``F.batch_norm`` in training mode with a tangent, called from this thread,
    computes it as :func:`batch_norm_dual` does; every other call is ATen's.

    The block replaces ``torch.nn.functional.batch_norm`` (the name ``nn.BatchNorm*`` and functional code call
    it by), holding the lock of :func:`dual_level`: a ``TorchFunctionMode``, which this was, saw every op of the
    forward, about 2.5 us each on a CPU core (some 5 ms of a meta step on the CIFAR MSDNet). The replacement
    answers the thread inside the block only: another thread's call meanwhile goes straight to the function it
    replaced (``torch.func.vmap`` over a BatchNorm, a forward on the meta device, found there no rule for the
    tangent's ops). On exit the function it replaced is put back unless someone replaced it in turn meanwhile (a
    ``mock.patch`` in another thread, whose own exit then puts back a replacement that answers nobody: it
    passes every call on, and the next block takes it again). A forward compiled by TorchScript, and code that
    imported the function by name (``from torch.nn.functional import batch_norm``), which the mode reached, get
    ATen's formula: the same derivative within rounding, in more ops.
    """

    def __enter__(self) -> None:
        _ONE_LEVEL.acquire()
        current = F.batch_norm
        if hasattr(current, "_metaweight_replaced"):  # (ours, left by a block whose exit was patched over)
            self._installed = current
        else:
            original = current

            def batch_norm(*args: Any, **kwargs: Any) -> Tensor:
                if _depth.value:
                    out = batch_norm_dual(*args, **kwargs)
                    if out is not None:
                        return out
                return original(*args, **kwargs)

            batch_norm._metaweight_replaced = original  # type: ignore[attr-defined]
            self._installed = batch_norm
            F.batch_norm = batch_norm
        _depth.value += 1

    def __exit__(self, *exc: object) -> None:
        _depth.value -= 1
        if _depth.value == 0 and F.batch_norm is self._installed:
            F.batch_norm = self._installed._metaweight_replaced  # type: ignore[attr-defined]
        _ONE_LEVEL.release()


def _unpack(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    if t is None:
        return None, None
    primal, tangent = unpack_dual(t)
    return primal, tangent


def batch_norm_dual(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor | None:
    """``F.batch_norm`` with batch statistics on dual tensors, its tangent by the formula above; ``None``
    where ATen's own is used (eval mode, no tangent anywhere, fewer than 2 dimensions)."""
    if not training or not isinstance(input, Tensor) or input.dim() < 2 \
            or torch.is_autocast_enabled(input.device.type):  # (autocast casts at aten::batch_norm, not below)
        return None
    x, x_t = _unpack(input)
    w, w_t = _unpack(weight)
    b, b_t = _unpack(bias)
    if x_t is None and w_t is None and b_t is None:
        return None
    if any(t is not None and t.dtype != x.dtype for t in (x_t, w, w_t, b, b_t)):
        return None  # mixed precision: ATen's own rules
    y, mean, invstd, _, _ = torch._batch_norm_impl_index(x, w, b, running_mean, running_var, True, momentum, eps,
                                                         torch.backends.cudnn.enabled)
    if mean.dtype != x.dtype:  # (cuDNN keeps half-precision statistics in float32)
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    tangent = None
    if x_t is not None:
        inv_n = 1.0 / (x.numel() // x.shape[1])  # (as alpha and value: a Python number times a tensor is a copy more)
        s1 = x_t.sum(dims, keepdim=True)
        s2 = (x_t * xhat).sum(dims, keepdim=True)
        scale = invstd if w is None else invstd * w
        tangent = torch.addcmul(torch.sub(x_t, s1, alpha=inv_n), xhat, s2, value=-inv_n) * scale.view(shape)
    if w_t is not None:
        tangent = xhat * w_t.view(shape) if tangent is None else torch.addcmul(tangent, xhat, w_t.view(shape))
    if b_t is not None:
        tangent = b_t.view(shape).expand_as(y).clone() if tangent is None else tangent + b_t.view(shape)
    return make_dual(y, tangent)
