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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from metaweight._backends import (CHECKPOINTING, FiniteDifferenceBackend, HigherBackend, JvpBackend,
                                  caller_hooks_in_force)
from metaweight._checks import unpack_batch
from metaweight._hypergradient import Reducer, call_with
from metaweight._protocols import ModelCall, Objective, Terms
from metaweight._randomness import NEW_GENERATOR, model_generators, new_generators, replay_randomness
from metaweight._tangents import ShortTangents, dual_level
from metaweight._transaction import host_read, registered_buffers_removed
from metaweight._warn import warn_user

if TYPE_CHECKING:  # (the weighter imports this module)
    from metaweight._weighter import HarmonizedWeighter

RELATIVE = 1e-4  # a gap below this fraction of the derivative is not refused
RELATIVE_OWN = 1e-2  # ... in the model's own dtype (a model that cannot run on float64 copies)
NOISE = 10.0  # ... nor one below this many times the differences' own error
STEPS = ((1e-8, 1e-9), (1e-3, 1e-4))  # pairs of step lengths, relative to each tensor's RMS (float64; and a model
# that rounds below float64 inside, whose best steps are longer): the pair that agrees best is used
SAMPLES = 8  # the check runs on this many samples of each batch, spread over it
OFFSET = 1e-4  # the base point: theta moved by this fraction of each tensor's RMS, off exact zeros
STEPS_OWN = ((1e-2, 1e-3), (1e-3, 1e-4))  # ... in the model's own dtype (float32 rounds at 6e-8)
RESOLUTION = 0.01  # a check whose differences cannot resolve a gap of this fraction says it could not conclude

MISMATCH = (
    "{what} ({measure}; gap {gap:.3g} of {size:.3g} along a random direction, in float64): the model, the "
    "criterion or the validation objective has a stop-gradient or a custom backward on that path (h.detach(), "
    "h.data, detach_(), torch.no_grad() or inference_mode(), a rescale read with .item(), a copy through "
    ".tolist() or NumPy, a straight-through estimator, an autograd.Function whose backward is not the derivative "
    "of its forward), or a cast to float16 or bfloat16 inside (.to(torch.bfloat16), .half()), whose rounding "
    "moves the derivative about 1e-3 of its size apart from the differences. {consequence} Move the stop-gradient "
    "or the cast out (a teacher's detach belongs in the criterion, "
    "which may take `teacher_outputs`), or pass check_gradients=False to accept an approximate meta-gradient. "
    "gamma and everything else are unchanged.")


def _wide(value: Any, wide: bool = True) -> Any:
    """A float64 copy of a floating tensor (detached; with ``wide=False`` a copy in its own dtype),
    anything else as it is."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64) if wide else value.detach().clone()
    return value


def _wide_inputs(inputs: Any, wide: bool = True) -> Any:
    def one(v: Any) -> Any:
        return _wide(v, wide) if wide else v
    if isinstance(inputs, ModelCall):
        return ModelCall(tree_map(one, tuple(inputs.args)), tree_map(one, dict(inputs.kwargs)))
    return tree_map(one, inputs)


class ReentrantCheckpoint(Exception):
    """The training forward holds reentrant activation checkpointing (a refusal, not a failure)."""


REENTRANT = (
    "The model uses reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), whose "
    "backward recomputes the forward with the module's own parameters, not the look-ahead's, and accumulates "
    "their gradients as a side effect: every mode and backend would take the meta-gradient at the wrong point "
    "(about 0.3 off, relative, on a 3-exit MLP). Use use_reentrant=False with mode='fast' or backend='higher', or "
    "turn checkpointing off for the weighter. gamma and everything else are unchanged.")


def _reentrant_checkpoint(value: Tensor, limit: int = 200_000) -> bool:
    """Whether ``value``'s autograd graph holds a reentrant checkpoint's node (``CheckpointFunctionBackward``)."""
    seen, stack = set(), [value.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _changed(first: Tensor, again: Tensor) -> Tensor:
    """1 where ``again`` is not ``first`` to float64 rounding (a forward that changed state it reads), else 0."""
    tol = 64 * torch.finfo(torch.float64).eps * first.detach().abs().clamp_min(1e-300)
    return ((again.detach() - first.detach()).abs() > tol).to(torch.float64)


def _spread(batch: tuple[Any, Any], samples: int) -> tuple[Any, Any]:
    """``samples`` samples spread evenly over the batch (every tensor whose first dimension is the
    batch's, in inputs and labels: a stop-gradient on part of the batch, replayed samples at its end,
    is met). Labels flattened over tokens (``(B*T,)`` for inputs ``(B, T)``) are cut by rows of ``T``;
    labels that are not one tensor, or that share no first dimension with the inputs, leave the batch
    as it is."""
    x, y = batch
    if not isinstance(y, Tensor) or y.dim() == 0:
        return batch
    inputs = [t for t in tree_leaves((x.args, x.kwargs) if isinstance(x, ModelCall) else x)
              if isinstance(t, Tensor) and t.dim() > 0]
    total = y.shape[0]
    rows = total if any(t.shape[0] == total for t in inputs) else \
        next((t.shape[0] for t in inputs if 0 < t.shape[0] < total and total % t.shape[0] == 0), None)
    if rows is None or rows <= samples:
        return batch
    index = torch.linspace(0, rows - 1, samples).round().long()

    def cut(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == rows:
            return t.index_select(0, index.to(t.device))
        return t

    per = total // rows  # (1, or the tokens of a row for flattened labels)
    labels = y.index_select(0, index.to(y.device)) if per == 1 else \
        y.reshape(rows, per, *y.shape[1:]).index_select(0, index.to(y.device)).reshape(-1, *y.shape[1:])
    if isinstance(x, ModelCall):
        return ModelCall(tree_map(cut, tuple(x.args)), tree_map(cut, dict(x.kwargs))), labels
    return tree_map(cut, x), labels


def _dot(grads: Sequence[Tensor | None], direction: Sequence[Tensor]) -> Tensor:
    parts = [(g.to_dense() if g.layout != torch.strided else g).mul(d).sum().double()
             for g, d in zip(grads, direction) if g is not None]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=direction[0].device)


def gradient_mismatch(model: nn.Module, terms: Terms, objective: Objective, train: tuple[Any, Any],
                      val: tuple[Any, Any], *, derivative: str, movable: set[str] | None, active: Tensor,
                      reducer: Reducer, run: Callable[[Callable[[], Any]], Any] = lambda f: f(),
                      wide: bool = True) -> GradientCheck:
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
        wide: run on float64 copies (``False``: copies in the model's own dtypes, for a model that cannot
            run in float64: coarser, see :data:`RELATIVE_OWN`).

    Raises:
        whatever the model's forward raises on float64 copies (the caller decides).
    """
    named = [(n, p) for n, p in model.named_parameters()
             if p.requires_grad and p.is_floating_point() and (movable is None or n in movable)]
    if not named:
        return GradientCheck(None, None)
    device = named[0][1].device
    (x0, y0), (xv0, yv0) = _spread(train, SAMPLES), _spread(val, SAMPLES)
    x, y, xv, yv = _wide_inputs(x0, wide), tree_map(lambda v: _wide(v, wide), y0), _wide_inputs(xv0, wide), \
        tree_map(lambda v: _wide(v, wide), yv0)
    generator = torch.Generator(device=device).manual_seed(20210202)  # its own: the user's random numbers untouched
    params = {n: _wide(p, wide) for n, p in model.named_parameters()}
    with torch.no_grad():
        wide = [params[n] for n, _ in named]
        rms = [p.square().mean().sqrt() if p.numel() else p.new_zeros(()) for p in wide]
        floor = torch.stack(rms).max().clamp_min(1e-3)  # (a tensor of zeros, a bias at init, moves at the others')
        scales = [torch.where(r > 1e-3 * floor, r, floor) for r in rms]
        # the base point: theta moved by OFFSET of each tensor's RMS, off exact zeros (a ReLU of a zero bias
        # on a zero input, a BatchNorm weight initialised at 0), where autograd's one-sided derivative is no
        # stop-gradient and a difference would say it is; a stop-gradient is one at any point
        for (n, _), p, r in zip(named, wide, scales):
            params[n] = p + (OFFSET * r * torch.randn(p.shape, generator=generator, dtype=torch.float64,
                                                      device=device)).to(p.dtype)
    leaves = [params[n].requires_grad_(True) for n, _ in named]
    size = torch.stack([p.detach().double().square().sum() for p in leaves]).sum().sqrt().clamp_min(1e-3)
    saved = {n: _wide(b, wide) for n, b in model.named_buffers()}
    eps = torch.finfo(leaves[0].dtype).eps  # the rounding of the values the differences take
    steps_used = STEPS if wide else STEPS_OWN
    weights = torch.randn(active.numel(), generator=generator, dtype=torch.float64, device=device) \
        * active.to(device=device, dtype=torch.float64)

    def fresh() -> dict[str, Tensor]:
        return {n: b.clone() if isinstance(b, Tensor) else b for n, b in saved.items()}

    def along(gradient: list[Tensor]) -> list[Tensor]:
        """A direction generic within ``gradient``'s support (each element scaled by a random factor in
        [0.5, 1.5]), as long as the parameters: the meta-gradient pairs the validation gradient only with
        the training terms' gradients and those only with it, so a parameter no gradient reaches (an
        embedding's padding row, a teacher under no_grad, a block reentrant checkpointing cuts) is no
        concern of the check."""
        with torch.no_grad():
            out = [g * (0.5 + torch.rand(g.shape, generator=generator, dtype=torch.float64, device=device)).to(g.dtype)
                   for g in gradient]
            norm = torch.stack([d.square().sum() for d in out]).sum().sqrt()
            factor = torch.where(norm > 0, size / torch.where(norm > 0, norm, 1.0), 0.0)
            return [d * factor.to(d.dtype) for d in out]

    def difference(value: Callable[[dict[str, Tensor]], Tensor], direction: list[Tensor]) -> list[Tensor]:
        """Central differences of ``value`` along ``direction`` at every step length of :data:`STEPS`;
        nan where the two values differ by less than their rounding (a loss rounded to float32 inside:
        such a difference tells nothing), unless even the longest step leaves the value as it is (a
        value that does not move: its derivative is 0)."""
        with torch.no_grad():
            ends = [[value({**params, **{n: (p + t * d).detach() for (n, _), p, d in zip(named, leaves, direction)}})
                     for t in (h, -h)] for pair in steps_used for h in pair]
            steps = [h for pair in steps_used for h in pair]
            longest = max(range(len(steps)), key=lambda i: steps[i])
            still = ends[longest][0] == ends[longest][1]
            out = []
            for h, (plus, minus) in zip(steps, ends):
                resolved = still | ((plus - minus).abs() > 64 * eps * (plus.abs() + minus.abs()))
                out.append(torch.where(resolved, (plus - minus) / (2 * h), float("nan")))
        return out

    numbers: list[Tensor] = []
    kind = [derivative]  # (the forward mode may give way to differences, as the jvp backend does)
    failure: Exception | None = None
    refusal: str | None = None
    with replay_randomness(device, model_generators(model), model) as replay, \
            torch.autocast(device.type, enabled=False):

        def train_value(at: dict[str, Tensor], teachers: Any = None, weighting: Tensor | None = None
                        ) -> tuple[Tensor, Any]:
            """The weighted terms at ``at``: as the model's step computes them (``teachers`` None; with the
            detached outputs, for the differences), or with ``teachers`` held fixed, as the differences do."""
            with replay():
                outputs = call_with(model, at, fresh(), x)
                held = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs)
                fixed = teachers if teachers is not None and terms.fixed_targets else None
                c = weights if weighting is None else weighting
                return (c * terms(outputs, y, teacher_outputs=fixed).to(torch.float64)).sum(), held

        def val_losses(at: dict[str, Tensor]) -> Tensor:
            with replay():
                return objective.losses(call_with(model, at, fresh(), xv), yv).to(torch.float64)

        def gradient(value: Tensor) -> list[Tensor]:
            found = torch.autograd.grad(value, leaves, allow_unused=True)
            return [torch.zeros_like(p) if g is None else (g.to_dense() if g.layout != torch.strided else g)
                    for g, p in zip(found, leaves)]

        def compute() -> None:
            # a forward in the model's own dtype first (under no_grad, on copies of the buffers): state a model
            # builds at its first forward (a cached table) is built as the user's own forward would build it
            with torch.no_grad(), replay():
                call_with(model, dict(model.named_parameters()), {n: b.clone() for n, b in model.named_buffers()}, x0)
            value, teachers = train_value(params)
            reentrant = _reentrant_checkpoint(value)
            if reentrant:
                raise ReentrantCheckpoint(REENTRANT)
            train_grad = gradient(value)
            with torch.no_grad():  # the same value again: a forward that is a function of the parameters
                train_changed = _changed(value, train_value(params)[0])
            # the objective's own weighting of the exits' losses, as the meta step takes it (a balance it
            # holds fixed by design is not the model's); the model's part, the losses, is compared
            losses = val_losses(params)
            held = losses.detach().requires_grad_(True)
            (exits,) = torch.autograd.grad(objective.objective(held), held)
            val_value = (exits * losses).sum()
            val_grad = gradient(val_value)
            with torch.no_grad():
                val_changed = _changed(val_value, (exits * val_losses(params)).sum())
            if derivative != "autograd":  # [autograd, the jvp's tangent (or nan), changed, differences]
                direction = along(val_grad)
                numbers.append(_dot(train_grad, direction))
                tangent = torch.full((), float("nan"), dtype=torch.float64, device=device)
                if kind[0] == "forward":
                    try:
                        with torch.no_grad(), dual_level():
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
                numbers.extend([tangent.reshape(()).to(torch.float64), train_changed])
                numbers.extend(difference(lambda at: train_value(at, teachers)[0], direction))
            else:  # higher differentiates autograd's gradient in the weights: [<g, d>, its derivative . c, ...]
                direction = along(val_grad)
                weighting = weights.clone().requires_grad_(True)
                value, _ = train_value(params, weighting=weighting)
                grads = torch.autograd.grad(value, leaves, allow_unused=True, create_graph=True)
                inner = _dot(list(grads), direction)
                second = None
                if inner.requires_grad:
                    (second,) = torch.autograd.grad(inner, weighting, allow_unused=True)
                again = torch.zeros_like(inner) if second is None else (second * weighting).sum()
                numbers.extend([inner.detach(), again.detach(), train_changed])
                numbers.extend([torch.full((), float("nan"), dtype=torch.float64, device=device)] * (2 * len(steps_used)))
            direction = along(train_grad)
            numbers.extend([_dot(val_grad, direction), torch.full((), float("nan"), dtype=torch.float64,
                                                                    device=device), val_changed])
            numbers.extend(difference(lambda at: (exits * val_losses(at)).sum(), direction))

        with torch.enable_grad():
            try:
                run(compute)
            except ReentrantCheckpoint as exc:
                refusal = str(exc)
            except Exception as exc:  # (decided below, alike on every rank)
                failure = exc
    width = 3 + 2 * len(steps_used)
    sides = 2
    # (above 0 after the average: failed, or refused, on some rank; a failure anywhere wins)
    flags = [torch.full((), float(flag), dtype=torch.float64, device=device)
             for flag in (failure is not None, refusal is not None)]
    if failure is not None or refusal is not None or len(numbers) != sides * width:
        numbers = [torch.zeros((), dtype=torch.float64, device=device)] * (sides * width)
    flat = reducer.mean([torch.stack([*flags, *[n.detach().reshape(()).to(torch.float64) for n in numbers]])])[0]
    flat = host_read([flat])
    if failure is not None:
        raise failure
    if flat[0] > 0.0:  # another rank's check raised: every rank leaves it alike
        raise RuntimeError("the gradient check failed on another rank")
    if flat[1] > 0.0:
        return GradientCheck(refusal or REENTRANT, None)
    sides_numbers = [flat[2 + i:2 + i + width] for i in range(0, sides * width, width)]
    relative = RELATIVE if wide else RELATIVE_OWN
    found = [_judge(sides_numbers[0], kind[0] in ("forward", "autograd"), TRAIN_SIDE[kind[0]], relative),
             _judge(sides_numbers[1], False, VAL_SIDE, relative)]
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


def _judge(numbers: list[float], forward: bool, words: tuple[str, str, str, str], relative: float = 1e-4) -> _Side:
    """One side's verdict from ``[autograd, tangent, changed, differences at each step of STEPS...]``
    (``changed``: the value at the parameters recomputed differs, see :func:`_changed`): the
    reference is the tangent (``forward``) or the difference of the pair of steps that agree best;
    the error the noise of that pair."""
    autograd, tangent, changed, rest = numbers[0], numbers[1], numbers[2], numbers[3:]
    if not math.isfinite(autograd) or (forward and not math.isfinite(tangent)):
        return _Side(False, False, "", finite=False)  # (non-finite data: the step refuses it; checked next time)
    if changed > 0:
        return _Side(False, True, INCONCLUSIVE.format(
            what=words[3], why="the forward gave other values when run again at the same parameters, inputs and "
                               "random numbers: it changes state it reads, e.g. a call counter"))
    # the pairs whose two differences both resolved (a nan: the values differed by less than their rounding)
    pairs = [(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)
             if math.isfinite(rest[i]) and math.isfinite(rest[i + 1])]
    if forward:  # forward against reverse mode: both exact, whatever the differences resolve
        noise, reference = 0.0, tangent
    elif not pairs:
        return _Side(False, True, INCONCLUSIVE.format(what=words[3], why=(
            "its differences in float64 did not resolve: " + BELOW)))
    else:
        reference, second = min(pairs, key=lambda p: abs(p[0] - p[1]))
        noise = abs(reference - second)
    gap, size = abs(autograd - reference), max(abs(autograd), abs(reference))
    refused = gap > relative * size and gap > NOISE * noise
    inconclusive = not refused and NOISE * noise > RESOLUTION * size
    if refused:
        return _Side(True, False, MISMATCH.format(what=words[0], measure=words[1], gap=gap, size=size,
                                                  consequence=words[2]))
    why = f"its differences in float64 disagree by {noise:.3g} of {size:.3g}: {NOT_SMOOTH}"
    return _Side(False, inconclusive, INCONCLUSIVE.format(what=words[3], why=why))


TRAIN_SIDE = {
    "autograd": ("backend='higher' differentiates autograd's gradient of the training terms in their weights, and "
                 "that derivative differs from the gradient itself",
                 "a backward that is not itself differentiable: a custom autograd.Function with "
                 "@once_differentiable or a backward under torch.no_grad(), as fused kernels have",
                 "backend='higher' would take gamma's meta-gradient through a cut; for a cut, backend='jvp' needs no "
                 "second derivative (for a cast, neither backend is the way out: check_gradients=False or no cast).",
                 "the derivative of autograd's gradient in the terms' weights (backend='higher')"),
    "forward": ("The forward-mode derivative of the training terms (backend='jvp') differs from autograd's gradient",
                "the model's step uses autograd's",
                "backend='jvp' would differentiate a step the model does not take; backend='higher' differentiates "
                "autograd's step. (A cast to float16 or bfloat16 inside the model or the criterion also rounds the "
                "two modes apart, by about 1e-3 of the derivative, and rounds backend='higher''s check apart from "
                "its differences as well: there, keep the cast out of the model and criterion the weighter "
                "differentiates, or pass check_gradients=False to accept a meta-gradient that close.)",
                "the forward-mode derivative of the training terms (backend='jvp')"),
    "values": ("Autograd's gradient of the training terms differs from the derivative of their values",
               "the model's step uses autograd's; backend='finite_difference' and mode='fast' take the values'",
               "The meta-gradient would be that of a step the model does not take; backend='higher' "
               "(mode='exact') differentiates autograd's step itself.",
               "autograd's gradient of the training terms"),
}
VAL_SIDE = ("Autograd's gradient of the validation losses differs from the derivative of their values",
            "gamma's meta-gradient needs the derivative of their values after the step",
            "Every backend and mode takes the validation gradient by autograd, so gamma would move along another "
            "direction than the validation objective's.",
            "autograd's gradient of the validation losses")
BELOW = ("the model, the criterion or the validation objective computes below float64 inside (a .float() or "
         ".half() of a tensor, e.g. the criterion's logits.float())")
# why two pairs of differences disagree (helper-177: a plain conv/BatchNorm/ReLU MSDNet on real images, in float64
# throughout, was told it computes below float64)
NOT_SMOOTH = ("the values are not smooth enough there for both step lengths (a ReLU's or a max-pooling's kink crossed, "
              "a BatchNorm over the check's few samples, common in a deep ReLU network on real images), or " + BELOW)
INCONCLUSIVE = (
    "metaweight could not check {what} against the derivative of the values ({why}). The meta-gradient is exact "
    "only if the model, the criterion and the validation objective have no stop-gradient or custom backward "
    "(detach, .data, no_grad, .item() rescales, straight-through estimators) on that path; pass "
    "check_gradients=False to silence this.")


SAVED_TENSOR_HOOKS = "metaweight's gradient check: the model registers saved-tensor hooks (activation checkpointing)"
# what the warnings of a check not made say of the meta-gradient
EXACT_ONLY_IF = ("the meta-gradient is exact only if the model has no stop-gradient or custom backward (detach, .data, "
                 "no_grad, .item() rescales, straight-through estimators) on the path to its exits, which the check "
                 "would have seen; pass check_gradients=False to silence this.")


def _checkpointing(w: HarmonizedWeighter) -> None:
    """The check met saved-tensor hooks: a backend that cannot take them refuses, as it would at its own meta step;
    for the others (which take the meta-gradient right with them) the check is off for this model, and said."""
    backend = w._exact.backend
    if w.mode == "exact" and isinstance(backend, (JvpBackend, FiniteDifferenceBackend)):
        raise ValueError(CHECKPOINTING.format(backend=backend.name))
    w._gradients_checked = True
    warn_user("metaweight could not check the model's gradients against the derivatives of its values: the model "
              "registers saved-tensor hooks in its forward, as activation checkpointing does, whose backward "
              "recomputes the forward with the module's own parameters, not the check's float64 copies (the check "
              "cannot tell other such hooks from it). "
              + ("mode='fast'" if w.mode == "fast" else f"backend='{backend.name}'")
              + f" takes the meta-gradient through checkpointing as it is; {EXACT_ONLY_IF}")


def _failed(w: HarmonizedWeighter, exc: Exception) -> None:
    """The check raised on the model's copies: said once a meta step went through since (an error of the model's or
    the data's comes again from the step itself, which says it: only then is the failure the copies' own)."""
    first = (str(exc).splitlines() or [""])[0][:200]
    failed, w._gradcheck_failed = w._gradcheck_failed, (w.num_meta_steps, f"{type(exc).__name__}: {first}")
    if failed is not None and w.num_meta_steps > failed[0]:
        w._gradients_checked = True
        warn_user(f"metaweight could not check the model's gradients against the derivatives of its values on float64 "
                  f"copies ({failed[1]}). {EXACT_ONLY_IF[0].upper()}{EXACT_ONLY_IF[1:]}")


CALLER_HOOKS_NOTE = (
    " The step ran inside saved-tensor hooks of the caller's (torch.autograd.graph.saved_tensors_hooks or save_on_cpu"
    " around it), and with them set aside the check finds no such gap: they change the tensors autograd saves (as a "
    "pack to float16 does), not the model. Run the weighter's calls outside them, or pass check_gradients=False where"
    " that loss is meant.")


@contextlib.contextmanager
def _caller_hooks_set_aside() -> Iterator[None]:
    """The saved-tensor default hooks in force (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``) taken
    off autograd's stack for the block and put back after it, in their order, whatever happens."""
    autograd = torch._C._autograd
    stack = []
    while (hooks := autograd._top_saved_tensors_default_hooks(False)) is not None:
        stack.append(hooks)
        autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


def check_gradients_once(w: HarmonizedWeighter, train_batch: Any, val_batch: Any) -> None:
    """The check of the weighter ``w`` (``check_gradients=True``), once, at its first meta step, before anything
    changes: autograd's gradients against the derivatives of the values, on float64 copies (:func:`gradient_mismatch`,
    on ``train_batch`` and ``val_batch``, ``(x, y)`` each). Raises a ``ValueError`` where they differ (and checks
    again at the next meta step); warns where the model cannot be checked (where the float64 copies raised, at the
    next meta step, once one went through: an error of the model's own comes from the step itself first)."""
    if w._gradients_checked or not w.check_gradients:
        return
    backend = w._exact.backend
    if w.mode == "exact" and backend is not None:
        backend.check_call()  # (a refusal of the backend's before a check that would run for nothing: helper-189)
    if w.mode == "fast" or isinstance(backend, FiniteDifferenceBackend) or \
            (isinstance(backend, JvpBackend) and backend.fallback is not None):
        derivative = "values"
    else:
        derivative = "autograd" if isinstance(backend, HigherBackend) else "forward"
    watch = w._watch

    def run(compute: Callable[[], Any]) -> Any:
        paused = watch is not None and watch.paused
        if watch is not None:
            watch.paused = True  # the check's forwards are not the user's
        try:
            return compute()
        finally:
            if watch is not None:
                watch.paused = paused

    train = unpack_batch(train_batch, "train_batch")
    val = unpack_batch(val_batch, "val_batch")
    generators = model_generators(w.module)

    def check(wide: bool) -> Any:
        return gradient_mismatch(w.module, w._terms, w._objective, train, val, derivative=derivative,
                                 movable=w._exact.lookahead_names if w.mode == "exact" else None,
                                 active=w._active, reducer=w._reducer, run=run, wide=wide)

    def hooked(wide: bool) -> bool:
        """Whether the model registers saved-tensor hooks in its forward (activation checkpointing, whose
        recomputation at backward time uses the module's own parameters, not the check's copies: a gap for that
        alone; helper-181), asked where the check found a gap only (offloading's hooks change nothing; helper-183).
        The caller's own hooks in force (a step run inside ``save_on_cpu()``) are set aside for the question: they
        are not the model's (with them asked about too, a real stop-gradient went unrefused, helper-185; with the
        question not asked under them, checkpointing's gap was blamed on kinks and casts, helper-186). What the check
        finds so is kept (``without``): where the caller's hooks made the gap, it finds none."""
        nonlocal without
        try:
            with _caller_hooks_set_aside(), torch.autograd.graph.disable_saved_tensors_hooks(SAVED_TENSOR_HOOKS):
                without = check(wide)
        except Exception as exc:
            return SAVED_TENSOR_HOOKS in str(exc)
        return False

    without = None
    checkpointed = False
    with registered_buffers_removed(w.module):  # (a mask built by the check's first forward)
        wide = True
        try:
            try:
                found = check(True)
            except Exception:  # (every rank alike) a model that cannot run on float64 copies: its own dtype
                if new_generators(w.module, generators):
                    raise
                wide = False
                found = check(False)
            checkpointed = (found.refusal is not None or found.inconclusive is not None) and hooked(wide)
        except Exception as exc:
            # (checkpointing's recomputation with the module's own float32 parameters fails on the float64 copies
            # of a BatchNorm model: said for what it is, at once; helper-184)
            appeared = new_generators(w.module, generators)
            if appeared:  # the look-ahead could not replay this model's random numbers either
                raise ValueError(NEW_GENERATOR.format(names=", ".join(appeared))) from None
            checkpointed = hooked(True)
            if not checkpointed:
                _failed(w, exc)
                return
    if checkpointed:
        _checkpointing(w)  # (refused with the backend's reason, or the check off for this model, and said)
        return
    # the caller's own saved-tensor hooks, in force around the step, made the gap where the check finds nothing
    # without them (a lossy pack, float16: helper-187); where it finds something, it is the model's (helper-188), said
    # as found without them: with a lossy pack the gap found with them may be another (helper-189), and an
    # inconclusive check is the model's too (helper-190)
    caller = ""
    if without is not None and caller_hooks_in_force():
        if without.refusal is None and without.inconclusive is None:
            caller = CALLER_HOOKS_NOTE
        else:
            found = without
    if found.refusal is not None:
        if w._objective.unseen:  # (its own detach before a first update is the gap: say that; helper-184)
            raise ValueError(w._objective.unseen)
        raise ValueError(found.refusal + caller)
    w._gradients_checked = found.finite  # (non-finite data, which the step refuses: checked next time)
    if found.inconclusive is not None:
        warn_user(found.inconclusive + caller)
