"""How the meta-gradient is computed: one object per backend, owning its rules.

A backend knows which optimizers it can replay, what it refuses (under DistributedDataParallel,
with a restricted look-ahead, with a criterion that cannot hold its targets fixed), and how to
compute :math:`\\nabla_\\gamma L_{val}(\\theta')`. :func:`make_backend` builds one from its name,
once, with the fallback to ``higher`` where the fast backends do not know the optimizer; the
weighter holds the object and never compares names.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._checks import NO_TRAINING_GRADIENT, NO_VALIDATION_GRADIENT, check_differentiable
from metaweight._randomness import model_generators, rng_state, set_rng_state
from metaweight._hypergradient import MetaResult, Reducer, eager_forward, meta_gradient
from metaweight._lookahead import lookahead, patchable, patched_call
from metaweight._optimizers import (EXACT_UPDATE_TYPES, REPLAYED_OPTIONS, SIGN_ONLY, differentiable_optimizer_type,
                                    replayable_types, sign_only_refusal, supports_exact_update)
from metaweight._protocols import Objective, Terms, model_arguments
from metaweight._walk import walk
from metaweight._warn import warn_user

BackendName = Literal["jvp", "finite_difference", "higher"]
BACKENDS: tuple[str, ...] = ("higher", "jvp", "finite_difference")


class Backend:
    """The meta-gradient of the validation objective with respect to gamma, one way.

    Attributes:
        name: the backend's name, as passed to the weighter.
        reuses_forward: whether the model's step may backpropagate through the meta step's own
            training forward (``reuse_forward=True``).
    """

    name: str = ""
    reuses_forward: bool = False

    def check(self, optimizer: torch.optim.Optimizer, *, distributed: bool, restricted: bool, terms: Terms) -> None:
        """Raise if this backend cannot serve these settings (called once, at construction)."""

    def check_call(self) -> None:
        """Raise if this backend cannot run where it is called (before the first meta step's gradient check too,
        which would run for nothing; helper-189)."""

    def meta_gradient(self, module: nn.Module, optimizer: torch.optim.Optimizer, terms: Terms, objective: Objective,
                      gamma: Tensor, train: tuple[Any, Any], val: tuple[Any, Any], *,
                      lookahead_names: set[str] | None, keep_graph: bool, reducer: Reducer) -> MetaResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return repr(self.name)


class HigherBackend(Backend):
    """Differentiates through a replay of the optimizer's step (`higher`): the reference."""

    name = "higher"

    def check(self, optimizer: torch.optim.Optimizer, *, distributed: bool, restricted: bool, terms: Terms) -> None:
        if distributed:
            raise ValueError("With DistributedDataParallel use backend='jvp' or 'finite_difference': higher's "
                             "inner step would use each rank's own gradient instead of the averaged one.")
        if restricted:
            raise ValueError("`lookahead_params` needs backend='jvp' or 'finite_difference'.")
        differentiable_optimizer_type(optimizer)  # fail now, not at the first meta step

    def meta_gradient(self, module: nn.Module, optimizer: torch.optim.Optimizer, terms: Terms, objective: Objective,
                      gamma: Tensor, train: tuple[Any, Any], val: tuple[Any, Any], *,
                      lookahead_names: set[str] | None, keep_graph: bool, reducer: Reducer) -> MetaResult:
        (x, y), (xv, yv) = train, val
        gamma = gamma.detach().clone().requires_grad_(True)
        modules = [m for _, m in walk(module).modules]
        with eager_forward(module, modules), patchable(modules):  # (before the copy: it copies compiled calls)
            fmodel, diffopt = lookahead(module, optimizer)
            args, kwargs = model_arguments(module, x)  # decided on the module: the patched copy's forward is generic
            values = terms(patched_call(fmodel, args, kwargs), y)
            check_differentiable(values, NO_TRAINING_GRADIENT)
            diffopt.step((gamma.to(values) * values).sum())
            args, kwargs = model_arguments(module, xv)
            losses = objective.losses(patched_call(fmodel, args, kwargs), yv)
        value = objective.objective(losses)
        check_differentiable(value, NO_VALIDATION_GRADIENT)
        try:
            (gamma_grad,) = torch.autograd.grad(value, gamma)  # non-finite when the objective is: the weighter decides
        except RuntimeError as exc:
            if "derivative for" not in str(exc) or "not implemented" not in str(exc):
                raise
            raise ValueError(
                f"backend='higher' differentiates the look-ahead step's backward, and the model uses an operator "
                f"without a second derivative ({str(exc).splitlines()[0][:200]}).{_no_derivative_fix(str(exc))}"
            ) from exc
        return MetaResult(gamma_grad, value.detach(), losses.detach(), values.detach())


def _no_derivative_fix(error: str, fast: bool = True) -> str:
    """What to do about an operator without a forward-mode or second derivative, named in ``error``: torch's fused
    attention kernels have neither (both exact backends fail), so the fix is attention of plain ops, or the fast
    mode, which needs neither."""
    if "scaled_dot_product" in error or "_flash_attention" in error or "_efficient_attention" in error:
        return (" It is one of torch's fused attention kernels (scaled_dot_product_attention), which have neither a "
                "forward-mode nor a second derivative, so no exact backend can go through them: run the weighter "
                "with attention of plain ops, `with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend."
                "MATH):` around its calls (for a Hugging Face model, attn_implementation='eager')"
                + (", or use mode='fast', which needs neither." if fast else " for the exact meta-gradient."))
    return (" Use an implementation of that operator made of plain ops (for a Hugging Face model, "
            "attn_implementation='eager'), or mode='fast', which needs no derivative beyond the gradient.")


class _Directional(Backend):
    """The meta-gradient as one directional derivative of the term vector (see _hypergradient)."""

    reuses_forward = True
    fd_epsilon: float | None = None

    def check_call(self) -> None:
        if caller_hooks_in_force():  # (the caller's: helper-188)
            raise ValueError(CALLER_HOOKS.format(backend=self.name))

    def meta_gradient(self, module: nn.Module, optimizer: torch.optim.Optimizer, terms: Terms, objective: Objective,
                      gamma: Tensor, train: tuple[Any, Any], val: tuple[Any, Any], *,
                      lookahead_names: set[str] | None, keep_graph: bool, reducer: Reducer) -> MetaResult:
        # activation checkpointing recomputes at backward time, after functional_call has put theta back:
        # the validation gradient would be taken partly at theta instead of theta'
        self.check_call()
        try:
            with torch.autograd.graph.disable_saved_tensors_hooks(CHECKPOINTING):
                return meta_gradient(module, optimizer, terms, objective, gamma, train, val, backend=self.name,
                                     lookahead_names=lookahead_names, keep_graph=keep_graph,
                                     fd_epsilon=self.fd_epsilon, reducer=reducer)
        except RuntimeError as exc:
            if CHECKPOINTING not in str(exc):
                raise
            raise ValueError(CHECKPOINTING.format(backend=self.name)) from None


def caller_hooks_in_force() -> bool:
    """Whether saved-tensor default hooks are in force where this is called (the caller's ``save_on_cpu()`` or
    ``saved_tensors_hooks`` around a weighter's call; a model's own are pushed inside its forward only)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


CHECKPOINTING = (
    "The model uses activation checkpointing, which recomputes the forward at backward time with the model's own "
    "parameters, not the look-ahead's, or other saved-tensor hooks, which this backend cannot tell from it (offloading "
    "with save_on_cpu recomputes nothing, but is refused too): backend='{backend}' would take the validation "
    "gradient at the wrong point. Use backend='higher' or mode='fast', or turn checkpointing off for the weighter.")


CALLER_HOOKS = (
    "backend='{backend}' runs its look-ahead without saved-tensor hooks (it cannot tell activation checkpointing, "
    "which would take the validation gradient at the wrong point, from other hooks), and this call runs inside hooks "
    "of the caller's: torch.autograd.graph.save_on_cpu() or saved_tensors_hooks around step() or meta_step(). Call "
    "the weighter outside them (in the two calls: meta_step outside, your own forward and backward inside), or use "
    "backend='higher' or mode='fast', which take them. Nothing was changed.")


class JvpBackend(_Directional):
    """Exact: one forward-mode pass along the validation gradient mapped through the optimizer.

    Some operators have no forward-mode derivative (e.g. fused attention kernels such as
    ``scaled_dot_product_attention`` on the CPU). At the first such failure this backend warns
    once and continues by central differences (``finite_difference``), which need only
    forwards, when the criterion can hold its detached targets fixed; otherwise it says what to
    do.
    """

    name = "jvp"

    def __init__(self) -> None:
        self.fallback: FiniteDifferenceBackend | None = None

    def meta_gradient(self, module: nn.Module, optimizer: torch.optim.Optimizer, terms: Terms, objective: Objective,
                      gamma: Tensor, train: tuple[Any, Any], val: tuple[Any, Any], *,
                      lookahead_names: set[str] | None, keep_graph: bool, reducer: Reducer) -> MetaResult:
        if self.fallback is None:
            device = gamma.device
            rng = rng_state(device, model_generators(module))  # the model's own generators, NumPy's, Python's
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
                else None
            try:
                return super().meta_gradient(module, optimizer, terms, objective, gamma, train, val,
                                             lookahead_names=lookahead_names, keep_graph=keep_graph, reducer=reducer)
            except NotImplementedError as exc:
                if "forward AD" not in str(exc) and "forward mode AD" not in str(exc):  # (custom Functions say so)
                    raise
                attention = "scaled_dot_product" in str(exc) or "_attention" in str(exc).splitlines()[0]
                # (backend='higher' is refused under DDP: not offered there; helper-182)
                higher = "" if reducer.world > 1 else "backend='higher', or "
                if not terms.fixed_targets:
                    raise ValueError(
                        f"The model uses an operator without a forward-mode derivative ({str(exc).splitlines()[0]})."
                        + (_no_derivative_fix(str(exc)) + " Or pass backend='finite_difference' with a criterion "
                           "that takes `teacher_outputs`." if attention else
                           f" Pass {higher}backend='finite_difference' with a criterion that takes "
                           "`teacher_outputs`, or use an implementation of that operator made of plain ops (for a "
                           "Hugging Face model, attn_implementation='eager').")
                    ) from None
                warn_user(
                    f"backend='jvp': the model uses an operator without a forward-mode derivative "
                    f"({str(exc).splitlines()[0][:160]}); continuing with backend='finite_difference' (two forwards, "
                    f"approximate)."
                    + (_no_derivative_fix(str(exc), fast=False) if attention else
                       f" For the exact meta-gradient use {higher}plain-op implementations (for a Hugging "
                       "Face model, attn_implementation='eager').")
                )
                self.fallback = FiniteDifferenceBackend(self.fd_epsilon)
                set_rng_state(rng, device)  # the same dropout masks as if the fallback had run first
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
        return self.fallback.meta_gradient(module, optimizer, terms, objective, gamma, train, val,
                                           lookahead_names=lookahead_names, keep_graph=keep_graph, reducer=reducer)


class FiniteDifferenceBackend(_Directional):
    """Approximate: two forwards by central differences, the criterion's detached targets held fixed."""

    name = "finite_difference"

    def __init__(self, fd_epsilon: float | None = None) -> None:
        self.fd_epsilon = fd_epsilon

    def check(self, optimizer: torch.optim.Optimizer, *, distributed: bool, restricted: bool, terms: Terms) -> None:
        if not terms.fixed_targets:
            raise ValueError(
                f"backend='finite_difference' holds detached targets (a teacher's soft labels) fixed through a "
                f"`teacher_outputs` keyword, which `{type(terms.criterion).__name__}` does not take (it cannot see "
                f"whether a criterion detaches anything, so it needs the keyword of every one). Use backend='jvp' "
                f"(the default; exact) or give its forward a `teacher_outputs=None` argument (one that detaches "
                f"nothing may ignore it)."
            )


def accepted_optimizers(mode: str, backend: str, *, distributed: bool = False,
                        restricted: bool = False) -> tuple[type, ...]:
    """The optimizer classes a weighter that learns accepts at construction with this ``mode`` and ``backend``
    (under DistributedDataParallel, with ``lookahead_params``): these classes exactly, not their subclasses
    (whose step may differ). Read from the tables the checks read: :data:`REPLAYED_OPTIONS` (the classes whose
    options the replay knows), :data:`SIGN_ONLY` (refused: no meta-gradient), the closed form's
    :data:`EXACT_UPDATE_TYPES` (``mode="fast"``; ``jvp`` and ``finite_difference``) and `higher`'s replay
    (:func:`replayable_types`: ``backend="higher"``, and the fast backends' fallback in ``mode="exact"``, which
    :class:`HigherBackend` refuses under DistributedDataParallel and with ``lookahead_params``)."""
    if (mode == "fast" and restricted) or (backend == "higher" and (distributed or restricted)):
        return ()  # (settings refused whatever the optimizer: FastMode.check, HigherBackend.check)
    learnable = sorted((t for t in REPLAYED_OPTIONS if t not in SIGN_ONLY), key=lambda t: t.__name__.lower())
    closed_form = [t for t in learnable if t in EXACT_UPDATE_TYPES]
    if mode == "fast":
        return tuple(closed_form)
    replayed = [] if distributed or restricted else [t for t in learnable if t in replayable_types()]  # (fallback)
    if backend == "higher":
        return tuple(replayed)
    return tuple(t for t in learnable if t in closed_form or t in replayed)


def _other_settings(kind: type, mode: str, backend: str, *, distributed: bool, restricted: bool) -> list[str]:
    """The changes of one setting (``mode``, ``backend``, dropping ``lookahead_params``) with which
    :func:`accepted_optimizers` accepts ``kind``, each as the keyword to pass."""
    changes = [(f"mode={m!r}", m, backend, restricted) for m in ("exact", "fast") if m != mode]
    changes += [(f"backend={b!r}", mode, b, restricted) for b in BACKENDS if b != backend]
    if restricted:
        changes.append(("lookahead_params=None", mode, backend, False))
    return [change for change, m, b, r in changes
            if kind in accepted_optimizers(m, b, distributed=distributed, restricted=r)]


class OptimizerRefused(TypeError, ValueError):
    """A weighter refusing its optimizer's class with its settings: both a ``TypeError`` (the class) and a
    ``ValueError`` (with these settings), so that code catching either catches it in every mode and backend (the
    exact mode's refusal was a ``TypeError`` and the fast mode's a ``ValueError``)."""


def optimizer_refusal(optimizer: torch.optim.Optimizer, mode: str, backend: str, *, distributed: bool = False,
                      restricted: bool = False) -> Exception | None:
    """The error refusing ``optimizer`` with these settings (an :class:`OptimizerRefused`), or None where
    :func:`accepted_optimizers` has its class. It lists what these settings accept and suggests a setting to change
    only where that setting accepts the class; a class no setting accepts gets the ways that need none
    (``learn=False``, a loss weighting)."""
    kind = type(optimizer)
    accepted = accepted_optimizers(mode, backend, distributed=distributed, restricted=restricted)
    if kind in accepted:
        return None
    name = kind.__name__
    where = f"mode={mode!r}" if mode == "fast" else f"mode={mode!r} with backend={backend!r}"
    extras = ["under DistributedDataParallel"] * distributed + ["with lookahead_params"] * restricted
    where += f" ({', '.join(extras)})" if extras else ""
    listed = (f"{where} learns through these optimizer classes only: {', '.join(t.__name__ for t in accepted)}"
              f" (exactly these: a subclass may step otherwise).")
    subclass = next((t.__name__ for t in accepted if issubclass(kind, t)), None)
    if subclass is not None:
        listed += (f" `{name}` is a subclass of `{subclass}`: pass a torch.optim.{subclass} if its step is "
                   f"{subclass}'s.")
    others = _other_settings(kind, mode, backend, distributed=distributed, restricted=restricted)
    switch = f" With {' or '.join(others)}, the weighter accepts `{name}`." if others else ""
    instead = (" Or pass learn=False to keep the loss weights fixed, or use a loss weighting that replays no step "
               "(metaweight.UW, metaweight.DWA, metaweight.FAMO, ...). Nothing was changed.")
    if kind in SIGN_ONLY:
        return OptimizerRefused(f"{sign_only_refusal(kind)} {listed}{switch}{instead}")
    if mode == "fast":
        return OptimizerRefused(f"mode='fast' replays the model's step in closed form, which it knows for some "
                                f"optimizer classes only, not `{name}`. {listed}{switch}{instead}")
    if kind in replayable_types() and not supports_exact_update(optimizer):
        why = ("which would use each rank's own gradient instead of the averaged one" if distributed else
               "which looks ahead over every parameter, not those lookahead_params selects")
        return OptimizerRefused(f"The look-ahead replays a `{name}` step through `higher` only (the fast backends "
                                f"fall back to it), {why}. {listed}{switch}{instead}")
    return OptimizerRefused(f"The look-ahead cannot replay a `{name}` step. {listed}{switch}{instead}")


def make_backend(name: str, optimizer: torch.optim.Optimizer, *, distributed: bool, restricted: bool, terms: Terms,
                 fd_epsilon: float | None = None, mode: str = "exact") -> Backend:
    """The backend called ``name`` for this optimizer and these settings, checked once.

    The fast backends know the classes of :data:`EXACT_UPDATE_TYPES` in closed form; for another
    optimizer :func:`accepted_optimizers` accepts they fall back to ``higher`` with a warning. An
    optimizer these settings do not accept is refused (:func:`optimizer_refusal`).
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}. Expected one of {BACKENDS}.")
    if name == "higher" and (distributed or restricted):
        HigherBackend().check(optimizer, distributed=distributed, restricted=restricted, terms=terms)  # (any optimizer)
    refusal = optimizer_refusal(optimizer, mode, name, distributed=distributed, restricted=restricted)
    if refusal is not None:  # (before the fallback's warning)
        raise refusal
    backend: Backend
    if name == "higher":
        backend = HigherBackend()
    elif not supports_exact_update(optimizer):
        known = ", ".join(t.__name__ for t in EXACT_UPDATE_TYPES)
        warn_user(
            f"backend={name!r} knows the update of {known} only; falling back to "
            f"backend='higher' for `{type(optimizer).__name__}` (exact, but slower and heavier).",
            UserWarning,
        )
        backend = HigherBackend()
    elif name == "jvp":
        backend = JvpBackend()
    else:
        backend = FiniteDifferenceBackend(fd_epsilon)
    backend.check(optimizer, distributed=distributed, restricted=restricted, terms=terms)
    return backend
