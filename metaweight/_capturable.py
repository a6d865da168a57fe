r"""``capturable=True``: ``mode="fast"``'s step with no host read and the same operations whatever the data.

A CUDA graph (``torch.cuda.graph``) records a fixed sequence of kernels and replays it without running
Python: what it captures must not read a value back to the host (a synchronisation, not allowed while
capturing) nor branch in Python on one (the branch taken at capture would be replayed for every batch).
:class:`CapturableFast` is the fast mode's one-call step (:mod:`metaweight._fast`) kept to those rules.
Every decision the eager step reads back to the host is applied on the device instead:

* the model's step is skipped on the device by its fused optimizer, which reads the step's non-finite
  flag from its ``found_inf`` attribute (as ``torch.amp.GradScaler`` has it skip a step), and the
  model's buffers are put back by ``torch.where`` (:meth:`BufferSnapshot.restore_where`);
* gamma, its optimizer's state and the validation average step, then are put back by ``torch.where``
  where the meta step is refused (non-finite objective or meta-gradient, gamma non-finite or, with
  ``constraint="normalize"``, all zero after its step, a non-finite validation input, or the model's
  step refused);
* the numbers of the step and the counts of calls, meta steps and skipped steps stay on the device
  (:class:`DeviceRecord`; :meth:`HarmonizedWeighter.sync_counts` brings the counts to the host).

The calls before the optimizers hold state (normally the first), and a call in which a parameter group of a
fused SGD with momentum gets its first gradients (parameters unfrozen later, in a group of their own: torch makes
their buffers with ``empty_like`` and fills them in the kernel, which a refused step leaves unwritten), run the
eager step, whose checks read
the host (the labels, the first meta step's gradient check) and which checks once that the training
forward draws no random numbers (the difference's forward could not draw the same ones without
rewinding the generators, which a capture cannot do) and that the labels hold no padding. So warm up
outside the capture, as ``torch.cuda.graphs`` asks anyway; the labels are not checked after that: they
must lie in range (on a GPU a label out of range is a device-side assert) and hold no padding (the
device step scores every label).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from metaweight._checks import float_leaves, unchecked_labels, unpack_batch
from metaweight._fast import Piece, before_step, clip_in_step
from metaweight._hypergradient import call_with
from metaweight._on_outputs import unwrapped
from metaweight._protocols import call_model
from metaweight._randomness import model_generators, rng_state, same_rng_state, set_rng_state
from metaweight._record import MetaStepRecord
from metaweight._transaction import FlatCopies, fused_step, host_read, nonfinite_flag, step_unless
from metaweight._walk import walk

if TYPE_CHECKING:  # (the weighter imports this module)
    from metaweight._weighter import HarmonizedWeighter

RANDOM = ("capturable=True: the training forward draws random numbers (dropout or the like). The meta step's "
          "difference needs the forward's own random numbers again, which it gets by rewinding the generators, and "
          "a CUDA graph cannot rewind them. Use capturable=False (the eager mode='fast' replays them), or a model "
          "that draws none in training.")


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceRecord:
    """What one call of :meth:`HarmonizedWeighter.device_step` did, as tensors on the model's device that
    no one has read (under a CUDA graph's replay, the same tensors, rewritten by each replay).

    Attributes:
        term_names: the names of the training terms, in the order of ``terms`` and ``gamma``.
        loss: ``[]``, the weighted training loss.
        terms: ``[K]``, the unweighted training terms.
        gamma: ``[K]``, the loss weights after the call.
        gamma_grad: ``[K]``, the meta-gradient this call computed (meaningful where ``meta_step_taken``).
        val_objective: ``[]``, :math:`L_{val}(\\theta')`.
        val_exit_losses: ``[E]``, the validation objective's losses at :math:`\\theta'`.
        model_step_taken: ``[]`` bool, whether the model stepped (its loss, gradients and updated buffers
            finite on every rank).
        meta_step_taken: ``[]`` bool, whether gamma stepped.
        counts: ``[3]`` int64, the weighter's ``num_calls``, ``num_meta_steps`` and ``num_skipped`` after the
            call (a call whose model step was refused is not counted, as the eager step does not).
        per_exit: whether ``val_exit_losses`` are the validation objective's per-exit losses; for a plain
            callable objective its one loss is ``val_objective``, and the record read has none.
    """

    term_names: list[str]
    loss: Tensor
    terms: Tensor
    gamma: Tensor
    gamma_grad: Tensor
    val_objective: Tensor
    val_exit_losses: Tensor
    model_step_taken: Tensor
    meta_step_taken: Tensor
    counts: Tensor
    per_exit: bool = True

    def read(self) -> MetaStepRecord:
        """The record's values on the host, in one transfer, as a :class:`MetaStepRecord`."""
        return self.read_with_counts()[0]

    def read_with_counts(self) -> tuple[MetaStepRecord, tuple[int, int, int]]:
        """:meth:`read`, and ``counts`` (calls, meta steps, skipped) from the same transfer."""
        k, e = len(self.term_names), self.val_exit_losses.numel()
        values = host_read([self.loss, self.terms, self.gamma, self.gamma_grad, self.val_objective,
                            self.val_exit_losses, self.model_step_taken, self.meta_step_taken, self.counts])
        loss, terms, gamma = values[0], values[1:1 + k], values[1 + k:1 + 2 * k]  # (then gamma_grad's k)
        objective, losses = values[1 + 3 * k], values[2 + 3 * k:2 + 3 * k + e]
        model_taken, meta_taken = values[2 + 3 * k + e] == 1.0, values[3 + 3 * k + e] == 1.0
        calls, meta_steps, skipped = (int(v) for v in values[4 + 3 * k + e:7 + 3 * k + e])
        message = None
        if not model_taken:
            message = ("The weighted training loss, its gradient or a buffer the forward updated is not finite: the "
                       "step was skipped on the device (parameters, buffers, optimizer state, gamma and the "
                       "validation average as before it).")
        elif not meta_taken:
            message = ("The meta step was not finite (validation input, objective, meta-gradient or gamma after "
                       "its step): skipped on the device; the model's step stands.")
        # (a model step refused is not counted: its record reports the iteration it was made as, as the eager step's)
        return MetaStepRecord(calls + (not model_taken), ran=model_taken, skipped=not (model_taken and meta_taken),
                              meta_step=meta_steps,
                              val_objective=objective if model_taken else None,
                              val_exit_losses=losses if model_taken and self.per_exit else None,
                              gamma_grad=self.gamma_grad.detach().clone() if meta_taken else None,
                              gamma=dict(zip(self.term_names, gamma)), terms=dict(zip(self.term_names, terms)),
                              loss=loss, model_step_skipped=not model_taken, message=message), \
            (calls, meta_steps, skipped)


def check(w: HarmonizedWeighter) -> None:
    """Refuse what the capturable step cannot do, saying what to do instead: at construction, and at every
    call (an option set since: ``learn``, ``mode``, ``meta_every``, ``nonfinite``, an optimizer's options).
    Python objects only: no read."""
    from metaweight._validation import BalancedValidation

    fix = "Build the weighter with capturable=False, or"
    if w.mode != "fast" or not w.learn:
        raise ValueError(f"capturable=True is the one-call step of mode='fast' with learn=True (got mode="
                         f"{w.mode!r}, learn={w.learn}). {fix} with mode='fast'. Nothing was changed.")
    if w.meta_every != 1:
        raise ValueError(f"capturable=True takes a meta step at every call (a schedule is a Python branch, which a "
                         f"captured graph replays as captured); got meta_every={w.meta_every}. {fix} with "
                         f"meta_every=1. Nothing was changed.")
    if w.nonfinite != "skip":
        raise ValueError("capturable=True skips a non-finite step on the device and cannot raise (raising needs the "
                         "decision on the host). Pass nonfinite='skip'. Nothing was changed.")
    check_optimizer(w._inner_optimizer)
    if w._objective.per_exit and not isinstance(unwrapped(w.validation), BalancedValidation):
        raise ValueError(f"capturable=True folds the validation average on the device; "
                         f"`{type(w.validation).__name__}.update` may read the host. Use BalancedValidation, or an "
                         f"objective without exit_losses (no average). Nothing was changed.")
    gamma_optimizer = w.gamma_optimizer
    on_cuda = w.gamma.device.type == "cuda"
    if type(gamma_optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) or (
            type(gamma_optimizer) is not torch.optim.SGD and not all(
                g.get("fused") or (g.get("capturable") and on_cuda) for g in gamma_optimizer.param_groups)):
        without = "" if type(gamma_optimizer) is torch.optim.SGD else " without them"
        raise ValueError(f"capturable=True steps gamma on the device: its optimizer must be SGD, or Adam/AdamW with "
                         f"fused=True (or capturable=True, on CUDA), whose step count stays on the device; got "
                         f"{type(gamma_optimizer).__name__}{without}. Pass "
                         f"gamma_optimizer='adam' or 'sgd' (built so). Nothing was changed.")


def check_optimizer(inner: torch.optim.Optimizer) -> None:
    """The model's optimizer must be a fused SGD, Adam or AdamW (at construction, and at every call: an option set
    since)."""
    kinds = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
    both = sorted({k for g in inner.param_groups if g.get("fused") for k in ("foreach", "differentiable") if g.get(k)})
    if type(inner) in kinds and both:
        raise ValueError(f"The {type(inner).__name__}'s parameter groups have fused=True and {both[0]}=True (set "
                         f"since construction: torch refuses them together): set {both[0]}=False. Nothing was "
                         f"changed.")
    if not fused_step(inner):
        raise ValueError(f"capturable=True skips a refused step on the device through the optimizer's `found_inf` "
                         f"(as torch.amp.GradScaler does), which only fused optimizers read: use "
                         f"torch.optim.SGD, Adam or AdamW with fused=True (on CUDA, Adam and AdamW with "
                         f"capturable=True too, which torch asks of an optimizer a CUDA graph captures); got "
                         f"{type(inner).__name__}{' without fused=True' if type(inner) in kinds else ''}. Nothing "
                         f"was changed.")


def gamma_optimizer(name: str, gamma: Tensor, lr: float) -> torch.optim.Optimizer:
    """gamma's optimizer for ``capturable=True``: fused (and on CUDA capturable, as a graph needs) Adam, or SGD."""
    if name == "sgd":
        return torch.optim.SGD([gamma], lr=lr)
    return torch.optim.Adam([gamma], lr=lr, fused=True, capturable=gamma.device.type == "cuda")


class CapturableFast:
    """The fast mode's one-call step with its decisions on the device (see the module docstring)."""

    def __init__(self) -> None:
        self._state = FlatCopies()  # gamma, its optimizer's state, the validation average: before the meta step
        self.counts: Tensor | None = None  # [calls, meta steps, skipped], int64 on the device
        self._checked_randomness = False
        self._model_stepped = False  # a warm-up step was taken
        self.eager = False  # whether the last call ran the eager step

    def ready(self, w: HarmonizedWeighter) -> bool:
        """Whether the device step can run: a warm-up step was taken (the optimizers' state made, on the host), the
        gradient check done (``check_gradients``)."""
        gamma_ready = type(w.gamma_optimizer) is torch.optim.SGD and not any(
            g.get("momentum", 0) for g in w.gamma_optimizer.param_groups) or w.gamma in w.gamma_optimizer.state
        # a model step taken (its momentum buffers made) and the first meta step's gradient check done
        return self.counts is not None and self._model_stepped and w._gradients_checked and gamma_ready

    def sync(self, w: HarmonizedWeighter) -> None:
        """The device's counts into the weighter's ``num_calls``, ``num_meta_steps``, ``num_skipped`` (one read)."""
        if self.counts is not None:
            w.num_calls, w.num_meta_steps, w.num_skipped = (int(v) for v in host_read([self.counts]))

    def reset(self, w: HarmonizedWeighter) -> None:
        """The device's counts from the weighter's (after a warm-up step or a checkpoint's load; not captured)."""
        values = torch.tensor([w.num_calls, w.num_meta_steps, w.num_skipped], dtype=torch.int64)
        if self.counts is None:
            self.counts = values.to(w.gamma.device)
        else:
            self.counts.copy_(values)

    def step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> DeviceRecord:
        """:meth:`HarmonizedWeighter.device_step` (``eager`` says afterwards whether it ran the eager step)."""
        check(w)  # (Python objects only, no read: options set since construction are refused at every call)
        self.eager = not self.ready(w)
        if self.eager:
            return self._warm_up(w, train_batch, val_batch)
        try:
            with unchecked_labels():  # (checked in the warm-up)
                return self._device_step(w, train_batch, val_batch)
        except _FirstMomentumStep:  # nothing changed: this call is the eager step
            self.eager = True
            return self._warm_up(w, train_batch, val_batch)

    def _device_step(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> DeviceRecord:
        w._check_loop()
        x, y = unpack_batch(train_batch, "train_batch")
        xv, yv = unpack_batch(val_batch, "val_batch")
        named = w._trainable()
        device = next(p.device for _, p in named)
        counts = self.counts
        assert counts is not None
        leaves = tree_leaves((x, y, xv, yv))
        elsewhere = [tuple(t.shape) for t in leaves if isinstance(t, Tensor) and t.device != device]
        if elsewhere:
            raise ValueError(f"capturable=True: the batches hold tensors of shapes {elsewhere} off the model's device "
                             f"({device}); a captured graph cannot copy from the host. Move them to {device} first "
                             f"(into the tensors the graph captured). Nothing was changed.")
        low = torch.is_autocast_enabled(device.type)
        buffers = w._transaction.buffers
        buffers.save()
        w._pending = w._stepped = None  # (no two-call form: a capturable weighter registers none of its hooks)
        try:
            outputs = call_model(w.model, x)
            if not buffers.unchanged():
                raise ValueError("capturable=True: the forward registered, replaced, removed or resized a buffer; a "
                                 "captured step needs the same buffers at every call (a mask built once, at its "
                                 "largest size). Use capturable=False for this model. Nothing was changed (the "
                                 "buffers are put back).")
            terms = w._terms(outputs, y)
            loss = w._weighted(terms)
            w._zero_grad()
            loss.backward()
            w._check_outside_model()  # (Python objects only: the same at every call)
            _check_momentum_buffers(w._inner_optimizer)
            grads = [p.grad for _, p in walk(w.module).parameters]
            flag = nonfinite_flag(loss, grads)
            flag = (flag + buffers.became_nonfinite(flag.device)).clamp_max(1.0)
            bad_val = nonfinite_flag(torch.zeros((), device=device), float_leaves(xv))
            flag, bad_val = w._reducer.mean([flag, bad_val])
            refused = flag.reshape(()) > 0  # the model's step
            transform = clip_in_step(w, named) if w.clip_grad_norm is not None else None
            theta, jac = before_step(w._inner_optimizer, named, [p.grad for _, p in named], w.gamma, w._active)
            step_unless(w.optimizer, w._inner_optimizer, refused)
            buffers.restore_where(refused)
        except Exception:  # up to the model's step (a fused step raises before it writes): only the buffers moved
            w._zero_grad()
            buffers.restore()
            raise
        # the meta step at the parameters the model moved to (or did not: then refused below)
        piece = Piece(x, y, terms.detach(), outputs, contextlib.nullcontext, low)
        try:
            gamma_grad, objective, exit_losses, reported = w._fast.meta_gradient(
                w, named, theta, jac, [piece], xv, yv, buffers.as_dict(), transform)
            taken = self._step_gamma(w, gamma_grad, objective, exit_losses, refused | (bad_val.reshape(()) > 0))
        except Exception as exc:  # after the model's step, which stands (as in the eager fast step)
            with torch.no_grad():
                counts[0] += (~refused).to(torch.int64)
            if hasattr(exc, "add_note"):
                exc.add_note("metaweight: this error came after the model's step (capturable=True), which stands "
                             "where it was finite and is counted; gamma, its optimizer and the validation average "
                             "are as before. Do not call the step again on this batch.")
            raise
        with torch.no_grad():
            # as the eager step counts: a refused model step is not a call, a refused step of either kind is skipped
            counts.add_(torch.stack([~refused, taken, ~taken]).to(torch.int64))
        return DeviceRecord(list(w.term_names), loss.detach(), reported, w.gamma.detach().clone(),
                            gamma_grad.detach(), objective.detach(), exit_losses.detach(), ~refused, taken,
                            counts.clone(), w._objective.per_exit)

    @torch.no_grad()
    def _step_gamma(self, w: HarmonizedWeighter, gamma_grad: Tensor, objective: Tensor, exit_losses: Tensor,
                    refused: Tensor) -> Tensor:
        """gamma's step and the validation average's update, put back where refused: returns whether taken
        (``[]`` bool), as :meth:`HarmonizedWeighter._step_gamma` and ``_meta_outcome`` decide, on the device."""
        held = _held(w)
        saved = self._state.copy(held)
        try:
            finite, stepped = w._gamma_step(gamma_grad, objective, exit_losses)
            w._objective.update(exit_losses)
        except Exception:
            for now, before in zip(held, saved):
                now.copy_(before)
            raise
        taken = finite & stepped & ~refused
        for now, before in zip(held, saved):
            now.copy_(torch.where(taken, now, before))
        return taken

    @torch.no_grad()
    def undo_meta_step(self, w: HarmonizedWeighter) -> None:
        """Put gamma, its optimizer's state and the validation average back as they were before the last device
        step's meta step, and uncount it (for :meth:`HarmonizedWeighter.step`, whose hook raised on it, as the
        eager step puts back a meta step whose hook raised). Not captured: call it after a :meth:`step` whose
        meta step was taken, before the next."""
        assert self.counts is not None
        for now, before in zip(_held(w), self._state.copies):
            now.copy_(before)
        self.counts[1] -= 1
        w.num_meta_steps -= 1

    def _warm_up(self, w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> DeviceRecord:
        """The eager step (its checks read the host), once the training forward is found to draw no random
        numbers; then the device's counts and storage for the device step."""
        if not self._checked_randomness:
            self._check_randomness(w, train_batch)
        _check_no_padding(w, train_batch, val_batch)
        self.sync(w)  # the eager step counts on the host from the device's counts (device_step() reads none)
        try:
            record = w._fast.step(w, train_batch, val_batch)
        finally:  # (an error after the eager model's step, a hook's, leaves that step counted: on the device too)
            self.reset(w)
        self._model_stepped = self._model_stepped or not record.model_step_skipped
        return _from_record(w, record, self.counts)  # type: ignore[arg-type]

    def _check_randomness(self, w: HarmonizedWeighter, train_batch: Any) -> None:
        x, _ = unpack_batch(train_batch, "train_batch")
        device = next(p.device for p in w.module.parameters())
        generators = model_generators(w.module)
        start = rng_state(device, generators)
        try:
            with torch.no_grad():
                call_with(w.module, dict(w.module.named_parameters()),
                          {n: b.clone() for n, b in w.module.named_buffers()}, x)
            drew = not same_rng_state(start, rng_state(device, generators))
        finally:
            set_rng_state(start, device)
        if drew:
            raise ValueError(RANDOM + " Nothing was changed.")
        self._checked_randomness = True


def _held(w: HarmonizedWeighter) -> list[Tensor]:
    """What a refused meta step puts back: gamma, its optimizer's state tensors, the validation average."""
    held = [w.gamma] + [v for s in w.gamma_optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    if isinstance(w.validation, torch.nn.Module):
        held += list(w.validation.buffers())
    return held


def _check_no_padding(w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> None:
    """Refuse labels holding padding (``ignore_index``) in a warm-up batch: the device step scores every
    label (leaving padding out is a selection whose size depends on the data, which a graph cannot hold)."""
    padded = []
    for name, batch, part in (("train_batch", train_batch, w.criterion), ("val_batch", val_batch, w.validation)):
        _, y = unpack_batch(batch, name)
        index = getattr(part, "ignore_index", None)
        if isinstance(y, Tensor) and not y.is_floating_point() and isinstance(index, int) and \
                bool(host_read([(y == index).any()])[0]):
            padded.append(f"{name} (ignore_index={index})")
    if padded:
        raise ValueError(f"capturable=True: the labels of {', '.join(padded)} hold padding. The device step scores "
                         f"every label: leaving padding out is a selection whose size depends on the data, which a "
                         f"captured graph cannot hold. Use capturable=False for padded batches. Nothing was changed.")


class _FirstMomentumStep(Exception):
    """A parameter group's first momentum step, which the device step hands to the eager step (see
    :func:`_check_momentum_buffers`)."""


def _check_momentum_buffers(inner: torch.optim.Optimizer) -> None:
    """Before the model's step, from the gradients backward left (Python objects only): a fused SGD with
    momentum whose parameter group gets its first gradients now makes its momentum buffers with
    ``torch.empty_like`` and fills them in the kernel, which a refused step (``found_inf``) leaves unwritten:
    garbage the next step would add in. Raises :class:`_FirstMomentumStep` for such a step (outside a CUDA
    graph capture the call runs the eager step, which takes no refused step; under a capture a ``ValueError``),
    and a ``ValueError`` for a group where some parameters have momentum buffers and others get their first
    gradient (which torch's fused SGD cannot step). Adam's first step is safe: its state starts at zero."""
    if not isinstance(inner, torch.optim.SGD):
        return
    for i, group in enumerate(inner.param_groups):
        if not group.get("momentum", 0):
            continue
        stepped = [p for p in group["params"] if p.grad is not None]
        started = ["momentum_buffer" in inner.state.get(p, {}) for p in stepped]
        if all(started):
            continue
        if any(started):
            raise ValueError(
                f"Parameter group {i} of the fused SGD holds parameters with momentum buffers and "
                f"{started.count(False)} that get their first gradient now (unfrozen, or used for the first time): "
                f"torch's fused SGD cannot step such a group (it starts the momentum of a whole group at once). Put "
                f"parameters that start training later in a parameter group of their own "
                f"(optimizer.add_param_group). Nothing was changed.")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"Parameter group {i} of the fused SGD takes its first momentum step in this call: its momentum "
                f"buffers are made now, which a captured graph cannot hold (a refused step would leave them "
                f"unwritten). Run one step of the new parameters outside the capture (device_step() runs it as the "
                f"eager step), then capture again. Nothing was changed.")
        raise _FirstMomentumStep


def _from_record(w: HarmonizedWeighter, record: MetaStepRecord, counts: Tensor) -> DeviceRecord:
    """A record of the eager step as a :class:`DeviceRecord` (the warm-up's)."""
    device = w.gamma.device

    def vector(values: Sequence[float] | None, n: int) -> Tensor:
        return torch.tensor(list(values) if values is not None else [float("nan")] * n, dtype=torch.float64,
                            device=device)

    names = list(w.term_names)
    terms = record.terms or {}
    grad = record.gamma_grad if record.gamma_grad is not None else vector(None, len(names))
    losses = record.val_exit_losses
    return DeviceRecord(names, vector([record.loss if record.loss is not None else float("nan")], 1)[0],
                        vector([terms.get(n, float("nan")) for n in names], len(names)),
                        w.gamma.detach().clone(), grad.detach().to(device),
                        vector([record.val_objective if record.val_objective is not None else float("nan")], 1)[0],
                        vector(losses, 1 if losses is None else len(losses)),
                        torch.tensor(not record.model_step_skipped, device=device),
                        torch.tensor(record.ran and not record.skipped, device=device), counts.clone(),
                        w._objective.per_exit)

