"""The order of ``mode="exact"``'s two calls, watched in Python objects only (no read from the device).

``mode="exact"`` scores the look-ahead of the step to come, so its ``meta_step`` comes before the
forward and the model's step; ``mode="fast"`` and the loss weightings call theirs after the step.
A loop that calls the exact mode's ``meta_step`` after the step, on the batch already stepped on,
or twice for one model step, is warned: at the first meta step (:func:`count_first_loss`,
:func:`warn_if_after_step`), and at every meta step (:func:`warn_if_met_since`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaweight._transaction import gradients_moved
from metaweight._warn import warn_user
from metaweight._weighting import first_labels, optimizer_steps

if TYPE_CHECKING:
    from metaweight._weighter import HarmonizedWeighter


def count_first_loss(w: HarmonizedWeighter, weighted: Tensor, target: Any) -> None:
    """Before the first meta step: count a training ``loss()`` (``weighted``, its labels in ``target``) when a
    backward reaches it, with the optimizer's step count then, for :func:`warn_if_after_step`."""
    # counted when a backward reaches it: a loss() for logging is no training loss (first iteration only)
    labels, counted = first_labels(target), []

    def count(grad: Tensor) -> None:
        if counted or w.num_calls:  # (once; a second backward through a retained graph is no other call)
            return
        counted.append(True)
        steps = optimizer_steps(w._inner_optimizer)
        if w._first_loss is not None and w._first_loss[1] == steps:  # a micro-batch of the same step
            if len(w._first_loss[0]) < 64:
                w._first_loss[0].append(labels)
        else:
            groups = 1 if w._first_loss is None else w._first_loss[2] + 1
            w._first_loss = ([labels], steps, groups)

    weighted.register_hook(count)


def warn_if_after_step(w: HarmonizedWeighter, train_batch: Any) -> None:
    """``mode="exact"``, at the first two-call ``meta_step``: warn when the training ``loss()`` calls of one
    optimizer step came first (one step: a warm-up of several with fixed gamma is no wrong order), the optimizer
    stepped since (the order of ``mode="fast"`` and the loss weightings), and their labels are the batch's cut
    in order (one call: the tensor, or a view of all of it; several, gradient accumulation: views of them or, on
    the CPU, equal to their concatenation). The look-ahead then scores a step on a batch already stepped on."""
    first, w._first_loss = w._first_loss, None
    if first is None or w.num_calls or not isinstance(train_batch, (tuple, list)) or len(train_batch) != 2:
        return
    calls, steps, groups = first
    if groups == 1 and optimizer_steps(w._inner_optimizer) > steps and \
            labels_of(calls, first_labels(train_batch[1])):
        warn_user("mode='exact' scores the look-ahead of the step to come, so its meta_step comes before the "
                  "model's step: weighter.meta_step((x, y), val_batch); loss = weighter.loss(model(x), y); "
                  "loss.backward(); optimizer.step(). This loop called it after the step, on the batch "
                  "already stepped on (the order of mode='fast' and of the loss weightings): gamma learns "
                  "from a step the loop never takes. Move the call before the forward, or build the weighter "
                  "with mode='fast', whose meta_step scores the step just taken.")

def warn_if_met_since(w: HarmonizedWeighter, call: str) -> None:
    """``mode="exact"``: warn when a meta step comes (``call``: a two-call ``meta_step``, or ``step()``,
    which runs its own) after a two-call ``meta_step`` with no optimizer step and no :meth:`~metaweight.HarmonizedWeighter.loss` call since
    (Python objects only): gamma would take two meta steps for one model step; or with a backward since whose
    gradients wait for the step (a meta step per micro-batch of an accumulated step; one host read, where no step
    came since and the gradients changed). A ``GradScaler`` that skipped the step in between does not warn (its
    gradients are not finite), nor a batch the loop skipped before its backward (the gradients unchanged)."""
    if w._met_at is None or not w.learn:
        return
    steps = optimizer_steps(w._inner_optimizer)
    if w._met_at == (steps, w._loss_calls):
        warn_user(f"weighter.{call} runs a meta step, and weighter.meta_step ran one with no optimizer step and no "
                  f"weighter.loss call since: gamma takes two meta steps for one model step. Call meta_step once "
                  f"per iteration, before loss = weighter.loss(model(x), y); step() runs its own meta step and "
                  f"the model's step, so call either step() or the two calls, not both.")
    elif w._met_at[0] == steps and w._met_grads is not None:
        grads = [p.grad for _, p in w._trainable()]
        # (a backward wrote the gradients since that meta step, and they wait for a step: a GradScaler's skip leaves
        # inf, a zero_grad none; a batch skipped before its backward leaves the last step's, unchanged)
        if not unchanged_since(w._met_grads, grads) and gradients_moved(grads):
            warn_user(f"weighter.{call} runs a meta step, and weighter.meta_step ran one with no optimizer step since, "
                      f"only a backward whose gradients wait for a step: with gradient accumulation and a meta step "
                      f"per micro-batch, gamma takes a meta step per micro-batch, each the look-ahead of a step on "
                      f"that micro-batch alone. With accumulation, call meta_step once per optimizer step, before its "
                      f"first micro-batch, with the whole batch (the micro-batches concatenated in order). (A step "
                      f"the loop skipped after its backward, with finite gradients, reads the same.)")
    w._met_at = w._met_grads = None


def grad_marks(grads: Sequence[Tensor | None]) -> list[tuple[Any, int]]:
    """Each gradient as a weak reference and its version (``(None, -1)`` for none), for :func:`unchanged_since`,
    without keeping them alive (Python objects only)."""
    return [(weakref.ref(g), g._version) if g is not None else (None, -1) for g in grads]


def unchanged_since(marks: Sequence[tuple[Any, int]], grads: Sequence[Tensor | None]) -> bool:
    """Whether ``grads`` are the gradients :func:`grad_marks` saw, untouched since (the same objects, versions)."""
    return len(marks) == len(grads) and all(
        (g is None and ref is None) or (g is not None and ref is not None and ref() is g and g._version == version)
        for (ref, version), g in zip(marks, grads))


def labels_of(calls: list[Tensor | None], labels: Tensor | None) -> bool:
    """Whether the labels of one step's ``loss()`` calls are ``labels``: ``labels`` cut in order along the batch
    dimension, as views of it (one call: the tensor itself, or a view of all of it); for several calls also equal
    values, when all are on the CPU (no read from a device)."""
    if labels is None or any(c is None for c in calls):
        return False
    if len(calls) == 1 and calls[0] is labels:
        return True
    if sum(c.shape[0] for c in calls) != labels.shape[0] or any(c.shape[1:] != labels.shape[1:] for c in calls):
        return False
    start, views = 0, True
    for c in calls:
        part = labels[start:start + c.shape[0]]
        start += c.shape[0]
        views = views and c.data_ptr() == part.data_ptr() and c.stride() == part.stride() and c.dtype == part.dtype
    if views:
        return True
    if len(calls) == 1 or labels.device.type != "cpu" or any(c.device.type != "cpu" for c in calls):
        return False  # (no read from the device)
    return all(c.dtype == labels.dtype for c in calls) and torch.equal(torch.cat(calls), labels)
