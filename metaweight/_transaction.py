"""The step transaction: what a refused step must put back, kept on the device, and its one decision.

A call of :meth:`HarmonizedWeighter.step` may change the model's buffers (the forward updates
BatchNorm statistics), gamma, gamma's optimizer state, the validation average and the counters.
A step found non-finite must leave all of them as they were. This module keeps exactly that:

* :class:`BufferSnapshot` copies the buffers into flat storage allocated once, with one
  ``torch.cat`` per device and dtype, and copies them back only when a step is refused;
* :class:`StateSnapshot` keeps gamma, its optimizer's state and the validation objective's
  state as device copies (a few small tensors), never through ``state_dict()`` or ``.cpu()``;
* :func:`nonfinite_flag` decides whether a loss, all gradients and all floating-point buffers
  are finite with one fused kernel per device and dtype
  (``torch._amp_foreach_non_finite_check_and_unscale_``, as ``torch.amp.GradScaler`` does) and
  leaves the answer on the device;
* :func:`host_read` is the one place the weighter reads values back to the host, once per step
  (the decision and the numbers of the step's record in one transfer).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

HOST_READ = "metaweight::host_read"  # the profiler range around every read back to the host


def host_read(values: Sequence[Tensor]) -> list[float]:
    """The values of ``values`` (scalars or vectors, any float dtype) on the host, in one transfer.

    This is the weighter's only synchronisation with the device per step; it runs under a
    profiler range named ``metaweight::host_read`` so benchmarks can count it on any device.
    """
    with torch.profiler.record_function(HOST_READ):
        flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values])
        return flat.cpu().tolist()


def _groups(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    grouped: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        grouped.setdefault((t.device, t.dtype), []).append(t)
    return grouped


@torch.no_grad()
def nonfinite_flag(loss: Tensor, tensors: Iterable[Tensor | None]) -> Tensor:
    """A float tensor of shape ``[1]`` on ``loss``'s device: 1 if ``loss`` or any floating-point
    entry of ``tensors`` (gradients, buffers; ``None`` and integer tensors are passed over,
    sparse tensors are checked through their values) is inf or NaN, else 0. No host read.

    The check is ``torch._amp_foreach_non_finite_check_and_unscale_`` with an inverse scale of
    1, which leaves every value as it is.
    """
    found = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    dense = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        dense.append(t._values() if t.is_sparse else t)
    for (device, _), group in _groups(dense).items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found = found + flag.to(found.device)
    return found.clamp_max(1.0)


class BufferSnapshot:
    """The module's buffers before a step, in flat storage kept between steps (on their device).

    The buffers of one device and dtype are saved with one ``torch.cat`` into one flat tensor
    (``torch.stack`` for 0-d buffers such as BatchNorm's ``num_batches_tracked``): one launch
    per device and dtype on a GPU, and one op on any device, where a per-buffer copy would be
    one op per buffer (a CPU ``torch._foreach_copy_`` runs one ``copy_`` per tensor).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._key: tuple[Any, ...] | None = None
        self._plan: list[tuple[list[Tensor], Tensor, bool]] = []  # (sources, flat storage, 0-d?)
        self._saved: list[Tensor] = []  # views of the flat storage, one per buffer, its shape
        self._live: list[Tensor] = []
        self._names: list[str] = []

    def _allocate(self, live: list[Tensor]) -> None:
        views: dict[int, Tensor] = {}
        self._plan = []
        scalars: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        tensors: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, b in enumerate(live):
            (scalars if b.dim() == 0 else tensors).setdefault((b.device, b.dtype), []).append(i)
        for zero_d, grouped in ((True, scalars), (False, tensors)):
            for (device, dtype), index in grouped.items():
                sizes = [live[i].numel() for i in index]
                flat = torch.empty(sum(sizes) if not zero_d else len(index), device=device, dtype=dtype)
                for i, piece in zip(index, flat.split([1] * len(index) if zero_d else sizes)):
                    views[i] = piece.view(live[i].shape)
                self._plan.append(([live[i] for i in index], flat, zero_d))
        self._saved = [views[i] for i in range(len(live))]

    @torch.no_grad()
    def save(self) -> None:
        """Copy every buffer (floating point or not) into the snapshot."""
        named = list(self.module.named_buffers())
        live = [b for _, b in named]
        key = tuple((n, id(b), b.shape, b.dtype, b.device) for n, b in named)
        if key != self._key:  # buffers replaced, moved or resized since the last step: new storage
            self._allocate(live)
            self._key = key
        self._names = [n for n, _ in named]
        self._live = live
        for sources, flat, zero_d in self._plan:
            if zero_d:
                torch.stack(sources, out=flat)
            elif all(s.dim() == 1 for s in sources):
                torch.cat(sources, out=flat)
            else:
                torch.cat([s.reshape(-1) for s in sources], out=flat)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the buffers back as :meth:`save` found them; a buffer the forward re-assigned (``self.b =
        self.b + 1``) is put back under its name."""
        if not self._live:
            return
        current = dict(self.module.named_buffers())
        if all(current.get(n) is b for n, b in zip(self._names, self._live)):
            torch._foreach_copy_(self._live, self._saved)
            return
        for name, old, saved in zip(self._names, self._live, self._saved):
            now = current.get(name)
            if now is old:
                old.copy_(saved)
            else:
                owner, _, leaf = name.rpartition(".")
                self.module.get_submodule(owner)._buffers[leaf] = old
                old.copy_(saved)

    def as_dict(self) -> dict[str, Tensor]:
        """The saved buffers by name (views of the snapshot; valid until the next :meth:`save`)."""
        return dict(zip(self._names, self._saved))


class Scratch:
    """Copies of a dict of tensors in storage kept between calls (valid until the next call)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._storage: list[Tensor] = []

    @torch.no_grad()
    def copy_of(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        values = list(tensors.values())
        key = tuple((n, t.shape, t.dtype, t.device) for n, t in tensors.items())
        if key != self._key:
            self._storage = [torch.empty_like(t) for t in values]
            self._key = key
        if values:
            torch._foreach_copy_(self._storage, values)
        return dict(zip(tensors, self._storage))


class StateSnapshot:
    """Gamma, its optimizer's state and the validation objective's state, as device copies."""

    def __init__(self, gamma: Tensor, optimizer: torch.optim.Optimizer, objective: nn.Module | None) -> None:
        self.gamma = gamma.detach().clone()
        self.optimizer = optimizer
        self.optimizer_state = {p: _copy_state(s) for p, s in optimizer.state.items()}
        self.objective = objective
        self.objective_state = ([b.detach().clone() for b in objective.buffers()]
                                if isinstance(objective, nn.Module) else None)

    @torch.no_grad()
    def restore(self, gamma: Tensor) -> None:
        gamma.copy_(self.gamma)
        state = self.optimizer.state
        for p in list(state):
            if p not in self.optimizer_state:
                del state[p]
        for p, saved in self.optimizer_state.items():
            current = state.get(p)
            if isinstance(current, dict) and current.keys() == saved.keys():
                for k, v in saved.items():
                    if isinstance(v, Tensor) and isinstance(current[k], Tensor) and current[k].shape == v.shape:
                        current[k].copy_(v)
                    else:
                        current[k] = _copy_value(v)
            else:
                state[p] = _copy_state(saved)
        if self.objective_state is not None and isinstance(self.objective, nn.Module):
            for b, v in zip(self.objective.buffers(), self.objective_state):
                b.copy_(v)


def _copy_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _copy_state(state: Any) -> Any:
    return {k: _copy_value(v) for k, v in state.items()} if isinstance(state, dict) else copy.deepcopy(state)
