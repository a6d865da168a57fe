r"""Autograd's gradient against the derivative of the values: stop-gradients inside the model, once.

The model's step uses autograd's gradients :math:`g_k` of the training terms; the meta-gradient
:math:`\partial L_{val}(\theta')/\partial\gamma_k = -\langle D \odot \nabla L_{val}(\theta'), g_k\rangle`
is that of the step really taken when

1. the backend's derivative of the training terms is autograd's: the ``jvp`` backend's
   forward-mode derivative, the ``finite_difference`` backend's and the fast mode's differences
   of values (the criterion's detached targets held fixed); ``higher`` differentiates the step
   by autograd itself; and
2. autograd's gradient of the validation objective is the derivative of its value (the
   objective is a value: :math:`L_{val}(\theta')` after the step).

A stop-gradient or custom backward inside the model breaks them: early heads on detached trunk
features (``h.detach()``, ``h.data``, ``detach_()``, a copy through ``.tolist()`` or NumPy),
gradient equilibrium's ``a * h + (1 - a) * h.detach()``, a rescale computed under
``torch.no_grad()``/``inference_mode()`` or read with ``.item()``, a straight-through estimator,
an ``autograd.Function`` whose backward (or jvp) is not the derivative of its forward. Whatever
the spelling, it shows in the numbers, so this module compares numbers: on float64 copies of the
parameters, buffers and floating inputs (the first :data:`SAMPLES` of each batch; the model
untouched), along one random direction
:math:`v` (each parameter tensor's part scaled to that tensor's RMS), autograd's
:math:`\langle g, v\rangle` against

* (1) the backend's own directional derivative of :math:`\sum_k c_k L_k` (random :math:`c` over
  the active terms): forward mode for ``jvp``, central differences of the values for
  ``finite_difference`` and the fast mode;
* (2) central differences of the validation objective's value,

the differences taken at two pairs of step lengths (:math:`10^{-8}, 10^{-9}` and
:math:`10^{-3}, 10^{-4}` of each tensor's RMS), each pair's disagreement measuring its own error
(rounding, kinks of ReLU crossed, a model that computes below float64 inside); the pair that
agrees best is used: a gap is a mismatch when it is above ``RELATIVE`` of the
derivative and ``NOISE`` times that error. All forwards draw the same random numbers (dropout
masks) and put the generators back; under DistributedDataParallel the numbers are averaged over
the ranks first, so every rank decides alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from metaweight._hypergradient import Reducer, call_with
from metaweight._protocols import ModelCall, Objective, Terms
from metaweight._randomness import model_generators, replay_randomness
from metaweight._tangents import ShortTangents

RELATIVE = 1e-4  # a gap below this fraction of the derivative is not refused
NOISE = 10.0  # ... nor one below this many times the differences' own error
STEPS = ((1e-8, 1e-9), (1e-3, 1e-4))  # pairs of step lengths, relative to each tensor's RMS (float64; and a model
# that rounds below float64 inside, whose best steps are longer): the pair that agrees best is used
SAMPLES = 8  # the check runs on the first samples of each batch (any inputs show a stop-gradient)
RESOLUTION = 0.01  # a check whose differences cannot resolve a gap of this fraction says it could not conclude

MISMATCH = (
    "{what} ({measure}; gap {gap:.3g} of {size:.3g} along a random direction, in float64): the model has a "
    "stop-gradient or a custom backward on that path (h.detach(), h.data, detach_(), torch.no_grad() or "
    "inference_mode(), a rescale read with .item(), a copy through .tolist() or NumPy, a straight-through "
    "estimator, an autograd.Function whose backward is not the derivative of its forward). {consequence} Move the "
    "stop-gradient out of the model (a teacher's detach belongs in the criterion, which may take "
    "`teacher_outputs`), or pass check_gradients=False to accept an approximate meta-gradient. gamma and "
    "everything else are unchanged.")


def _wide(value: Any) -> Any:
    """A float64 copy of a floating tensor (detached), anything else as it is."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def _wide_inputs(inputs: Any) -> Any:
    if isinstance(inputs, ModelCall):
        return ModelCall(tree_map(_wide, tuple(inputs.args)), tree_map(_wide, dict(inputs.kwargs)))
    return tree_map(_wide, inputs)


def _changed(first: Tensor, again: Tensor) -> Tensor:
    """1 where ``again`` is not ``first`` to float64 rounding (a forward that changed state it reads), else 0."""
    tol = 64 * torch.finfo(torch.float64).eps * first.detach().abs().clamp_min(1e-300)
    return ((again.detach() - first.detach()).abs() > tol).to(torch.float64)


def _first(batch: tuple[Any, Any], samples: int) -> tuple[Any, Any]:
    """The batch's first ``samples`` samples (every tensor whose first dimension is the labels'), or the
    batch as it is when its labels are not one tensor with a batch dimension."""
    x, y = batch
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] <= samples:
        return batch
    total = y.shape[0]

    def cut(t: Any) -> Any:
        return t.narrow(0, 0, samples) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == total else t

    if isinstance(x, ModelCall):
        return ModelCall(tree_map(cut, tuple(x.args)), tree_map(cut, dict(x.kwargs))), cut(y)
    return tree_map(cut, x), cut(y)


def _dot(grads: Sequence[Tensor | None], direction: Sequence[Tensor]) -> Tensor:
    parts = [(g.to_dense() if g.layout != torch.strided else g).mul(d).sum()
             for g, d in zip(grads, direction) if g is not None]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=direction[0].device)


def gradient_mismatch(model: nn.Module, terms: Terms, objective: Objective, train: tuple[Any, Any],
                      val: tuple[Any, Any], *, derivative: str, movable: set[str] | None, active: Tensor,
                      reducer: Reducer, run: Callable[[Callable[[], Any]], Any] = lambda f: f()) -> GradientCheck:
    """Whether autograd's gradients are those of the values where the meta step relies on it (see the
    module's docstring): a :class:`GradientCheck` with the refusal's message, if any.

    Args:
        model: the module whose parameters the step moves (unwrapped from DDP).
        terms, objective: the weighter's criterion and validation objective.
        train, val: ``(inputs, labels)`` of the training and the validation batch.
        derivative: how the backend differentiates the training terms: ``"forward"`` (``jvp``),
            ``"values"`` (``finite_difference``, the fast mode) or ``"autograd"`` (``higher``:
            nothing to compare on the training side).
        movable: the names of the parameters the look-ahead moves (``None``: every trainable one).
        active: the terms' mask (1 on active terms).
        reducer: averages the compared numbers over ranks.
        run: calls the function it is given (to run the forwards with the weighter's capture paused).

    Raises:
        whatever the model's forward raises on float64 copies (the caller decides).
    """
    (x, y), (xv, yv) = _first(train, SAMPLES), _first(val, SAMPLES)
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and p.is_floating_point() and (movable is None or n in movable)]
    if not named:
        return GradientCheck(None, None)
    device = named[0][1].device
    params = {n: _wide(p) for n, p in model.named_parameters()}
    for n, _ in named:
        params[n].requires_grad_(True)
    leaves = [params[n] for n, _ in named]
    saved = {n: _wide(b) for n, b in model.named_buffers()}
    x, y, xv, yv = _wide_inputs(x), tree_map(_wide, y), _wide_inputs(xv), tree_map(_wide, yv)
    generator = torch.Generator(device=device).manual_seed(20210202)  # its own: the user's random numbers untouched
    with torch.no_grad():
        rms = [p.square().mean().sqrt() if p.numel() else p.new_zeros(()) for p in leaves]
        floor = torch.stack(rms).max().clamp_min(1e-3)  # (a tensor of zeros, a bias at init, moves at the others')
        direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64, device=device)
                     * torch.where(r > 1e-3 * floor, r, floor) for p, r in zip(leaves, rms)]
    weights = torch.randn(active.numel(), generator=generator, dtype=torch.float64, device=device) \
        * active.to(device=device, dtype=torch.float64)

    def fresh() -> dict[str, Tensor]:
        return {n: b.clone() if isinstance(b, Tensor) else b for n, b in saved.items()}

    def moved(t: float) -> dict[str, Tensor]:
        return {**params, **{n: (p + t * d).detach() for (n, _), p, d in zip(named, leaves, direction)}}

    def difference(value: Callable[[dict[str, Tensor]], Tensor]) -> list[Tensor]:
        """Central differences of ``value`` along the direction, at every step length of :data:`STEPS`."""
        with torch.no_grad():
            return [(value(moved(h)) - value(moved(-h))) / (2 * h) for pair in STEPS for h in pair]

    numbers: list[Tensor] = []
    kind = [derivative]  # (the forward mode may give way to differences, as the jvp backend does)
    with replay_randomness(device, model_generators(model), model) as replay, \
            torch.autocast(device.type, enabled=False):

        def train_value(at: dict[str, Tensor], teachers: Any = None) -> tuple[Tensor, Any]:
            """The weighted terms at ``at``: as the model's step computes them (``teachers`` None; with the
            detached outputs, for the differences), or with ``teachers`` held fixed, as the differences do."""
            with replay():
                outputs = call_with(model, at, fresh(), x)
                held = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs)
                fixed = teachers if teachers is not None and terms.fixed_targets else None
                return (weights * terms(outputs, y, teacher_outputs=fixed).to(torch.float64)).sum(), held

        def val_losses(at: dict[str, Tensor]) -> Tensor:
            with replay():
                return objective.losses(call_with(model, at, fresh(), xv), yv).to(torch.float64)

        def compute() -> None:
            if derivative != "autograd":  # the training side: [autograd, the jvp's tangent (or nan), differences]
                value, teachers = train_value(params)
                numbers.append(_dot(torch.autograd.grad(value, leaves, allow_unused=True), direction))
                tangent = torch.full((), float("nan"), dtype=torch.float64, device=device)
                if kind[0] == "forward":
                    try:
                        with torch.no_grad(), fwAD.dual_level():
                            dual = {**params, **{n: fwAD.make_dual(p.detach(), d)
                                                 for (n, _), p, d in zip(named, leaves, direction)}}
                            with replay(), ShortTangents():
                                out = (weights * terms(call_with(model, dual, fresh(), x), y).to(torch.float64)).sum()
                            found = fwAD.unpack_dual(out).tangent
                        tangent = torch.zeros_like(value) if found is None else found.detach()
                    except NotImplementedError as exc:
                        if "forward AD" not in str(exc) and "forward mode AD" not in str(exc):
                            raise
                        kind[0] = "values"  # as the jvp backend does: it continues by differences
                numbers.append(tangent.reshape(()).to(torch.float64))
                with torch.no_grad():  # the same value again: a forward that is a function of the parameters
                    numbers.append(_changed(value, train_value(params)[0]))
                numbers.extend(difference(lambda at: train_value(at, teachers)[0]))
            # the validation side: the objective's own weighting of the exits' losses, as the meta step takes
            # it (a balance it holds fixed by design is not the model's), then the model's part, the losses
            losses = val_losses(params)
            held = losses.detach().requires_grad_(True)
            (exits,) = torch.autograd.grad(objective.objective(held), held)
            value = (exits * losses).sum()
            numbers.append(_dot(torch.autograd.grad(value, leaves, allow_unused=True), direction))
            numbers.append(torch.full((), float("nan"), dtype=torch.float64, device=device))
            with torch.no_grad():
                numbers.append(_changed(value, (exits * val_losses(params)).sum()))
            numbers.extend(difference(lambda at: (exits * val_losses(at)).sum()))

        with torch.enable_grad():
            run(compute)
    flat = reducer.mean([torch.stack([n.detach().reshape(()) for n in numbers])])[0].tolist()
    width = 3 + 2 * len(STEPS)
    sides = [flat[i:i + width] for i in range(0, len(flat), width)]
    found = []
    if kind[0] != "autograd":
        found.append(_judge(sides.pop(0), kind[0] == "forward", TRAIN_SIDE[kind[0]]))
    found.append(_judge(sides[0], False, VAL_SIDE))
    refusals = [f for f in found if f.refused]
    return GradientCheck(refusals[0].message if refusals else None,
                         next((f.message for f in found if f.inconclusive), None) if not refusals else None,
                         all(f.finite for f in found))


@dataclass
class GradientCheck:
    """What :func:`gradient_mismatch` found: the refusal's message, or the warning that it could not
    conclude (the differences too noisy to resolve a gap of :data:`RESOLUTION`), or neither;
    ``finite`` is ``False`` where a number was not finite (non-finite data: nothing concluded)."""

    refusal: str | None
    inconclusive: str | None
    finite: bool = True


@dataclass
class _Side:
    refused: bool
    inconclusive: bool
    message: str
    finite: bool = True


def _judge(numbers: list[float], forward: bool, words: tuple[str, str, str, str]) -> _Side:
    """One side's verdict from ``[autograd, tangent, changed, differences at each step of STEPS...]``
    (``changed``: the value at the parameters recomputed differs, see :func:`_changed`): the
    reference is the tangent (``forward``) or the difference of the pair of steps that agree best;
    the error the noise of that pair."""
    autograd, tangent, changed, rest = numbers[0], numbers[1], numbers[2], numbers[3:]
    if changed > 0:
        return _Side(False, True, INCONCLUSIVE.format(
            what=words[3], why="the forward gave other values when run again at the same parameters, inputs and "
                               "random numbers: it changes state it reads, e.g. a call counter"))
    pairs = [(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
    first, second = min(pairs, key=lambda p: abs(p[0] - p[1]) if math.isfinite(p[0] - p[1]) else math.inf)
    noise = abs(first - second)
    reference = tangent if forward else first
    gap, size = abs(autograd - reference), max(abs(autograd), abs(reference))
    if not all(math.isfinite(v) for v in (gap, size, noise)):
        return _Side(False, False, "", finite=False)  # (non-finite data: the step refuses it; checked next time)
    refused = gap > RELATIVE * size and gap > NOISE * noise
    inconclusive = not refused and NOISE * noise > RESOLUTION * size
    if refused:
        return _Side(True, False, MISMATCH.format(what=words[0], measure=words[1], gap=gap, size=size,
                                                  consequence=words[2]))
    why = f"its differences in float64 disagree by {noise:.3g} of {size:.3g}: the model rounds below float64 inside"
    return _Side(False, inconclusive, INCONCLUSIVE.format(what=words[3], why=why))


TRAIN_SIDE = {
    "forward": ("The forward-mode derivative of the training terms (backend='jvp') differs from autograd's gradient",
                "the model's step uses autograd's",
                "backend='jvp' would differentiate a step the model does not take; backend='higher' differentiates "
                "autograd's step.",
                "the forward-mode derivative of the training terms (backend='jvp')"),
    "values": ("Autograd's gradient of the training terms differs from the derivative of their values",
               "the model's step uses autograd's; backend='finite_difference' and mode='fast' take the values'",
               "The meta-gradient would be that of a step the model does not take; backend='jvp' or 'higher' "
               "(mode='exact') may differentiate autograd's step.",
               "autograd's gradient of the training terms"),
}
VAL_SIDE = ("Autograd's gradient of the validation losses differs from the derivative of their values",
            "gamma's meta-gradient needs the derivative of their values after the step",
            "Every backend and mode takes the validation gradient by autograd, so gamma would move along another "
            "direction than the validation objective's.",
            "autograd's gradient of the validation losses")
INCONCLUSIVE = (
    "metaweight could not check {what} against the derivative of the values ({why}). The meta-gradient is exact "
    "only if the model has no stop-gradient or custom backward (detach, .data, no_grad, .item() rescales, "
    "straight-through estimators) on that path; pass check_gradients=False to silence this.")
