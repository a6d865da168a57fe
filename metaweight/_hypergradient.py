r"""Exact hypergradients without differentiating through the inner step.

For the look-ahead :math:`\theta' = \theta - U(g)`, :math:`g = \sum_k \gamma_k \nabla L_k(\theta)`,
with :math:`U` an optimizer update that acts elementwise on the gradient,

.. math::
    \frac{\partial L_{val}(\theta')}{\partial \gamma_k}
      = -\big\langle D \odot \nabla L_{val}(\theta'),\; \nabla L_k(\theta) \big\rangle ,
    \qquad D = \partial U / \partial g \ \text{(diagonal)},

so all :math:`\gamma_k` at once are the directional derivative of the term vector
:math:`L(\theta)` along :math:`w = D \odot \nabla L_{val}(\theta')`: one forward-mode pass
(``"jvp"``), or two forwards by central differences with the teachers' soft targets held
fixed (``"finite_difference"``). :math:`D` is :math:`\xi` for SGD, :math:`\xi(1-\text{dampening})`
with momentum, :math:`\xi(1+\mu(1-\text{dampening}))` with Nesterov (:math:`\xi` and
:math:`\xi(1+\mu)` on the first step, when the momentum buffer is created), and the elementwise
derivative of the step for Adam/AdamW/AMSGrad.

Every forward here runs through ``torch.func.functional_call`` on copies of the buffers,
so BatchNorm statistics are not touched; the optimizer's state is read, never written.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from metaweight._checks import NO_TRAINING_GRADIENT, NO_VALIDATION_GRADIENT, check_differentiable
from metaweight._optimizers import lookahead_update, unweighted_term
from metaweight._protocols import Objective, Terms, model_arguments
from metaweight._randomness import model_generators, replay_randomness, rng_state, set_rng_state
from metaweight._tangents import ShortTangents, dual_level, make_dual, unpack_dual
from metaweight._transaction import FlatCopies
from metaweight._walk import ModelWalk, check_single_roles, current_walk, walk, watched_forward


class Reducer:
    """Averages tensors over the ranks of a process group; a no-op when not ``enabled`` or alone."""

    def __init__(self, group: Any = None, *, enabled: bool = True) -> None:
        self.group = group
        distributed = enabled and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        if self.world == 1 or not tensors:
            return list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64 if tensors[0].dtype == torch.float64
                                                               else torch.float32)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()
        return out


@dataclass
class MetaResult:
    """What one meta step computed (internal)."""

    gamma_grad: Tensor
    objective: Tensor
    exit_losses: Tensor
    terms: Tensor  # with its graph when the caller asked to keep it for the model's step


@contextmanager
def eager_forward(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Run ``model`` and its submodules uncompiled inside the block: modules compiled in place
    (``model.compile()``, ``stage.compile()``) have their compiled call set aside and put back after.
    ``modules``: the model's modules where the caller has them (else the step's walk of the model).

    The look-ahead's forwards substitute parameters (``functional_call``), carry forward-mode tangents
    or run on ``higher``'s patched copies, which compiled code does not see through (the compiled call
    of a patched copy is the original module's): as ``torch.compile(model)``'s wrapper, unwrapped, runs
    the module under it eagerly, so does a module compiled in place here.
    """
    if modules is None:
        modules = [m for _, m in walk(model).modules]
    compiled = [m for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
    saved = [m._compiled_call_impl for m in compiled]
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, call in zip(compiled, saved):
            m._compiled_call_impl = call


def call_with(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Any) -> Any:
    """The model's forward on ``params`` and ``buffers`` (by name) in place of its own, sure to put every
    parameter and buffer object back afterwards, run uncompiled (:func:`eager_forward`).

    The tensors are written into the modules' ``_parameters`` and ``_buffers`` slots, each tied weight's every
    slot, where the step's walk of the model (:func:`metaweight._walk.walk`) found them, as
    ``torch.func.functional_call(..., tie_weights=True)`` swaps them in, without its walk of the model and its
    checks of each name at every call (about 2 ms per forward on the CIFAR MSDNet's 770 modules on a CPU core:
    host time beside every look-ahead forward). Names the walk does not hold, a scripted model and
    ``nn.DataParallel`` go through ``functional_call`` (its rules, its errors). Each module's own slots are
    restored afterwards (``functional_call`` leaves a module used twice holding the substitutes).
    """
    one = current_walk(model)  # (the tree as it is now: a forward before may have registered a buffer)
    given = {**params, **buffers}
    plain = not isinstance(model, (torch.jit.ScriptModule, nn.DataParallel))
    writes = one.slots(given) if plain else None
    if writes is None and plain and one.untied(given) is None:
        # (a name the current walk does not hold: a change no hook saw, a safety net): walk anew
        one = ModelWalk(model)
        check_single_roles(one)
        writes = one.slots(given)
    slots = [(held, dict(held)) for _, m in one.modules for held in (m._parameters, m._buffers) if held]
    # (the tensors are swapped in and out of the modules' dicts directly, which no registration hook sees: the
    # walks stay current unless the forward itself registered something)
    with watched_forward():
        try:
            args, kwargs = model_arguments(model, x)
            with eager_forward(model, [m for _, m in one.modules]):
                if writes is None:  # (names neither walk holds, or a model functional_call has rules for)
                    return functional_call(model, (params, buffers), args, kwargs)
                for held, leaf, t in writes:
                    held[leaf] = t
                return model(*args, **kwargs)
        finally:
            for held, saved in slots:
                for name, t in saved.items():  # (a scripted module's dicts are wrappers without update())
                    held[name] = t


def _or_zeros(tensors: Sequence[Tensor | None], like: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
    """Gradients with zeros where a parameter got none (to average over ranks, or to use as a tangent)."""
    return [t if t is not None else torch.zeros_like(p) for t, (_, p) in zip(tensors, like)]


class LookaheadBuffers:
    """The model's buffers as the look-ahead's forwards start from them: copied once (:meth:`save`),
    then a fresh copy for each forward (which may update it, as BatchNorm does in training mode) by one
    flat copy per device and dtype (:meth:`fresh`), in storage kept for the model between calls. It holds
    the model weakly: kept in a cache keyed weakly by the model, a strong reference would keep every model
    ever stepped alive, with its parameters, buffers and this storage."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._origin = FlatCopies()
        self._scratch = FlatCopies()
        self._names: list[str] = []

    def save(self) -> None:
        """Copy every buffer of the model (floating point or not) into the storage."""
        model = self._model()
        assert model is not None  # (called by the model's own meta step, which holds it)
        walked = current_walk(model)  # (named_buffers' order and its removal of duplicates)
        self._names = [n for n, _ in walked.buffers]
        self._origin.copy([b for _, b in walked.buffers])

    def saved(self) -> dict[str, Tensor]:
        """The buffers of the last :meth:`save` by name (views of the storage, valid until the next save)."""
        return dict(zip(self._names, self._origin.copies))

    def fresh(self) -> dict[str, Tensor]:
        """A copy of the saved buffers by name, valid until the next :meth:`fresh` or :meth:`save`."""
        return dict(zip(self._names, self._scratch.copy_from(self._origin)))


_SCRATCH: weakref.WeakKeyDictionary[nn.Module, LookaheadBuffers] = weakref.WeakKeyDictionary()


def _scratch(model: nn.Module) -> LookaheadBuffers:
    scratch = _SCRATCH.get(model)
    if scratch is None:
        scratch = _SCRATCH[model] = LookaheadBuffers(model)
    return scratch


def _clone_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the model's buffers for one look-ahead forward (which may update them, as BatchNorm
    does in training mode), in storage kept for the model between calls: valid until the next call."""
    scratch = _scratch(model)
    scratch.save()
    return scratch.saved()


def validation_direction(model: nn.Module, validation: Objective, params: dict[str, Tensor], xv: Any, yv: Any,
                         movable: Sequence[tuple[str, Tensor]], jac: Sequence[Tensor | float], reducer: Reducer,
                         buffers: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    r"""The validation objective at ``params``, the exit losses it was computed from (averaged over
    ranks), and the direction :math:`w = D \odot \nabla L_{val}` over the ``movable`` parameters
    (``params[name]`` must require grad for those). A non-finite objective gives a non-finite
    direction: the caller decides, with no host read here. The forward runs on ``buffers`` (by
    default a copy of the model's)."""
    objective, exit_losses, v = validation_gradient(model, validation, params, xv, yv, movable, reducer, buffers)
    return objective, exit_losses, dict(zip((n for n, _ in movable), scale(v, jac)))


def validation_gradient(model: nn.Module, validation: Objective, params: dict[str, Tensor], xv: Any, yv: Any,
                        movable: Sequence[tuple[str, Tensor]], reducer: Reducer,
                        buffers: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    r""":func:`validation_direction` before :math:`D`: the objective, the exit losses and
    :math:`\nabla L_{val}` over the ``movable`` parameters, in their order."""
    buffers = _clone_buffers(model) if buffers is None else buffers
    local = validation.losses(call_with(model, params, buffers, xv), yv)
    # the objective of the losses averaged over ranks; its gradient through each rank's own losses
    check_differentiable(local, NO_VALIDATION_GRADIENT)
    exit_losses = reducer.mean([local.detach()])[0].requires_grad_(True)
    objective = validation.objective(exit_losses)
    check_differentiable(objective, NO_VALIDATION_GRADIENT)
    (weights,) = torch.autograd.grad(objective, exit_losses)
    v = torch.autograd.grad((weights * local).sum(), [params[n] for n, _ in movable], allow_unused=True)
    v = [t.to_dense() if t.layout != torch.strided else t for t in reducer.mean(_or_zeros(v, movable))]  # (embeddings)
    return objective.detach(), exit_losses.detach(), v


def common_factor(factors: Sequence[Tensor | float]) -> float | None:
    """The one float all ``factors`` are (SGD's D when every moved parameter steps alike), else ``None``."""
    values = {float(d) for d in factors if not isinstance(d, Tensor)}
    if len(values) != 1 or any(isinstance(d, Tensor) for d in factors):
        return None
    return values.pop()


def scale(tensors: Sequence[Tensor], factors: Sequence[Tensor | float]) -> list[Tensor]:
    """``tensors[i] * factors[i]`` for a list: the float factors (SGD's constant D) by one multi-tensor
    multiply per distinct value (and dtype and device), the tensor factors (Adam's D) by one list
    multiply."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_value: dict[tuple[float, torch.dtype, torch.device], list[int]] = {}
    elementwise = []
    for i, d in enumerate(factors):
        if isinstance(d, Tensor):
            elementwise.append(i)
        else:
            by_value.setdefault((float(d), tensors[i].dtype, tensors[i].device), []).append(i)
    for (value, dtype, device), idx in by_value.items():
        # the factor as a 0-d tensor: one multiply per tensor (a Python number makes the CPU's
        # multi-tensor fallback copy each tensor first); the same float multiply either way
        factor = torch.full((), value, dtype=dtype, device=device)
        for i, t in zip(idx, torch._foreach_mul([tensors[i] for i in idx], factor)):
            out[i] = t
    if elementwise:
        for i, t in zip(elementwise, torch._foreach_mul([tensors[i] for i in elementwise],
                                                        [factors[i] for i in elementwise])):  # type: ignore[misc]
            out[i] = t
    return out  # type: ignore[return-value]


def _sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    r""":math:`\sum_i \|t_i\|^2` as a float64 scalar on the first tensor's device: the tensors of one device
    and dtype concatenated into one flat vector (views and one copy), its squares summed in its dtype (16-bit
    ones in float32; ``sum`` is cascaded: about 1e-7 relative in float32 where a float64 norm first copied the
    vector to float64, three times the time). Overflows to inf past about 1e38 in float32."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.reshape(-1))
    device = tensors[0].device
    parts = []
    for (_, dtype), flat in groups.items():
        vector = torch.cat(flat) if len(flat) > 1 else flat[0]
        if torch.finfo(dtype).bits < 32:
            vector = vector.float()
        parts.append((vector * vector).sum().double())
    return parts[0] if len(parts) == 1 else torch.stack([p.to(device) for p in parts]).sum()


# The default length of a difference's step, as a multiple of machine eps ** (1 / (order + 1)) times the moved
# parameters' RMS, by order (1: one-sided, 2: central). Machine eps alone assumes a forward rounds like one
# operation; a network's forward, thousands of operations deep, rounds its losses far more, and the
# meta-gradient (a small inner product of large, nearly orthogonal gradients) is a small change of them: at
# the factor 1 the differences were rounding-bound. Chosen on the relative error of gamma's gradient against
# ``jvp`` in float64 at the same point (``benchmarks/step_length.py``, float32, batch 32: a Tanh MLP,
# BranchyNet and the CIFAR MSDNet, SGD with Nesterov momentum and AdamW, the median of three points each):
# of the factors measured (1, 16, 64, 256), the one-sided one whose worst median over the six was smallest
# (64: 0.1, against 4.1 at 1). Central differences keep the textbook length: 4 had the smaller worst case there
# (0.089 against 0.14 at 1, of 1, 4, 16), but on a point it was not chosen on (``benchmarks/overhead.py``'s
# MSDNet, batch 64, against float64 ``higher``) its error was 0.47 against 0.14 at 1.
LENGTH_FACTOR = {1: 64.0, 2: 1.0}
# In bfloat16 and float16 parameters (machine eps 8e-3 and 1e-3) 64 sqrt(eps) is a step of 5.7 and 2 RMS: the
# one-sided factor there is 4 (a Tanh and a ReLU MLP, bfloat16 and float16, SGD and AdamW; of 0.25, 1, 4, 16, 64,
# the worst median error was 0.84, 0.4, 0.16, 0.36, 1.5). Central: 4 (worst 0.069; 1: 0.28; 16: 0.04).
LENGTH_FACTOR_16BIT = {1: 4.0, 2: 4.0}


@torch.no_grad()
def step_length(base: dict[str, Tensor], direction: dict[str, Tensor], epsilon: float | None,
                order: int) -> Tensor:
    """The ``h`` of a finite difference along ``direction``, a float64 scalar on the device: ``h *
    direction`` has length ``epsilon``, by default :data:`LENGTH_FACTOR` ``[order]`` (16-bit parameters:
    :data:`LENGTH_FACTOR_16BIT`) times machine eps ** (1 / (order + 1)) times the moved parameters' RMS, that
    RMS at least 1e-3 (in float32 about 2e-2 x RMS one-sided, 5e-3 x RMS central). 0 when the
    direction is zero (the caller's difference is then 0); NaN when it is not finite (a validation gradient
    of an inf input: the caller's difference is then NaN, and the step refused, where an h of 0 made it a
    finite 0). No host read."""
    device = next(iter(base.values())).device
    if not direction:
        return torch.zeros((), dtype=torch.float64, device=device)
    norm = _sum_of_squares(list(direction.values())).sqrt()
    if epsilon is None:
        moved = [base[n] for n in direction]
        rms = (_sum_of_squares(moved) / sum(p.numel() for p in moved)).sqrt()
        info = torch.finfo(moved[0].dtype)
        factor = (LENGTH_FACTOR_16BIT if info.bits == 16 else LENGTH_FACTOR)[order]
        eps = factor * info.eps ** (1 / (order + 1)) * rms.clamp_min(1e-3)
    else:
        eps = torch.full((), float(epsilon), dtype=torch.float64, device=device)  # (a fill: no copy from the host)
    h = torch.where(norm > 0, eps / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return h + (norm - norm)  # (+0 where the norm is finite, NaN where it is inf or NaN)


def along(base: Sequence[Tensor], direction: Sequence[Tensor], h: Tensor) -> list[Tensor]:
    """``base[i] + h * direction[i]`` for lists, with ``h`` a scalar tensor on the device (no host read)."""
    return torch._foreach_add(list(base), torch._foreach_mul(list(direction), h.to(direction[0].dtype)))


def difference(plus: Tensor, minus: Tensor, h: Tensor, denominator: float) -> Tensor:
    """``(plus - minus) / (denominator * h)`` in float64, and 0 where ``h`` is 0 (a zero direction); NaN
    where ``h`` is NaN (a non-finite direction)."""
    step = denominator * h
    value = (plus.double() - minus.double()) / torch.where(step != 0, step, torch.ones_like(step))
    return torch.where(step != 0, value, torch.zeros_like(value))


def meta_gradient(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Terms,
    validation: Objective,
    gamma: Tensor,
    train: tuple[Any, Tensor],
    val: tuple[Any, Tensor],
    *,
    backend: str,
    lookahead_names: set[str] | None = None,
    keep_graph: bool = False,
    fd_epsilon: float | None = None,
    reducer: Reducer | None = None,
) -> MetaResult:
    """:math:`\\nabla_\\gamma L_{val}(\\theta - U(\\nabla_\\theta \\sum_k \\gamma_k L_k))` by ``backend``
    (``"jvp"`` or ``"finite_difference"``).

    ``lookahead_names`` restricts the look-ahead to those parameters (the rest stay at
    :math:`\\theta`). ``keep_graph=True`` runs the training forward on the model's real buffers
    (as the model's own step would, updating BatchNorm statistics once) and returns the terms
    with their graph, so the caller's step can backpropagate the new weights through it
    instead of running the forward again; the random-number generators are then left where that
    forward and the criterion left them, as the model's own forward would (the validation
    forward's draws are undone, as the caller undoes the whole look-ahead's without ``keep_graph``),
    and where they were before the call if it raises.

    With a :class:`Reducer` over several ranks (DistributedDataParallel), the training gradient,
    the validation losses and gradient and the directional derivatives are averaged across
    ranks, so every rank gets the meta-gradient of the whole (concatenated) batch.
    """
    reducer = reducer or Reducer(enabled=False)
    (x, y), (xv, yv) = train, val
    walked = walk(model)
    named = [(n, p) for n, p in walked.parameters if p.requires_grad]
    movable = [(n, p) for n, p in named if lookahead_names is None or n in lookahead_names]
    device = gamma.device
    scratch = _scratch(model)
    generators = model_generators(model)
    # (without keep_graph the caller puts the generators back, whatever happens)
    with replay_randomness(device, generators, model, rewind_on_error=keep_graph) as replay:
        if not keep_graph:
            scratch.save()  # (the later forwards start from the same buffers: the training forward's are a copy)
        params = dict(walked.parameters)
        outputs = call_with(model, params, scratch.fresh() if not keep_graph else dict(current_walk(model).buffers), x)
        if keep_graph:
            scratch.save()  # the buffers as this forward left them, as the model's own step would see them
        terms = criterion(outputs, y)
        check_differentiable(terms, NO_TRAINING_GRADIENT)
        # the model's step reuses this forward: the generators are left where it (and the criterion) left them,
        # as the model's own forward would leave them, not past the validation forward's draws
        reused = rng_state(device, generators) if keep_graph else None
        grads = torch.autograd.grad(
            (gamma.to(terms) * terms).sum(), [p for _, p in movable], allow_unused=True, retain_graph=keep_graph
        )
        if reducer.world > 1:  # the step DDP would take: the gradient averaged over ranks
            grads = tuple(reducer.mean(_or_zeros(grads, movable)))
        # (the differences run along D * v: Adam's D kept off the weights the terms do not reach)
        keep = unweighted_term(gamma, criterion.active_on(device)) if backend == "finite_difference" else None
        new, jac = lookahead_update(optimizer, [p for _, p in movable], grads, device_counts=True,
                                    keep_unreached=keep)
        lookahead = {n: t.requires_grad_(True) for (n, _), t in zip(movable, new)}
        # the parameters that stay at theta, detached (the validation gradient is taken at the others)
        fixed = {n: p.detach() for n, p in params.items() if n not in lookahead}
        objective, exit_losses, v = validation_gradient(model, validation, {**fixed, **lookahead}, xv, yv, movable,
                                                        reducer, scratch.fresh())
        # the jvp is linear in its tangent: a D that is one number scales the K derivatives, not every v
        factor = common_factor(jac) if backend == "jvp" else None
        direction = dict(zip((n for n, _ in movable), v if factor is not None else scale(v, jac)))
        if backend == "jvp":
            with replay():
                derivative = _jvp(model, criterion, params, direction, x, y, scratch)
            if factor is not None:
                derivative = derivative * factor
        elif backend == "finite_difference":
            derivative = _central_difference(model, criterion, params, direction, x, y, outputs, fd_epsilon, replay,
                                             scratch)
        else:
            raise ValueError(f"Unknown backend {backend!r}; expected 'jvp' or 'finite_difference'.")
        derivative = reducer.mean([derivative])[0]
    if reused is not None:
        set_rng_state(reused, device)
    return MetaResult(-derivative.to(gamma.dtype), objective, exit_losses, terms if keep_graph else terms.detach())


@torch.no_grad()  # forward-mode AD records no graph: the parameters serve as primals, no detach each
def _jvp(model: nn.Module, criterion: Terms, base: dict[str, Tensor], direction: dict[str, Tensor],
         x: Any, y: Any, scratch: LookaheadBuffers) -> Tensor:
    with dual_level():
        dual = {n: (make_dual(p, direction[n]) if n in direction else p) for n, p in base.items()}
        with ShortTangents():  # BatchNorm's tangent in fewer ops than ATen's formula (see _tangents)
            terms = criterion(call_with(model, dual, scratch.fresh(), x), y)
        tangent = unpack_dual(terms)[1]
    return torch.zeros_like(terms) if tangent is None else tangent.detach()


@torch.no_grad()
def _central_difference(model: nn.Module, criterion: Terms, base: dict[str, Tensor],
                        direction: dict[str, Tensor], x: Any, y: Any, outputs: Any,
                        epsilon: float | None, replay: Callable[[], Any], scratch: LookaheadBuffers) -> Tensor:
    device = next(iter(base.values())).device
    # central differences: cbrt(machine eps) x RMS (LENGTH_FACTOR; 16-bit parameters: 4 x)
    h = step_length(base, direction, epsilon, order=2)
    teachers = tree_map(lambda o: o.detach() if isinstance(o, Tensor) else o, outputs)  # any nesting of outputs
    names = list(direction)

    def terms_at(sign: float) -> Tensor:
        moved = dict(zip(names, along([base[n] for n in names], [direction[n] for n in names], sign * h)))
        # differences of half-precision forwards drown in rounding: these two run in full precision
        with replay(), torch.autocast(device.type, enabled=False):
            return criterion(call_with(model, {**base, **moved}, scratch.fresh(), x), y,
                             teacher_outputs=teachers)

    plus = terms_at(1.0)
    minus = terms_at(-1.0)
    return difference(plus, minus, h, 2.0)
