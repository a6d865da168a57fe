"""What every loss-weighting method shares: the two calls, the one call, state, hooks and DDP.

A weighting gives one weight per named loss term. The user's loop is the same for every
method (and for :class:`~metaweight.HarmonizedWeighter` with ``mode="fast"``)::

    loss = weighting.loss(model(x), y)       # the weighted sum, for your own backward
    loss.backward()                          # or scaler.scale(loss).backward(); clipping, ...
    optimizer.step()                         # or scaler.step(optimizer)
    weighting.meta_step((x, y))              # the weights for the next iteration

or ``weighting.step((x, y))``, which does all four. :meth:`Weighting.meta_step` is the shared
name of "the call after the model's step" (a validation batch, which only
:class:`~metaweight.HarmonizedWeighter` uses, is accepted and ignored). Each method is a
subclass in its own module; the maths of its update is a plain function of tensors in that
module, so the class only holds state.

Design choices every method follows:

* the weights enter :meth:`Weighting.loss` as constants, and a method whose weights are
  learned by gradient descent (UW, GradNorm, FAMO) computes that gradient in closed form from
  the detached terms: nothing the user does to the loss (a ``GradScaler``, gradient
  accumulation, clipping) reaches the weights, and the user's optimizer is never changed;
* a method's update is computed as new values first and committed only when every value is
  finite, so a refused update (``nonfinite="raise"`` or ``"skip"``) changes nothing;
* under ``DistributedDataParallel`` the terms an update reads are averaged over the ranks
  (one all-reduce), so every rank holds the same weights;
* inactive terms (``criterion.active``) have weight 0 and take no part in any update; "the
  number of terms" in a paper's rule is the number of active terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from metaweight._capture import GradSnapshot
from metaweight._checks import (NO_TRAINING_GRADIENT, STATE_IN_INFERENCE_MODE, check_callbacks, check_differentiable,
                               check_initialized, check_not_inference_mode, checked_counters, forget_labels,
                               half_precision_eps_hint, integer_value, masked_label_hint, real_option, refuse_arrays,
                               summarize_step_labels)
from metaweight._hooks import OwnHook
from metaweight._hypergradient import Reducer
from metaweight._logging import HandedLogger
from metaweight._optimizers import check_optimizer_state, check_parameters_replaced, unwrap_optimizer
from metaweight._protocols import Terms, call_model
from metaweight._randomness import model_generators, rng_state, set_rng_state
from metaweight._record import MetaStepRecord
from metaweight._transaction import (COPIED_SINCE, LOADED_DURING, LOADED_SINCE, BufferSnapshot, copy_value,
                                     gradients_moved, host_read, nonfinite_flag, not_stepped_message,
                                     resumed_mid_step_message)
from metaweight._walk import ModelWalk, walk, walked_call
from metaweight._warn import raise_or_skip_step, warn_user

Batch = Sequence[Any]
NONFINITE = ("raise", "skip")


@runtime_checkable
class LossWeighting(Protocol):
    """What every loss weighting offers, :class:`HarmonizedWeighter` and each :class:`Weighting` alike.

    ``loss(outputs, target)`` gives the weighted scalar for the user's backward;
    ``meta_step(train_batch, val_batch)`` updates the weights (after the optimizer's step, or
    before it for ``HarmonizedWeighter`` in ``mode="exact"``); ``step(train_batch, val_batch)`` is
    the one-call iteration; both return a :class:`MetaStepRecord`, also given to the hooks.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> all(isinstance(w, mw.LossWeighting) for w in (mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2)),
        ...                                               mw.RLW(net, opt, mw.DenseDistillLoss(2))))
        True
    """

    @property
    def term_names(self) -> list[str]: ...

    def loss(self, outputs: Any, target: Any) -> Tensor: ...

    def meta_step(self, train_batch: Any, val_batch: Any = None) -> MetaStepRecord: ...

    def step(self, train_batch: Any, val_batch: Any = None) -> MetaStepRecord: ...

    def gamma_dict(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Any) -> None: ...

    def register_meta_step_hook(self, hook: Callable[[MetaStepRecord], None]) -> RemovableHandle: ...


def unwrap_model(model: nn.Module) -> tuple[nn.parallel.DistributedDataParallel | None, nn.Module]:
    """The ``DistributedDataParallel`` wrapper (if any) and the plain module under it and under ``torch.compile``."""
    ddp = None
    for _ in range(4):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            ddp, model = model, model.module
        elif callable(getattr(model, "_orig_mod", None)) and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return ddp, model


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, lr: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient), as new tensors.

    ``step`` counts this step (1 for the first). Returns the new parameter and moments; nothing
    is changed in place, so a caller can check the result before keeping it.
    """
    if weight_decay:
        grad = grad + weight_decay * param
    exp_avg = exp_avg * betas[0] + (1 - betas[0]) * grad
    exp_avg_sq = exp_avg_sq * betas[1] + (1 - betas[1]) * grad * grad
    bias1 = 1 - betas[0] ** step
    bias2 = 1 - betas[1] ** step
    denom = exp_avg_sq.sqrt() / math.sqrt(bias2) + eps
    return param - (lr / bias1) * exp_avg / denom, exp_avg, exp_avg_sq


@dataclasses.dataclass
class _Calls:
    """Training :meth:`Weighting.loss` calls between two optimizer steps: what they gave (``_per_call``) times
    their scored labels, summed; the labels (a tensor, or an int), samples and calls."""

    sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    weight: Tensor | int = 0
    samples: int = 0
    calls: int = 0
    wrote: bool = False  # whether their backwards wrote gradients (then cleared ones mean a zero_grad since)
    # the gradients (objects and versions) as the last backward left them, or as the last look found them written
    # since without a zeroing: what changed after is looked at (:meth:`Weighting._drop_cleared`)
    after: GradSnapshot | None = None
    # each call's first label tensor (FAMO), after its number in the order of the loss() calls (a backward
    # through several reaches them in another order)
    labels: list[tuple[int, Tensor | None]] = dataclasses.field(default_factory=list)

    def mean(self, name: str) -> Tensor | None:
        """The calls' mean of ``name`` (:meth:`Weighting._per_call`) over their scored labels, or None."""
        return self.sums[name] / self.weight if name in self.sums else None


class _StepCounter(OwnHook):
    """The process-wide optimizer step post-hook noting that an optimizer stepped (every ``torch.optim``
    optimizer, fused or not, and every subclass: torch calls the global hooks from ``Optimizer.step``'s
    wrapper). Counted when read: the steps between two reads count as one, so a subclass whose ``step()``
    calls ``super().step()`` (the hook runs once per level) steps once."""

    stepped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> stepped since the last read
    counts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    handle: Any = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.stepped[optimizer] = True


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many times ``optimizer`` was seen to have stepped since the counter was registered (at the first
    call): at most one more at each call (steps between two calls count as one)."""
    if _StepCounter.handle is None:
        _StepCounter.handle = register_optimizer_step_post_hook(_StepCounter())
    if _StepCounter.stepped.pop(optimizer, False):
        _StepCounter.counts[optimizer] = _StepCounter.counts.get(optimizer, 0) + 1
    return _StepCounter.counts.get(optimizer, 0)


def _scored(target: Any, ignore_index: Any) -> Tensor | int:
    """How many labels of ``target`` a criterion with ``ignore_index`` scores (a tensor on the labels' device:
    no read), or its samples where it has no integer ``ignore_index`` or no integer labels."""
    labels = next((t for t in tree_leaves(target) if isinstance(t, Tensor)), None)
    if isinstance(ignore_index, int) and not isinstance(ignore_index, bool) and labels is not None \
            and labels.dim() > 0 and not labels.is_floating_point() and not labels.is_complex():
        return (labels != ignore_index).sum()
    return batch_samples(target)


def first_labels(target: Any) -> Tensor | None:
    """The first tensor of a batch's labels with a batch dimension (``None`` for none)."""
    return next((t for t in tree_leaves(target) if isinstance(t, Tensor) and t.dim() > 0), None)


def batch_samples(target: Any) -> int:
    """The samples of a batch's labels (the first dimension of its first tensor with one; 1 for none)."""
    return next((int(t.shape[0]) for t in tree_leaves(target) if isinstance(t, Tensor) and t.dim() > 0), 1)


def check_optimizer_holds_model(optimizer: torch.optim.Optimizer, module: nn.Module, name: str) -> None:
    """Refuse an optimizer that holds none of the model's parameters (built over another model, or over the model
    before it was replaced by a copy): the loop's step would train nothing of the model while the weights learn
    from its terms. An optimizer over a part of the model is the two-call form's to use on purpose."""
    own = {id(p) for p in module.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.requires_grad for p in module.parameters()) and not any(id(p) in own for p in held):
        raise ValueError(f"`optimizer` holds none of the model's parameters ({len(held)} tensors, none of them a "
                         f"parameter of the {type(module).__name__} given): it was built over another model, or over "
                         f"this one before it was replaced (a copy, a reloaded model). Build it over "
                         f"model.parameters() of the model given to {name}, or give {name} the model the optimizer "
                         f"trains.")


def check_step_holds_trainable(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, Tensor]], call: str,
                               two_calls: str) -> set[int]:
    """Refuse, for a one-call ``step()``, an optimizer that does not hold every trainable parameter of the model
    (``named``): built over a part by mistake (an optimizer made before ``attach_exits`` added the exits' heads,
    one over a sub-module), it would leave the rest untrained without a word. Freezing them
    (``requires_grad_(False)``) says it on purpose; the two calls (``two_calls``, the loop's own step) take a part
    stepped on purpose. Returns the ids of the tensors the optimizer holds. Python objects only."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in named if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"{call} steps the model with its optimizer, but the optimizer does not hold the model's "
                         f"trainable parameters {missing[:6]}{' ...' if len(missing) > 6 else ''} (built before "
                         f"attach_exits added the exits, or over a part of the model?): they would not train. Build it "
                         f"over model.parameters() (freeze what should not train with requires_grad_(False)), or, to "
                         f"step a part on purpose, use the two calls: {two_calls}. Nothing was changed.")
    return held


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False,
                 powers: tuple[int, ...] = (1,)) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` when it is not a finite number above ``low``
    (or float32 loses it as used, ``value ** p`` for each of ``powers``: :func:`real_option`)."""
    return real_option(value, name, f"a finite number {'>' if strict else '>='} {low}",
                       lambda v: math.isfinite(v) and (v > low if strict else v >= low), powers=powers)


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    number = integer_value(value)
    if number is None or number < low:
        raise ValueError(f"Invalid {name}: {value!r}. Expected an int >= {low}.")
    return number


HOOK_RAISED = "_metaweight_hook_raised"  # set on an error that came out of a meta step hook


def mark_hook_raised(exc: BaseException) -> None:
    """Mark ``exc`` as raised by a meta step hook (after the meta step ran: its caller's own undo may differ)."""
    try:
        setattr(exc, HOOK_RAISED, True)
    except Exception:  # noqa: BLE001 - (an exception type without attributes: unmarked)
        pass


def logged_note(logged: list[str]) -> str:
    """What the note of a hook that raised says of the library's loggers called before it (``logged``, their
    class names; "" for none)."""
    if not logged:
        return ""
    return (f" The loggers called before that hook ({', '.join(logged)}) were given this meta step and logged it "
            f"(unless they warned they could not): the next meta step's record drops it, with a warning (not where "
            f"a checkpoint saved after this call is loaded first: it holds this iteration's model step). List "
            f"them after your hooks in callbacks to log only meta steps that stand.")


# what :meth:`Weighting._reset_pending` clears: the iteration's loss() calls, kept for its meta_step
_ITERATION = ("_pending", "_groups", "_last_values", "_kept_at", "_pending_trains", "_resumed", "_resumed_calls",
              "_load_note")


def _made_outside_inference_mode(method: Callable[..., Any]) -> Callable[..., Any]:
    """A method that may run under ``torch.inference_mode()`` (a weighting's ``meta_step`` and ``load_state_dict``)
    runs with it off: the state it makes or keeps (the weights, a method's buffers, its scratch copies) would
    otherwise be inference tensors, which every later update outside it refuses to change in place. Reading the
    inference tensors the user's code made there (terms) is allowed."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return method(self, *args, **kwargs)
    return call


def _slot_names(cls: type) -> list[str]:
    """The names of the ``__slots__`` of ``cls`` and its bases (private names as Python mangles them)."""
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"
            if name not in ("__dict__", "__weakref__"):
                names.append(name)
    return names


def _then_built(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a weighter's ``__init__``: once the outermost constructor has returned (a subclass's, whatever it does
    after ``super().__init__``: its own option checks, ``_setup`` or its own ``gamma``), :meth:`NamedWeights._built`
    gives the weighter what it is given once nothing can refuse it: a library logger logs the weighter given it
    last, so a weighter whose constructor raised would have taken it from the run holding it."""
    @functools.wraps(init)
    def construct(self: NamedWeights, *args: Any, **kwargs: Any) -> None:
        if "_constructing" in self.__dict__:  # (a subclass's super().__init__: the outermost call finishes)
            init(self, *args, **kwargs)
            return
        rebuilt = self.__dict__.get("_metaweight_built", False)  # (__init__ called again on a built weighter)
        kept = dict(self.__dict__) if rebuilt else None  # (what a refused re-build puts back: the object as it was)
        if rebuilt:
            self._unbuild()
        self.__dict__["_constructing"] = True
        try:
            init(self, *args, **kwargs)
        except BaseException:
            if kept is not None:
                self.__dict__.clear()
                self.__dict__.update(kept)
            raise
        finally:
            self.__dict__.pop("_constructing", None)
        if kept is not None:
            self._drop_build(kept)
        self._built()
        self.__dict__["_metaweight_built"] = True
    _CONSTRUCTORS.add(construct)
    return construct


_CONSTRUCTORS: weakref.WeakSet[Callable[..., None]] = weakref.WeakSet()  # (the constructors _then_built made)


def _placeholder(init: Any) -> bool:
    """Whether ``init`` is typing's stand-in constructor of a ``Protocol`` subclass, which looks the class's real
    one up at its first call (and does nothing once the class's ``__init__`` is another function)."""
    return getattr(init, "__name__", None) == "_no_init_or_replace_init" and \
        getattr(init, "__module__", None) == "typing"


def restored_at(calls: Any) -> bool:
    """Whether a weighter copied or loaded with ``calls`` iterations counted is a run resumed from a checkpoint
    (:attr:`MetaStepRecord.restored`), where one with none is a template for a new run (a copy made when built, a
    ``state_dict`` saved before the first step): its log's rows would all be undone, so its log is a new run's."""
    return not isinstance(calls, int) or calls > 0


class NamedWeights:
    """What every loss weighting shares for naming and logging: :attr:`term_names`,
    :meth:`gamma_dict`, :meth:`terms_dict` and the meta-step hooks (of ``HarmonizedWeighter`` and
    :class:`Weighting`), and the check of parameters replaced between calls. Needs ``_terms``, ``gamma``,
    ``last_terms``, ``_hooks``, ``module`` and ``_inner_optimizer``."""

    _terms: Terms
    gamma: Tensor
    last_terms: Tensor | None
    _hooks: OrderedDict[int, Callable[[MetaStepRecord], None]]
    module: nn.Module
    _inner_optimizer: torch.optim.Optimizer
    # the iteration the next meta step kept follows (MetaStepRecord.follows): 0 when built, the iteration loaded at
    # (load_state_dict), then that of each meta step kept; None for an object pickled by an earlier metaweight
    _follows: int | None = None
    _restored = False  # whether _follows is the iteration loaded at (MetaStepRecord.restored)
    _said_skipped = False  # whether a two-call meta_step after a batch skipped with a finite loss was warned of

    def _check_parameters_held(self, call: str) -> None:
        """At every call of ``step``/``meta_step`` (inside its walk), before anything changes: the optimizer holds no
        tensor that was a parameter of the model at the last call (or when the object was built: ``_kept_walk``) and
        is no longer (replaced by ``load_state_dict(..., assign=True)`` or with its module: the optimizer would step
        the old tensor while the model stays as it is). Python objects only; nothing to compare where the last
        call's walk still describes the model (:func:`~metaweight._walk.walked`)."""
        before, now = self.__dict__.get("_kept_walk"), walk(self.module)
        if before is not None and before is not now:
            named = {alias: p for name, p in now.parameters for alias in now.aliases.get(name, (name,))}
            check_parameters_replaced(self._inner_optimizer, before.parameters, named, f"{type(self).__name__}.{call}")

    @property
    def term_names(self) -> list[str]:
        """The names of the loss terms, in the order of :attr:`gamma`."""
        return self._terms.term_names

    def gamma_dict(self) -> dict[str, float]:
        """The current loss weights by term name."""
        return dict(zip(self.term_names, host_read([self.gamma])))

    def terms_dict(self) -> dict[str, float]:
        """The unweighted loss terms of the last :meth:`loss` call, by term name (empty before it)."""
        if self.last_terms is None:
            return {}
        return dict(zip(self.term_names, host_read([self.last_terms])))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own constructor when the class is made (:func:`_then_built`): built through it however
        it is called (``cls(...)``, or a factory's ``cls.__new__(cls)`` then ``Parent.__init__(obj, ...)``)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__init__")
        if own is not None and own not in _CONSTRUCTORS and not _placeholder(own):
            resolved = cls.__init__  # (a descriptor, a partialmethod or a decorator object, as the class gives it)
            if resolved not in _CONSTRUCTORS:
                cls.__init__ = _then_built(resolved)  # type: ignore[method-assign]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Wrap the constructor of ``cls`` at its first instance, before it runs, where it is not one wrapped when
        its class was made: one a ``@dataclass`` made after the class, a mixin's listed first (with no metaclass to
        conflict with a user's: ``abc.ABC``, a ``Protocol``)."""
        init = cls.__init__
        if init not in _CONSTRUCTORS:  # (by identity: functools.wraps copies a wrapper's attributes)
            if _placeholder(init):  # (a Protocol listed first: typing's stand-in, which finds the constructor itself)
                init = next((c.__dict__["__init__"] for c in cls.__mro__
                             if "__init__" in c.__dict__ and not _placeholder(c.__dict__["__init__"])), object.__init__)
            if init not in _CONSTRUCTORS:
                init = _then_built(init)
            cls.__init__ = init  # type: ignore[method-assign]
        return super().__new__(cls)

    def _built(self) -> None:
        """What the constructor gives the weighter once it has returned whole (:func:`_then_built`)."""

    def _unbuild(self) -> None:
        """Before ``__init__`` runs again on a built weighter (a reset): take back what the last build gave it, so
        that the new one starts as a new object would: the weights, which :meth:`_built` gives anew where the
        constructor sets none (a subclass defining ``_initial_gamma`` only kept the trained ones, of another
        number of terms after a criterion of another K). The ``__dict__`` as it was is put back if the new
        ``__init__`` raises (a slot's weights are not: a subclass with a ``gamma`` slot is rebuilt without them)."""
        if "gamma" in self.__dict__:
            del self.__dict__["gamma"]
        elif isinstance(getattr(type(self), "gamma", None), types.MemberDescriptorType):  # (a slot)
            with contextlib.suppress(AttributeError):
                delattr(self, "gamma")

    def _drop_build(self, kept: dict[str, Any]) -> None:
        """Once ``__init__`` ran again and returned: let go of what the last build (its ``__dict__``: ``kept``) holds
        outside the object."""

    def _register_given(self) -> None:
        """The constructor's ``callbacks`` (kept in ``_callbacks_given`` until it has returned), registered first:
        before hooks a subclass registered itself."""
        for callback in reversed(self.__dict__.pop("_callbacks_given")):
            self._hooks.move_to_end(self.register_meta_step_hook(callback).id, last=False)

    def _copy_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` (this weighter's ``__dict__`` as pickled) with what it lacks: the values of the ``__slots__`` of
        a subclass, and which of its hooks are library loggers that log it (those given to another weighter since
        log that one): a logger is pickled without its weak references."""
        state["_metaweight_slots"] = {name: getattr(self, name) for name in _slot_names(type(self))
                                      if hasattr(self, name)}
        state["_logs_me"] = {handle for handle, hook in self._hooks.items() if isinstance(hook, HandedLogger) and (
            hook._metaweight_owner is None or hook._metaweight_owner() is self or (
                hook._metaweight_owner() is None and not self._passed_over(hook)))}  # (None: its weighter gone)
        return state

    def _passed_over(self, hook: HandedLogger) -> bool:
        """Whether the library logger ``hook`` was given to another weighter since it was given this one."""
        passed = hook._metaweight_passed_over
        return passed is not None and self in passed

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, or unpickled) holds copies of its hooks: the library's loggers among them
        log this copy where they logged the weighter copied, and are passed over where they had been given to
        another weighter (a logger is pickled without the weak references to the weighters: its copy then logged
        no weighter, its put-back rows read as a new run and a weighter it was handed to next was not told; or,
        shared by two weighters pickled together, the first unpickled)."""
        check_not_inference_mode(f"Copying or loading a {type(self).__name__} (copy.copy, copy.deepcopy, pickle, "
                                 f"torch.load)", STATE_IN_INFERENCE_MODE)
        state = dict(state)
        mine = state.pop("_logs_me", None)  # (None: pickled by an earlier metaweight)
        slots = state.pop("_metaweight_slots", {})
        self.__dict__.update(state)
        for name, value in slots.items():
            object.__setattr__(self, name, value)
        # a copy is a checkpoint and its load: its log's rows after the last iteration it reported are of steps
        # undone (as after load_state_dict, which knows no more than the count of iterations); one copied before its
        # first call is a template for a new run, not a resume (one copied later is, its first meta step kept or
        # not: after a warm-up with learn=False, taken for a template, its resume was logged as a new run)
        self._restored = restored_at(self.__dict__.get("num_calls"))
        for handle, hook in self.__dict__.get("_hooks", {}).items():
            if not isinstance(hook, HandedLogger):
                continue
            if mine is None or handle in mine:  # (the weighter copied logged it)
                if hook._metaweight_owner is None:  # (a copy of the logger: this copy's; a live logger, shared by
                    hook._metaweight_owner = weakref.ref(self)  # a shallow copy, logs whom it logged)
            else:  # (given to another weighter since: so is this copy's)
                if hook._metaweight_passed_over is None:
                    hook._metaweight_passed_over = weakref.WeakKeyDictionary()
                hook._metaweight_passed_over[self] = False

    def register_meta_step_hook(self, hook: Callable[[MetaStepRecord], None]) -> RemovableHandle:
        """Call ``hook(record)`` after every successful meta step, like
        ``torch.optim.Optimizer.register_step_post_hook``; ``handle.remove()`` unregisters it.

        Args:
            hook: a callable taking the :class:`MetaStepRecord` (a mapping with ``iteration``,
                ``meta_step``, ``gamma``, ``terms``, ...): the very record the call returns, so within
                ``step()`` with the model step's ``loss`` and ``model_step_skipped`` too.

        A hook that raises has the meta step it reports put back (the weights and their state, the
        validation average, ``num_meta_steps``, ``last_meta``; a ``meta_step`` of the two calls then
        counts for nothing and may be made again), while a model step the call took (``step()``) stands
        and is counted; the error, re-raised, carries a note that says which. Hooks are called in the
        order registered: list the library's loggers (:class:`CSVLogger`, :class:`TensorBoardLogger`)
        after your own hooks to log only meta steps that stand (the note names a logger that was
        called before the hook that raised, and so logged the meta step put back; it drops that row
        at the next record, which follows the meta step before it: ``record.follows``).
        """
        if not callable(hook):
            raise TypeError(f"`hook` should be callable with a MetaStepRecord. Found `{type(hook).__name__}`.")
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        if isinstance(hook, HandedLogger):  # the library's loggers log the weighter given them last
            if hook._metaweight_owner is not None and hook._metaweight_owner() is not self:
                if hook._metaweight_passed_over is None:
                    hook._metaweight_passed_over = weakref.WeakKeyDictionary()
                previous = hook._metaweight_owner()
                if previous is not None:  # (handed over for good: not given back when the new one is gone)
                    hook._metaweight_passed_over[previous] = False
            if hook._metaweight_passed_over is not None:
                hook._metaweight_passed_over.pop(self, None)
            hook._metaweight_owner = weakref.ref(self)
        return handle

    def _call_hooks(self, record: MetaStepRecord, logged: list[str] | None = None) -> None:
        """Every hook with ``record``, in the order registered; a logger of the library given to another weighter
        since (a second stage of training, or two weighters compared side by side) logs that one's run alone: this
        weighter's records would read to it as its run going back to a checkpoint and drop its rows, so they are not
        written (a warning says so, once per logger). ``logged`` collects the names of the library's loggers that
        were called (for the note of a hook that raises after them)."""
        for hook in list(self._hooks.values()):
            passed = hook._metaweight_passed_over if isinstance(hook, HandedLogger) else None
            owner = hook._metaweight_owner if isinstance(hook, HandedLogger) else None
            if owner is not None and owner() is None and not self._passed_over(hook):
                # the weighter it logged is gone, and this one was not passed over: a shallow copy of it (copy.copy)
                # kept in its place, whose run this is (its rows too, for a put-back row: HandedLogger._own_rows)
                hook._metaweight_owner = weakref.ref(self)
                if hook._rows_owner is owner:
                    hook._rows_owner = hook._metaweight_owner
            if passed is not None and self in passed:
                if not passed[self]:  # (one warning per logger and weighter passed over)
                    passed[self] = True
                    warn_user(f"This weighter's {type(hook).__name__} was given to another weighter since, and logs "
                              f"that one's run: this one's records (iteration {record.iteration} on) are not written "
                              f"to it (two weighters' iterations 1, 2, ... in one log would read as a run going back "
                              f"to a checkpoint and drop rows). Give each weighter its own logger.")
                continue
            hook(record)
            if logged is not None and isinstance(hook, HandedLogger):
                logged.append(type(hook).__name__)

    def _report(self, record: MetaStepRecord, put_back: Callable[[], None], stood: str) -> None:
        """:meth:`_call_hooks` with ``record`` of the meta step just kept (as :attr:`last_meta`). A hook that raises
        (a callback of the user's) has that meta step put back (``put_back``: the weights and their state, the
        average, the count, :attr:`last_meta`) and its error says what stood (``stood``): one rule for every step
        form and method (the model's step, where the call took one, stands)."""
        object.__setattr__(record, "follows", self._follows)  # (a frozen record: fields set after it is made)
        object.__setattr__(record, "restored", self._restored)
        before = self._follows, self._restored
        self._follows, self._restored = record.iteration, False  # (before the hooks: a copy one saves follows it)
        logged: list[str] = []
        try:
            self._call_hooks(record, logged)
        except BaseException as exc:  # (an interrupt in a hook too, as the fast step's handler takes it)
            mark_hook_raised(exc)
            self._follows, self._restored = before
            put_back()
            stood += logged_note(logged)
            if hasattr(exc, "add_note"):  # (Python 3.11+: the error keeps its type)
                exc.add_note(f"metaweight: a meta step hook raised after the step it reports; {stood}")
            raise

    @property
    def callbacks(self) -> list[Callable[[MetaStepRecord], None]]:
        """The registered meta-step hooks, in order (the constructor's ``callbacks`` first)."""
        return list(self._hooks.values())


_OTHER_CRITERION = ("(criterion.active differs: e.g. DenseDistillLoss(teachers='dense') saved, teachers='last' now). "
                    "Build it with the criterion the checkpoint was saved with. Nothing was changed.")


def _unset_gamma(weighting: Any) -> bool:
    """Whether a weighting's constructor left ``gamma`` unset: not in its ``__dict__`` (a class default such as
    ``gamma = None``, or a ``__getattr__``, is no value of its own), or, where its class makes ``gamma`` a
    descriptor (a property, a ``functools.cached_property``, a slot), reading it fails."""
    if hasattr(getattr(type(weighting), "gamma", None), "__get__"):
        try:
            weighting.gamma  # noqa: B018
        except Exception:  # noqa: BLE001 - (a property raising until set: KeyError, AttributeError, ...)
            return True
        return False
    return "gamma" not in weighting.__dict__


class Weighting(NamedWeights):
    r"""The base of every loss-weighting method: one weight :math:`\gamma_k` per named loss term.

    Subclasses set :meth:`_initial_gamma` (the weights are set from it when the constructor
    returns, unless it set :attr:`gamma` itself) and, when their weights move, :meth:`_propose` (the
    update as new tensors); a method whose weighted loss is not :math:`\sum_k \gamma_k L_k`
    overrides :meth:`_combine`. The ``callbacks`` are registered once the constructor (a
    subclass's, its own checks included) has returned: one that raises takes no logger.
    Everything else (checks, the two calls and the one call, ``state_dict``, hooks, DDP) is here.

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the optimizer of ``model`` (used by :meth:`step` only; never changed otherwise).
        criterion: the loss terms: any callable ``criterion(outputs, target) -> Tensor[n]`` with
            ``term_names`` (see :mod:`metaweight._protocols`), e.g. a :class:`DenseDistillLoss`.
        term_names: the names of the criterion's terms, where it has no ``term_names``.
        nonfinite: ``"raise"`` a ``ValueError`` or ``"skip"`` (warn and count) an update or a model
            step that is not finite; either way nothing is changed.
        callbacks: hooks called with the :class:`MetaStepRecord` of every successful update.
    """

    def _built(self) -> None:
        """Once the whole constructor has returned (a subclass's, whatever it does after ``super().__init__``: its
        own option checks, ``_setup`` or its own ``gamma``): the weights from :meth:`_initial_gamma` where it set
        none, the criterion moved to the model's device, the ``callbacks`` registered, first."""
        if "_callbacks_given" not in self.__dict__:  # (a subclass that never called Weighting.__init__)
            return
        if _unset_gamma(self):  # (a subclass that sets _initial_gamma only: the weights from it)
            self._setup()
        if isinstance(self.criterion, nn.Module):
            self.criterion.to(self.device)
        self._register_given()

    needs_terms: ClassVar[bool] = True  # whether meta_step reads the terms of the loss() call before it
    reads_train_batch: ClassVar[bool] = False  # whether meta_step reads its train_batch (FAMO: the terms again)
    # after a load_state_dict of a checkpoint saved in the middle of an accumulated step: its loss() calls made (until
    # the first backward through a training loss() since, which looks at the gradients), then (that call's number,
    # those calls) where the gradients held values then (restored .grad: the step to come carries the earlier
    # calls'); class defaults for objects unpickled from an older metaweight
    _resumed_calls: int = 0
    _resumed: tuple[int, int] | None = None
    _load_note = ""  # LOADED_DURING after a load, until the next meta_step: said where a check refuses the batch
    # (defaults of state that a weighting pickled by an earlier metaweight lacks)
    _pending_trains: bool = False
    _made_at: int | None = None  # the optimizer's step count at the last training loss() call
    _unreached: tuple[int, Tensor | None] | None = None
    _step_fields: dict[str, Any] = {}  # within step(): the fields it adds to meta_step's record (never mutated)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *,
                 term_names: Sequence[str] | None = None, nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        check_not_inference_mode(f"{type(self).__name__}()", STATE_IN_INFERENCE_MODE)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be a torch.nn.Module. Found `{type(model).__name__}`.")
        if not isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
                getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            raise TypeError(f"`optimizer` should be a torch.optim.Optimizer. Found `{type(optimizer).__name__}`.")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}. Expected one of {NONFINITE}.")
        callbacks = check_callbacks(callbacks)
        terms = Terms(criterion, term_names)
        ddp, module = unwrap_model(model)
        check_initialized(module)
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.criterion = criterion
        self.nonfinite = nonfinite
        self._terms = terms
        self._group = ddp.process_group if ddp is not None else None
        self._world = dist.get_world_size(self._group) if ddp is not None and dist.is_initialized() else 1
        # under DDP, step() combines the ranks' label summaries: a refusal of one rank's labels is every rank's
        self._ranks = Reducer(self._group) if self._world > 1 else None
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._active = terms.active.to(self.device)
        self.num_active = int(terms.active.sum())
        if self.num_active == 0:
            raise ValueError(f"The criterion has no active term (criterion.active is all False for "
                             f"{terms.term_names}): there is nothing to weight.")
        self.num_calls = 0  # meta_step calls
        self.num_meta_steps = 0  # updates that were kept
        self.num_skipped = 0
        self.last_terms: Tensor | None = None
        self._pending: Tensor | None = None  # the last loss() call's terms: read where no backward counted a call
        self._pending_trains = False  # whether _pending is a training call's (one with a graph)
        self._unreached: tuple[int, Tensor | None] | None = None  # the last training call, until a backward reaches it
        self._kept_at: int | None = None  # the optimizer's step count when a meta_step after no step kept the calls
        # the optimizer's step count at the last meta step counted (kept or refused), or when built (a meta step before
        # any optimizer step has nothing to learn from); None where not known (loaded, copied)
        self._met_at: int | None = None
        self._lost_calls = ""  # LOADED_SINCE after a load_state_dict, said where meta_step misses the loss() calls
        self._groups: dict[int, _Calls] = {}  # the training loss() calls, by the optimizer's step count at each
        self._last_values: dict[str, Tensor] | None = None  # the last training call's, read where none was counted
        self._calls_made = 0  # training loss() calls so far: their order, for FAMO's check of the labels
        self._inner_optimizer = unwrap_optimizer(optimizer)
        check_optimizer_holds_model(self._inner_optimizer, module, type(self).__name__)
        self._kept_walk = ModelWalk(module)  # (the first call's check of replaced parameters compares with it)
        self._met_at = optimizer_steps(self._inner_optimizer)  # (the process-wide step counter, registered now)
        self._hooks: OrderedDict[int, Callable[[MetaStepRecord], None]] = OrderedDict()
        self.last_meta = MetaStepRecord(0)
        self._follows = 0
        self._buffers = BufferSnapshot(module)  # step()'s copy of the buffers, kept between steps
        self._callbacks_given = callbacks  # (registered once the whole constructor has returned: _built)

    def _setup(self) -> None:
        """Subclasses call this at the end of their ``__init__``, once their options are set: the weights."""
        self.gamma: Tensor = self._initial_gamma().to(self.device, torch.float32) * self._active

    # ------------------------------------------------------------------ what subclasses define
    def _initial_gamma(self) -> Tensor:
        """The weights of the first iteration, shape ``[num_terms]`` (inactive entries are zeroed)."""
        return torch.ones(self._terms.num_terms, dtype=torch.float32)

    def _state_tensors(self) -> dict[str, Tensor]:
        """The method's own state besides ``gamma`` (tensors saved by :meth:`state_dict`)."""
        return {}

    def _propose(self, terms: Tensor | None, train_batch: Batch | None) -> dict[str, Any]:
        """New values for ``gamma`` and the state tensors (and host-side ``int`` counters) after one model step;
        ``terms`` are the (rank-averaged) terms of the ``loss`` call before it. Must not change anything itself:
        the values are kept only when every one is finite."""
        return {}

    def _combine(self, terms: Tensor) -> Tensor:
        """The weighted loss the user backpropagates: :math:`\\sum_k \\gamma_k L_k` by default."""
        return (self._constant_weights() * terms).sum()

    def _constant_weights(self) -> Tensor:
        """``gamma`` as the constants of one :meth:`loss` call: a copy (one op), which autograd saves for that
        loss's backward, so that a :meth:`meta_step` before the backward (a loop that calls it first: it
        updates ``gamma`` in place, for the step before) leaves the loss's graph as it was."""
        return self.gamma.detach().clone()

    def _per_call(self, terms: Tensor) -> dict[str, Tensor]:
        """What one training :meth:`loss` call gives the update, averaged over the iteration's calls (gradient
        accumulation) by the labels they score: the detached terms, and what else a method reads (GradNorm: the
        terms' gradients on the shared parameters)."""
        return {"terms": terms}

    def _extra_state(self) -> dict[str, Any]:
        """Non-tensor state a method saves (e.g. a generator's state)."""
        return {}

    def _state_options(self) -> dict[str, Any]:
        """The options the method's state depends on (DWA's window, SDN's epochs, RLW's seed), saved with it and
        required equal on load; options of the rule alone (a learning rate, a temperature) may change. Always:
        which terms the criterion computes (``criterion.active``)."""
        return {"active": self._terms.active.tolist()}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        """Refuse extra state this method could not load (a ``ValueError``), changing nothing."""

    def _refuses(self, terms: Tensor) -> Tensor:
        """Whether the rule cannot update the weights from the iteration's ``terms`` (float32, averaged over the
        ranks, ``[num_terms]``), finite as they are: a bool tensor of one element on their device, no read. A
        method that overrides it has :meth:`step` with ``nonfinite="raise"`` refuse such a step before the model's
        step, changing nothing, where :meth:`meta_step` (the update's own check) comes after it. By default: never."""
        return torch.zeros((), dtype=torch.bool, device=terms.device)

    def _nonfinite_hint(self, terms: Mapping[str, float] | None) -> str:
        """What in the terms (by name) makes this method's loss or update non-finite, with the fix, for the
        refusal's message (a sentence and a space; empty where nothing is known)."""
        return ""

    # state tensors no run can make negative, with why (Adam's second moments: a mean of squares)
    _nonnegative: ClassVar[dict[str, str]] = {}
    _gamma_sum: ClassVar[str | None] = None  # what the weights sum to by the rule: "active" (K) or "one"

    def _gamma_of(self, state: Mapping[str, Any]) -> Tensor | None:
        """The weights the rule gives from the saved state (FAMO's softmax of the logits, UW's exp(-s)), where
        they follow from it."""
        return None

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse state tensors no run of this method can hold (already of the right shape, dtype and finite):
        negative second moments, weights not what the rule makes of the state, or not summing to what it
        keeps them at. A ``ValueError`` that names the value, changing nothing."""
        name = type(self).__name__
        for key, why in self._nonnegative.items():
            if (state[key] < 0).any():
                raise ValueError(f"The checkpoint's `{key}` {state[key].tolist()} holds negative values, which no "
                                 f"{name} run makes ({why}). Pass a {name}.state_dict() as saved. Nothing was changed.")
        gamma = state["gamma"].float()
        expected = self._gamma_of(state)
        if expected is not None and not torch.allclose(gamma, expected.float().cpu(), rtol=1e-5, atol=1e-6):
            raise ValueError(f"The checkpoint's gamma {gamma.tolist()} is not what {name}'s rule gives from its "
                             f"state ({expected.tolist()}): the checkpoint was edited or mixed from two. Pass a "
                             f"{name}.state_dict() as saved. Nothing was changed.")
        if self._gamma_sum is not None:
            total = float(self.num_active if self._gamma_sum == "active" else 1)
            if not math.isclose(float(gamma.double().sum()), total, rel_tol=1e-5, abs_tol=1e-6):
                raise ValueError(f"The checkpoint's gamma {gamma.tolist()} sums to {float(gamma.sum())}, but {name} "
                                 f"keeps its weights summing to {total:g}. Pass a {name}.state_dict() as saved. "
                                 f"Nothing was changed.")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Apply extra state already checked by :meth:`_check_extra_state`."""


    # ------------------------------------------------------------------ the two calls
    def loss(self, outputs: Any, target: Any) -> Tensor:
        """The weighted training loss for the user's own backward (the weights as constants).

        The first of the two calls of an iteration: the detached terms are kept for
        :meth:`meta_step`, which follows the optimizer's step.
        """
        terms = self._terms(outputs, target)
        if terms.dtype in (torch.float16, torch.bfloat16):  # weigh half-precision terms in float32
            terms = terms.float()
        combined = self._combine(terms)
        self._lost_calls = ""
        self.last_terms = terms.detach()
        if combined.requires_grad or not self._pending_trains:  # (a call without a graph, e.g. a validation loss
            # logged under no_grad, is read only where no training call came since the last meta_step)
            self._pending = self.last_terms  # (read where no backward went through a loss() call since the last step)
            self._pending_trains = combined.requires_grad
            self._last_values = None
        if combined.requires_grad:  # counted when a backward reaches it: not a loss for logging, nor one under no_grad
            values = self._last_values = self._per_call(self.last_terms)
            weight = _scored(target, getattr(self.criterion, "ignore_index", None))
            samples = batch_samples(target)
            self._calls_made += 1
            self._drop_cleared()
            labels = (self._calls_made, first_labels(target) if self.reads_train_batch else None)
            self._unreached = labels  # (until a backward reaches it: FAMO's refusal of a meta_step before it)
            self._made_at = optimizer_steps(self._inner_optimizer)  # (the step count it was made at)
            counted: list[bool] = []

            def count(grad: Tensor) -> None:
                if not counted:  # (once: a second backward through a retained graph is not another call)
                    counted.append(True)
                    if self._unreached is labels:
                        self._unreached = None
                    self._note_carried(labels[0])
                    self._accumulate(values, weight, samples, labels)

            combined.register_hook(count)
        return combined

    def _note_carried(self, call: int) -> None:
        """At the first backward through a training :meth:`loss` after a load of a checkpoint saved in the middle
        of an accumulated step (before it writes a gradient, after any ``zero_grad`` of the loop, in either
        order): where the gradients hold values, they are the checkpoint's calls' (restored ``.grad``), and the
        step to come carries calls whose terms the checkpoint does not hold; :meth:`meta_step` refuses it. One
        host read, at that backward only."""
        if self._resumed_calls:
            if gradients_moved(self._gradients()):
                self._resumed = (call, self._resumed_calls)
            self._resumed_calls = 0

    def _accumulate(self, values: dict[str, Tensor], weight: Tensor | int, samples: int,
                    labels: tuple[int, Tensor | None] = (0, None)) -> None:
        """When a backward reaches a training :meth:`loss` (before it writes any gradient): add the call's values
        to those of the calls since the optimizer's last step (gradient accumulation: several calls, one step,
        one :meth:`meta_step`), weighted by the labels it scores (those not ``criterion.ignore_index``; its
        samples where the criterion has none). Calls before an earlier step that no :meth:`meta_step` followed
        are dropped, and so are calls whose backward wrote gradients that the optimizer's ``zero_grad()`` cleared
        since (to ``None``, the default: an iteration whose step was skipped, e.g. on a non-finite loss, without
        a :meth:`meta_step`); several calls in one backward, or through ``torch.autograd.grad``, all count.
        The steps are counted by a process-wide optimizer step hook (:func:`optimizer_steps`): Python objects
        only."""
        steps = optimizer_steps(self._inner_optimizer)
        for old in [k for k in self._groups if k < steps - 1]:
            del self._groups[old]
        self._drop_cleared(at_backward=True)
        group = self._groups.setdefault(steps, _Calls())
        group.sums = {k: v * weight + group.sums[k] if k in group.sums else v * weight for k, v in values.items()}
        group.weight = group.weight + weight
        group.samples += samples
        group.calls += 1
        group.labels.append(labels)

        def ended() -> None:  # at the end of this backward: whether it wrote gradients (autograd.grad writes none),
            # and the gradients as it left them (twice deferred: after DistributedDataParallel's own end-of-backward
            # callback has written the averaged ones)
            after = GradSnapshot.refs_of(self._gradients())  # (Python objects only)
            group.wrote = group.wrote or any(g is not None for g, _ in after.refs)
            group.after = after

        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(ended))

    def _drop_cleared(self, at_backward: bool = False) -> None:
        """Drop the calls since the optimizer's last step whose gradients a ``zero_grad()`` cleared after their
        backward: to ``None``, or in place (``set_to_none=False``; an LBFGS closure's, which clears before each
        evaluation): :meth:`GradSnapshot.zeroed` since the gradients as the last backward left them (every
        gradient written since all zeros), or as the last :meth:`loss` found them (any gradient that held values
        then); a part of the gradients cleared (a part of the model frozen in the loop) is no ``zero_grad``, and the
        calls stay. Looked at in each training :meth:`loss` (before anything of its own backward is written) and again
        when its backward reaches it (a ``zero_grad`` between the forward and the backward, where autograd may
        have written, before, the gradients of parameters only other losses of the sum reach). Python objects at
        each backward's end; at a :meth:`loss` after another of the same step (gradient accumulation), a few ops
        over the gradients, and one host read only where something wrote them since."""
        steps = optimizer_steps(self._inner_optimizer)
        group = self._groups.get(steps)
        if group is None or not group.wrote or group.after is None:
            return
        grads = self._gradients()
        zeroed, partial = group.after.zeroing(grads)
        if zeroed and not partial:
            del self._groups[steps]  # the gradients those calls' backward wrote were cleared: no step came of them
        elif not at_backward or group.after.changed(grads):  # (what comes next is looked at from here)
            group.after = GradSnapshot.refs_of(grads, True)

    def _iteration(self) -> _Calls | None:
        """The training :meth:`loss` calls of the step just taken: those before the optimizer's last step (or,
        where it took none since them, e.g. a ``GradScaler`` skipped it, those since)."""
        steps = optimizer_steps(self._inner_optimizer)
        return self._groups.get(steps - 1) or self._groups.get(steps)

    def _accumulated(self, name: str) -> Tensor | None:
        """The iteration's mean of ``name`` (:meth:`_per_call`) over its training :meth:`loss` calls (with no
        backward through any, the last call's)."""
        group = self._iteration()
        if group is None:
            return self._last_values.get(name) if self._last_values is not None else None
        return group.mean(name)

    def _iteration_terms(self) -> Tensor | None:
        """The terms :meth:`meta_step` reads: the iteration's (:meth:`_accumulated`), or a ``no_grad`` call's."""
        terms = self._accumulated("terms")
        return terms if terms is not None else self._pending

    def _reset_pending(self) -> None:  # (the attributes of _ITERATION)
        self._pending, self._groups, self._last_values, self._kept_at = None, {}, None, None
        self._pending_trains = False
        self._resumed, self._resumed_calls, self._load_note = None, 0, ""

    def _pending_calls(self) -> int:
        """The training :meth:`loss` calls whose gradients wait for the optimizer's step (the checkpoint of an
        accumulated step under way), counting those before a load this step carries. Python objects only, but
        where a ``zero_grad(set_to_none=False)`` may have cleared them since (a few ops and a host read)."""
        steps = optimizer_steps(self._inner_optimizer)
        group = self._groups.get(steps)
        if group is None or not group.wrote:
            return self._resumed_calls  # (loaded from such a checkpoint, and saved again before a training call)
        if group.after is not None:
            zeroed, partial = group.after.zeroing(self._gradients())
            if zeroed and not partial:
                return 0
        carried = self._resumed[1] if self._resumed is not None and self._has_call(group, self._resumed[0]) else 0
        return group.calls + carried

    @staticmethod
    def _has_call(group: _Calls | None, number: int) -> bool:
        return group is not None and any(n == number for n, _ in group.labels)

    def _gradients(self) -> list[Tensor | None]:
        """The gradients of the parameters the optimizer holds, in its order (Python objects only)."""
        return [p.grad for group in self._inner_optimizer.param_groups for p in group["params"]]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and copied) without the iteration's pending ``loss()`` calls, which are keyed by the step
        count of this optimizer object: a copy starts a new iteration."""
        state = {**self.__dict__, "_groups": {}, "_pending": None, "_pending_trains": False, "_unreached": None,
                 "_last_values": None, "_resumed": None,
                 "_kept_at": None, "_met_at": None}
        if self._groups or self._pending is not None:  # (what its meta_step then says, as the weighter's)
            state["_lost_calls"] = COPIED_SINCE
        state.pop("_kept_walk", None)  # (the last step's walk of the model: a copy walks its own)
        return self._copy_state(state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """:meth:`NamedWeights.__setstate__`; a copy's meta step counts optimizer steps from now (a batch skipped
        before its next step is skipped, as the original's would be), on the optimizer it holds."""
        super().__setstate__(state)
        if "_inner_optimizer" in self.__dict__:
            self._met_at = optimizer_steps(self._inner_optimizer)

    @_made_outside_inference_mode
    @walked_call
    def meta_step(self, train_batch: Batch | None = None, val_batch: Batch | None = None) -> MetaStepRecord:
        """Update the weights from the iteration that just ended; call it after the optimizer's step.

        The method's rule reads the terms of this iteration's :meth:`loss` calls, those a backward went
        through (averaged over ranks under DDP; with gradient accumulation, their mean weighted by the
        labels they score: the whole batch's terms, for losses that are means over their labels); FAMO
        also reads ``train_batch`` again at the new parameters (the whole batch: the micro-batches
        concatenated).
        ``val_batch`` is accepted for the signature :class:`HarmonizedWeighter` shares and not used.

        After :meth:`loss` calls whose backward was followed by no optimizer step (a ``GradScaler`` found
        inf/NaN gradients and skipped it, or the loop did not step), no loss changed: nothing is learned, the
        weights and the method's state stay as they are, and the record says ``skipped`` (``ran`` false) with
        a message; the call counts in ``num_calls``, not ``num_skipped``, and no hook is called. The same
        where no optimizer step came since the last meta step (or since the weighting was built, loaded or
        copied) and no backward reached a :meth:`loss` call since: a batch the loop skipped (its terms not
        read: a non-finite loss not refused, a finite one warned of once, ``RuntimeWarning``; or one it
        returned early from, before its ``loss()`` call), or a second call. And where the last ``loss()``
        call, not finite, was reached by no backward and no step since took a gradient of it (the loop skipped
        its backward, and stepped or not), whatever came before it, unless the last step was taken on non-finite
        terms (refused as below). Where the
        gradients are finite (no ``GradScaler`` skipped the step: ``meta_step`` came before
        ``optimizer.step()``, or after a micro-batch not stepped on) the call also warns (``RuntimeWarning``)
        and keeps those calls' terms for the :meth:`meta_step` after the step that uses their gradients: with
        gradient accumulation and a ``meta_step`` after every micro-batch (Accelerate's ``accumulate()``), the
        update at the step reads the whole batch's terms, as one ``meta_step`` at the step would.

        Returns:
            A :class:`MetaStepRecord`: ``iteration``, ``ran``, ``meta_step``, ``gamma`` and
            ``terms`` by term name; ``skipped`` and ``message`` for a refused update.
        """
        self._check_parameters_held("meta_step")
        local = self._iteration_terms()
        steps = optimizer_steps(self._inner_optimizer)
        lost = self.needs_terms and local is None and bool(self._lost_calls)  # (copied or loaded since its loss())
        if self._met_at == steps and steps not in self._groups and not lost:
            # no optimizer step since the last meta step (or since built or loaded), and no backward reached this
            # iteration's loss() calls: the loop skipped this batch (a non-finite loss it checked; or, without a
            # loss() call, a batch it returned early from), or called meta_step twice
            Weighting._check_batch(self, train_batch)  # (its form: FAMO's batch is the step's, and none was taken)
            return self._no_step_since(local)
        if self._skipped_nonfinite(steps):  # the last loss() call, not finite, skipped by the loop
            Weighting._check_batch(self, train_batch)
            return self._no_step_since(self._pending, stepped=self._made_at != steps,
                                       after_step=self._made_at == steps and self._met_at != steps)
        if self.needs_terms and local is None:
            raise ValueError(f"{type(self).__name__}.meta_step reads the terms of this iteration: call "
                             f"loss = weighting.loss(model(x), y) first, then loss.backward(), optimizer.step() "
                             f"and weighting.meta_step((x, y)); or weighting.step((x, y)) for all of it. "
                             f"Nothing was changed.{self._lost_calls}")
        if self._kept_at == steps - 1 and steps in self._groups and self._wrote(self._groups[steps]):
            # calls kept by a meta_step before a step, and a backward after that step before this meta_step: the
            # loop calls meta_step before optimizer.step() every iteration, not once per accumulated step; the
            # kept calls are the last iteration's, and this iteration's step is still to come (skipped, warned)
            del self._groups[steps - 1]
            self._kept_at = None
        if self._step_not_taken():  # (FAMO's batch is the step's: the form of the pair is all there is to check)
            Weighting._check_batch(self, train_batch)
            return self._not_stepped(local)
        if self._resumed is not None and self._has_call(self._iteration(), self._resumed[0]):
            # refused, not skipped: resumed again from the same checkpoint with its step started over, the run is
            # the uninterrupted one; the next iteration's calls are another group, which this does not refuse
            raise ValueError(resumed_mid_step_message(type(self).__name__, self._resumed[1],
                                                      f"{type(self).__name__}'s weights and state are unchanged."))
        self._check_batch(train_batch)
        terms = self._mean_over_ranks(local) if local is not None else None  # (judged on every rank alike)
        proposal = self._propose(terms, train_batch)
        gamma = proposal.get("gamma", self.gamma)
        checked = torch.cat([gamma.detach().float().reshape(-1)] +
                            [v.detach().float().reshape(-1) for v in proposal.values()
                             if isinstance(v, Tensor) and v.is_floating_point()] +
                            ([terms.float()] if terms is not None else []))
        values = host_read([checked])  # the one host read of the call
        n = self._terms.num_terms
        named = dict(zip(self.term_names, values[-n:])) if terms is not None else None
        if named is not None:
            self._said_of_terms(named, dict(zip(self.term_names, values[:n])))
        # the terms count for every rule, those that do not read them too (RLW, SDN): the step they follow was
        # taken on a non-finite loss, which step() refuses for every method
        if not all(math.isfinite(v) for v in values):
            what = (f"the update from the terms {named} gave non-finite values" if self.needs_terms else
                    f"the terms {named} are not finite (its rule does not read them, but the model stepped on them)")
            skip = self.nonfinite == "skip"
            advice = "." if skip else " (or pass nonfinite='skip' to skip such updates)."
            message = (f"{type(self).__name__}: {what}; the weights and the method's state were left unchanged. "
                       f"{self._nonfinite_hint(named)}Check the data and the learning rates{advice}")
            if self._step_fields:  # (in step(), after the model's step, which a later check cannot take back)
                message += (f" The model's step of this step() call was taken (its loss and gradients were finite) and "
                            f"stays; only the weights' update was {'skipped' if skip else 'refused'}.")
            if self.nonfinite == "raise":
                raise ValueError(message)
            self.num_calls += 1
            self.num_skipped += 1
            self._reset_pending()
            self._met_at = steps
            warn_user(f"Skipped an update ({self.num_skipped} so far): {message}")
            return MetaStepRecord(self.num_calls, ran=True, skipped=True, meta_step=self.num_meta_steps,
                                  gamma=self.gamma_dict(), terms=named, message=message)
        # (what a hook that raises puts back: copies only where there are hooks)
        before = {name: self._state_of(name) for name in proposal} if self._hooks else {}
        iteration = {k: getattr(self, k) for k in _ITERATION} if self._hooks else {}
        previous, met_at, calls = self.last_meta, self._met_at, self.num_calls
        self.num_calls += 1
        with torch.no_grad():
            for name, value in proposal.items():
                self._set_state(name, value)
        self._reset_pending()
        self._met_at = steps
        self.num_meta_steps += 1
        record = MetaStepRecord(self.num_calls, ran=True, meta_step=self.num_meta_steps,
                                gamma=dict(zip(self.term_names, values[:n])), terms=named, **self._step_fields)
        self.last_meta = record

        def put_back() -> None:
            with torch.no_grad():
                for name, value in before.items():
                    self._set_state(name, value)
            self.num_meta_steps -= 1
            self.last_meta, self._met_at = previous, met_at
            if not self._step_fields:  # the two calls' meta_step: none was made (its iteration's calls kept)
                self.num_calls = calls
                for key, value in iteration.items():
                    setattr(self, key, value)

        name = type(self).__name__
        stood = (f"the model's step of this step() call stands and is counted (num_calls={self.num_calls}); {name}'s "
                 f"weights and state are as before the call. Do not call step() again on this batch (the model "
                 f"would step twice): go on with the next batch." if self._step_fields else
                 f"{name}'s weights and state are as before this meta_step, which counts for nothing.")
        self._report(record, put_back, stood)  # (within step(): the very record it returns, its loss too)
        return record

    def _step_not_taken(self) -> bool:
        """Whether this iteration's :meth:`loss` calls wrote gradients that no optimizer step followed (a
        ``GradScaler`` skipped it on inf/NaN gradients, or the loop did not step): Python objects only. (Calls
        through ``torch.autograd.grad`` write none: the step they lead to is not the optimizer's to see.)"""
        steps = optimizer_steps(self._inner_optimizer)
        group = self._groups.get(steps)
        return steps - 1 not in self._groups and group is not None and self._wrote(group)

    def _wrote(self, group: _Calls) -> bool:
        """Whether gradients were written for ``group``'s calls: by their backward, or by the loop after it (the
        gradients from ``torch.autograd.grad`` put into ``.grad`` by hand: another object or version than the
        backward's end left; then taken as written from here, a ``zero_grad`` after looked for). Python objects,
        and a few ops over the gradients where the loop wrote them."""
        if not group.wrote and group.after is not None:
            grads = self._gradients()
            if group.after.changed(grads) and any(g is not None for g in grads):
                group.wrote, group.after = True, GradSnapshot.refs_of(grads, True)
        return group.wrote

    def _not_stepped(self, local: Tensor | None, by_step: bool = False) -> MetaStepRecord:
        """The meta step after an optimizer that did not step: the terms did not change, so there is nothing to
        learn from (FAMO's loss change, UW's and GradNorm's Adam steps, DWA's averages, RLW's and SDN's per-step
        schedules): a skipped call, counted in ``num_calls`` (not ``num_skipped``, which counts refused
        non-finite values), the weights and the method's state unchanged. No hook is called (hooks see updates)."""
        with torch.no_grad():
            shown = self._mean_over_ranks(local) if local is not None else None  # (every rank the same, as ever)
        self.num_calls += 1
        moved = gradients_moved([p.grad for _, p in walk(self.module).parameters if p.requires_grad])
        if by_step:  # step() called optimizer.step() itself, which (or a wrapper of it) did not step: no wrong order
            message = (f"The optimizer (or a wrapper of it) did not take the step step() asked of it: no loss "
                       f"changed, so {type(self).__name__}'s weights and state are unchanged.")
            if moved:
                message += (" Its gradients are finite, so no GradScaler skipped it: a wrapper stepping once per "
                            "several calls (gradient accumulation, Accelerate's accumulate()) makes step() score "
                            "each micro-batch alone. Use the two calls there: loss = weighting.loss(model(x), y); "
                            "loss.backward(); optimizer.step(); weighting.meta_step((x, y)), whose update at the "
                            "step reads the whole batch's terms.")
                warn_user(message)
            self._reset_pending()
            return MetaStepRecord(self.num_calls, ran=False, skipped=True, meta_step=self.num_meta_steps,
                                  gamma=self.gamma_dict(), terms=self._named(shown), message=message)
        if moved:  # kept while the next backward adds to these gradients (gradient accumulation)
            self._kept_at = optimizer_steps(self._inner_optimizer)
        else:  # a GradScaler's skip: no step will use these calls' gradients
            self._reset_pending()
        message = not_stepped_message("weighting", f"no loss changed, so {type(self).__name__}'s weights and state are "
                                                   f"unchanged", moved,
                                      " The terms of this iteration's loss() calls are kept for the meta_step after "
                                      "the step that uses their gradients (with gradient accumulation, the step's "
                                      "calls together: the whole batch).")
        return MetaStepRecord(self.num_calls, ran=False, skipped=True, meta_step=self.num_meta_steps,
                              gamma=self.gamma_dict(), terms=self._named(shown), message=message)

    def _no_step_since(self, local: Tensor | None = None, stepped: bool = False,
                       after_step: bool = False) -> MetaStepRecord:
        """The meta step after no optimizer step since the last meta step (or since built) and no backward through
        a :meth:`loss` call since: a batch the loop skipped (``loss()`` called, its loss found non-finite and neither
        backpropagated nor stepped on: ``local`` its terms, not read), a ``GradScaler``'s skip in a loop that weighs
        the terms itself (RLW's and SDN's, which read no terms), a ``meta_step`` after each micro-batch without
        ``loss()``, a second call: nothing to learn from, as :meth:`_not_stepped`; warned where the gradients are
        finite and no ``loss()`` call says the batch was skipped. ``stepped``: the loop's step came after the skipped
        call, taking no gradient of it (a loop guarding the backward alone). Drops the skipped call alone: calls a
        backward reached before it (micro-batches of a step to come) stay for the meta step after that step.
        ``after_step``: the call came after an optimizer step since the last meta step (a loss logged with its
        graph after the step reads so too: said)."""
        self.num_calls += 1
        self._pending, self._pending_trains, self._last_values, self._unreached = None, False, None, None
        name = type(self).__name__
        where = " (on this rank or another)" if self._world > 1 else ""  # (the ranks decide a skip together)
        if stepped:  # (the loop's step came, on no gradient of the skipped call: its backward was skipped alone)
            message = (f"No backward went through the last weighting.loss call, not finite{where}, and the optimizer's "
                       f"step since took no gradient of it: taken for a batch the loop skipped, so the weights and the "
                       f"method's state are unchanged (its terms are not read).")
        elif after_step:  # (after a step: a batch skipped after steps without meta steps, or a loss logged so)
            message = (f"No backward went through the last weighting.loss call, not finite{where}, made after the "
                       f"optimizer's step: taken for a batch the loop skipped, so the weights and the method's state "
                       f"are unchanged (its terms are not read) and the step(s) since the last meta step are not "
                       f"learned from. If that call was a loss computed for logging, compute it under "
                       f"torch.no_grad() (or after meta_step): a logged loss with its graph reads as the loop's own.")
        elif local is not None:  # (loss() was called: its batch skipped by the loop, no backward, no step)
            message = (f"No backward went through this iteration's weighting.loss call(s), and no optimizer step came "
                       f"since {'the last ' + name + '.meta_step' if self.num_calls > 1 else name + ' was built'}: "
                       f"taken for a batch the loop skipped (a non-finite loss), so no loss changed and the weights "
                       f"and the method's state are unchanged (its terms are not read). A weighting learns once per "
                       f"optimizer step: call meta_step after optimizer.step().")
        if local is not None:
            if not self._said_skipped and all(math.isfinite(v) for v in host_read([local.detach().float()])):
                self._said_skipped = True  # (a finite loss skipped: said once, where a loop stepping another way
                warn_user(message + " (Said once.)")  # than optimizer.step() would never learn)
            return MetaStepRecord(self.num_calls, ran=False, skipped=True, meta_step=self.num_meta_steps,
                                  gamma=self.gamma_dict(), message=message)
        message = (f"No optimizer step came since the last {name}.meta_step, nor a weighting.loss "
                   f"call: no loss changed, so the weights and the method's state are unchanged. Call "
                   f"meta_step once per optimizer step, after optimizer.step() (step() calls it itself).")
        if self._lost_calls:  # (RLW's, SDN's: no terms to miss, but a step before the load is not seen)
            message = (f"No optimizer step and no weighting.loss call came since this {name} was loaded or copied: "
                       f"nothing to learn from, so the weights and the method's state are unchanged (a step taken "
                       f"before the load or the copy is not counted).{self._lost_calls}")
        if gradients_moved([p.grad for _, p in walk(self.module).parameters if p.requires_grad]):
            warn_user(message)
        return MetaStepRecord(self.num_calls, ran=False, skipped=True, meta_step=self.num_meta_steps,
                              gamma=self.gamma_dict(), message=message)

    def _said_of_terms(self, terms: dict[str, float], gamma: dict[str, float]) -> None:
        """What a method warns of in the terms of an update and its new weights, read on the host (by name);
        nothing here."""

    def _skipped_nonfinite(self, steps: int) -> bool:
        """Whether the last training :meth:`loss` call, reached by no backward, is not finite and was stepped on by
        no step: a batch the loop skipped (its backward, and its step or not), whatever steps came before it (a
        warm-up without meta steps, another task's batches). Not where a step since that call took the gradients
        of calls a backward reached (micro-batches of an accumulated step: that step is scored), nor where the last
        step was taken on non-finite terms (the model then is non-finite, and so is a loss logged after it: the
        step's terms are refused). A loss logged with its graph after the step, not finite, reads the same (and is
        said to be the likely cause; helper-182: telling it from a batch skipped after steps without meta steps
        made a 1-step warm-up behave otherwise than a longer one, helper-184). One host read, where such a call is
        pending only. Under DDP the ranks decide together, with one all-reduce and one read at every call: a batch
        skipped by the loop for one rank's non-finite loss (its backward skipped on every rank) is skipped on every
        rank (the others went on to the all-reduce of the terms and waited for it, or gloo aborted; helper-182)."""
        last = self._pending
        pending = last is not None and self._unreached is not None and self._pending_trains
        stepped = self._groups.get(steps - 1) if pending else None
        if pending and self._made_at != steps and (stepped is not None or steps in self._groups):
            pending = False
        if not pending and self._world == 1:
            return False
        if pending:
            assert last is not None
            before = stepped.mean("terms") if stepped is not None else None
            skipped = ~torch.isfinite(last.detach()).all()
            if before is not None:
                skipped = skipped & torch.isfinite(before.detach()).all()
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=self.device)
        if self._world > 1:
            flag = skipped.to(device=self.device, dtype=torch.float32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            skipped = flag[0] > 0
        return bool(host_read([skipped.float()])[0])

    def _named(self, terms: Tensor | None) -> dict[str, float] | None:
        return None if terms is None else dict(zip(self.term_names, terms.detach().cpu().tolist()))

    def _check_batch(self, train_batch: Batch | None) -> None:
        """Refuse a malformed ``train_batch`` before anything changes (FAMO needs one)."""
        if train_batch is not None and (not isinstance(train_batch, (tuple, list)) or len(train_batch) != 2):
            raise ValueError(f"`train_batch` should be a pair (inputs, labels). Found `{type(train_batch).__name__}`"
                             f"{f' of length {len(train_batch)}' if isinstance(train_batch, (tuple, list)) else ''}.")
        if train_batch is not None:
            refuse_arrays(train_batch, "`train_batch`")

    def _state_of(self, name: str) -> Any:
        """A copy of the state ``name`` as :meth:`_set_state` takes it back."""
        return copy_value(getattr(self, name))

    def _set_state(self, name: str, value: Tensor | int) -> None:
        current = getattr(self, name)
        if not isinstance(value, Tensor):  # a host-side counter (DWA's window bookkeeping)
            setattr(self, name, value)
        elif isinstance(current, Tensor) and current.shape == value.shape:
            current.copy_(value)
        else:
            setattr(self, name, value.detach().clone())

    def _mean_over_ranks(self, tensor: Tensor) -> Tensor:
        """``tensor`` averaged over the DDP ranks (one all-reduce; itself when alone)."""
        if self._world == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self._group)
        return out / self._world

    # ------------------------------------------------------------------ the one call
    @walked_call
    def step(self, train_batch: Batch, val_batch: Batch | None = None) -> MetaStepRecord:
        """One training iteration: forward, :meth:`loss`, backward, the optimizer's step, :meth:`meta_step`.

        A step whose loss or gradient is not finite, or whose forward made a buffer non-finite (BatchNorm
        statistics; a buffer non-finite by design, such as a mask of ``-inf``, is left alone, and one the forward
        registers or grows counts only where it is NaN: the loop guide's rule), on any rank,
        is not taken: the model's parameters, buffers and optimizer state and the weights are left as
        they were; with ``nonfinite="raise"`` a ``ValueError`` says so, with ``"skip"`` a warning does.
        The buffers are kept for that in flat storage on their device, and the decision, the loss and the
        terms come back to the host in one read (as :class:`HarmonizedWeighter`'s step transaction).

        Returns the :class:`MetaStepRecord` of :meth:`meta_step` with ``loss`` and
        ``model_step_skipped`` filled in (true also where the optimizer took no step when called: a wrapper
        whose own ``GradScaler`` skipped it; the meta step is then skipped too).
        """
        check_not_inference_mode(f"{type(self).__name__}.step")
        if not isinstance(train_batch, (tuple, list)) or len(train_batch) != 2:
            self._check_batch(train_batch if train_batch is not None else ())
        refuse_arrays(train_batch, "`train_batch`")
        self._check_step_optimizer()
        x, y = train_batch
        self._reset_pending()  # (loss() calls of the user's own before this step are not part of it)
        snapshot = self._buffers
        snapshot.save()
        drawn = rng_state(self.device, model_generators(self.module))  # a step not taken draws its masks again

        def put_back() -> None:  # what the forward and backward changed: the buffers, the generators, the calls
            snapshot.restore()
            set_rng_state(drawn, self.device)
            self._reset_pending()

        try:
            summarize_step_labels(train_batch, None, self.criterion, None, getattr(self, "_ranks", None))  # (see above)
            with torch.enable_grad():  # (called under torch.no_grad(), the step still needs its gradients)
                loss = self.loss(call_model(self.model, x), y)
                check_differentiable(loss, f"{NO_TRAINING_GRADIENT} Nothing was changed.")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        except BaseException:  # (an interruption too)
            put_back()
            raise
        finally:
            forget_labels()
        flag = nonfinite_flag(loss, [p.grad for _, p in walk(self.module).parameters])
        flag = (flag + snapshot.became_nonfinite(flag.device)).clamp_max(1.0)
        ruled = self.nonfinite == "raise" and type(self)._refuses is not Weighting._refuses
        if ruled:  # the rule's refusal of the update, decided before the model's step on the terms of every rank
            assert self.last_terms is not None
            pooled = self._mean_over_ranks(torch.cat([flag.view(1), self.last_terms.float().view(-1)]))
            flag, refused = pooled[0], self._refuses(pooled[1:]).to(pooled)
        else:
            flag, refused = self._mean_over_ranks(flag), None
        # the decisions and the record's numbers, one read
        values = host_read([flag, loss, self.last_terms] + ([refused] if refused is not None else []))
        value = values[1]
        ruled_out = values[0] == 0.0 and refused is not None and values[-1] != 0.0
        if values[0] != 0.0 or ruled_out:  # the step is not taken: put back what the forward and backward changed
            self.optimizer.zero_grad(set_to_none=True)
            put_back()
            terms = dict(zip(self.term_names, values[2:2 + len(self.term_names)]))
            if ruled_out:
                raise ValueError(f"{type(self).__name__} cannot update its weights from this step's terms {terms}: "
                                 f"{self._nonfinite_hint(terms)}The step was not taken: parameters, buffers, "
                                 f"optimizer state and weights are as before this call. (Pass nonfinite='skip' to "
                                 f"take the model's steps and skip such updates, with a warning.)")
            message = (f"The weighted training loss ({value}), its gradient or a buffer the forward updated "
                       f"(e.g. BatchNorm statistics) is not finite (terms {terms}). The step was not taken: "
                       f"parameters, buffers, optimizer state and weights are as before this call. "
                       f"{self._nonfinite_hint(terms)}Check the batch and the learning rate.{masked_label_hint(terms)}"
                       f"{half_precision_eps_hint(self._inner_optimizer)}")
            raise_or_skip_step(self, message)
            return MetaStepRecord(self.num_calls + 1, skipped=True, meta_step=self.num_meta_steps,  # (not counted)
                                  gamma=self.gamma_dict(), terms=terms, loss=value, model_step_skipped=True,
                                  message=message)
        try:
            self.optimizer.step()
        except Exception as exc:  # (refused before it changed a parameter, as torch's own checks are: restore the rest)
            self.optimizer.zero_grad(set_to_none=True)
            put_back()
            try:  # the likely cause, said plainly (looked for only here: a loop over the parameters)
                check_optimizer_state(self._inner_optimizer, after_failed_step=True)
            except ValueError as cause:
                raise cause from exc
            raise
        taken = not self._step_not_taken()  # (a wrapper's own GradScaler may skip it: then so is the meta step)
        if not taken:
            return dataclasses.replace(self._not_stepped(self._iteration_terms(), by_step=True), loss=value,
                                       model_step_skipped=True)
        fields = self._step_fields = {"loss": value, "model_step_skipped": False}  # (in the record the hooks get)
        try:
            record = self.meta_step(train_batch, val_batch)
        finally:
            self._step_fields = {}
        # (the very record the hooks got; a skipped update's, which no hook gets, with the step's fields added)
        return record if all(getattr(record, k) == v for k, v in fields.items()) else \
            dataclasses.replace(record, **fields)

    def _check_step_optimizer(self) -> None:
        """What :meth:`step` needs of the optimizer, refused before anything changes (Python objects only): a
        ``step()`` without a closure (``torch.optim.LBFGS`` needs one), every trainable parameter of the model
        held, none other (step() clears and steps the model's gradients with it; an optimizer over a sub-module
        would leave the rest untrained, their gradients growing), and the state of each group's first parameter
        holding some in its dtype and on its device (a model converted after the optimizer's first step)."""
        name = type(self).__name__
        inner = self._inner_optimizer
        closure = inspect.signature(type(inner).step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(f"{name}.step() calls optimizer.step() without a closure, but {type(inner).__name__} "
                             f"needs one (it evaluates the loss again). Use the two calls with your closure: "
                             f"def closure(): optimizer.zero_grad(); loss = weighting.loss(model(x), y); "
                             f"loss.backward(); return loss; then optimizer.step(closure); weighting.meta_step((x, y)) "
                             f"(it reads the closure's last evaluation). Nothing was changed.")
        named = walk(self.module).parameters
        two_calls = "loss = weighting.loss(model(x), y); loss.backward(); optimizer.step(); weighting.meta_step((x, y))"
        held = check_step_holds_trainable(inner, named, f"{name}.step()", two_calls)
        foreign = len(held - {id(p) for _, p in named})
        if foreign:
            raise ValueError(f"{name}.step() steps the model with its optimizer, but the optimizer holds {foreign} "
                             f"tensors that are not parameters of the model: build it over model.parameters(), or, "
                             f"to step other tensors on purpose, use the two calls: {two_calls}. Nothing was changed.")
        # a model converted after the optimizer's first step: torch's Adam counts the step, and steps the groups
        # of parameters it reaches first, before refusing the mix (the whole check runs where a step raises)
        check_optimizer_state(inner, first_only=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The method's own state: the weights, its counters and whatever its rule keeps; and where in an
        iteration it was saved: ``pending_calls``, the ``loss()`` calls of an accumulated step under way, and
        ``meta_step_due``, whether an optimizer step was taken on ``loss()`` calls whose meta step has not come (a
        checkpoint holds no ``loss()`` call, so a ``meta_step`` resumed from it refuses, saying so, where it is
        due, and skips a batch the loop skipped where it is not)."""
        return {
            "weighting": type(self).__name__,
            "term_names": list(self.term_names),
            "gamma": self.gamma.detach().cpu().clone(),
            **{name: t.detach().cpu().clone() for name, t in self._state_tensors().items()},
            "extra": self._extra_state(),
            "options": self._state_options(),
            "num_calls": self.num_calls,
            "num_meta_steps": self.num_meta_steps,
            "num_skipped": self.num_skipped,
            "pending_calls": self._pending_calls(),
            # (saved between an optimizer step and its meta_step: the checkpoint does not hold that step's calls)
            "meta_step_due": optimizer_steps(self._inner_optimizer) - 1 in self._groups,
        }

    @_made_outside_inference_mode
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first: a checkpoint of another method,
        for other terms, with a key missing or with non-finite values is refused with a
        ``ValueError`` (a ``TypeError`` for a non-mapping), changing nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"`state_dict` should be a dict from {type(self).__name__}.state_dict(). "
                            f"Found `{type(state_dict).__name__}`.")
        mine = self._state_tensors()
        if "weighting" not in state_dict and "gamma_optimizer" in state_dict and "validation" in state_dict:
            raise ValueError(f"This checkpoint is a HarmonizedWeighter's, not a {type(self).__name__}'s. Build the "
                             f"weighting the checkpoint was saved with. Nothing was changed.")
        if "weighting" in state_dict and state_dict["weighting"] != type(self).__name__:
            raise ValueError(f"This checkpoint is of the weighting {state_dict['weighting']!r}, not "
                             f"{type(self).__name__!r}. Build the weighting the checkpoint was saved with. Nothing "
                             f"was changed.")
        required = ["weighting", "term_names", "gamma", "extra", "num_calls", "num_meta_steps", "num_skipped",
                    *mine]
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"This checkpoint lacks {missing}: it is not a complete {type(self).__name__}."
                             f"state_dict() (keys found: {sorted(state_dict)}). Nothing was changed.")
        if not isinstance(state_dict["term_names"], (list, tuple)) or list(state_dict["term_names"]) != self.term_names:
            raise ValueError(f"This checkpoint is for the terms {state_dict['term_names']}, but this weighting has "
                             f"{self.term_names}. Build it with the criterion the checkpoint was saved with. Nothing "
                             f"was changed.")
        saved_options, options = state_dict.get("options", {}), self._state_options()  # (none in older checkpoints)
        if not isinstance(saved_options, Mapping):
            raise ValueError("The checkpoint's `options` should be a dict. Nothing was changed.")
        differ = {k: (saved_options[k], v) for k, v in options.items() if k in saved_options and saved_options[k] != v}
        if "active" in differ:
            saved = [n for n, a in zip(self.term_names, differ["active"][0]) if a]
            raise ValueError(f"This checkpoint was saved with a criterion computing the terms {saved}; this "
                             f"weighting's computes {[n for n, a in zip(self.term_names, options['active']) if a]} "
                             f"{_OTHER_CRITERION}")
        if differ:
            said = ", ".join(f"{k}={a!r} (this one: {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"This checkpoint was saved by a {type(self).__name__} with {said}: its state depends on "
                             f"them. Build the weighting with the options the checkpoint was saved with. Nothing was "
                             f"changed.")
        for name, current in {"gamma": self.gamma, **mine}.items():
            saved = state_dict[name]
            if not isinstance(saved, Tensor) or saved.shape != current.shape or saved.dtype != current.dtype:
                raise ValueError(f"The checkpoint's `{name}` should be a {current.dtype} tensor of shape "
                                 f"{tuple(current.shape)}. Found {saved!r}.")
            if saved.is_floating_point() and not torch.isfinite(saved).all():
                raise ValueError(f"The checkpoint's `{name}` {saved.tolist()} holds non-finite values.")
        if (state_dict["gamma"] < 0).any():
            raise ValueError(f"The checkpoint's gamma {state_dict['gamma'].tolist()} should be >= 0.")
        inactive = [n for n, g, a in zip(self.term_names, state_dict["gamma"].tolist(), self._terms.active.tolist())
                    if g != 0 and not a]
        if inactive:
            raise ValueError(f"The checkpoint weights the terms {inactive}, which this weighting's criterion does not "
                             f"compute {_OTHER_CRITERION}")
        counts, pending, due = checked_counters(state_dict, type(self).__name__)  # (all three required above)
        self._check_state(state_dict)  # (after the counters: SDN's weights follow from them)
        if not isinstance(state_dict["extra"], Mapping):
            raise ValueError("The checkpoint's `extra` should be a dict.")
        self._check_extra_state(state_dict["extra"])
        # everything checked: now apply
        with torch.no_grad():
            for name in ["gamma", *mine]:
                self._set_state(name, state_dict[name].to(self.device))
        self._load_extra_state(state_dict["extra"])
        self.num_calls, self.num_meta_steps, self.num_skipped = (counts["num_calls"], counts["num_meta_steps"],
                                                                 counts["num_skipped"])
        had = self._pending is not None or bool(self._groups)  # (loss() calls of this process the load drops)
        self._reset_pending()
        self._met_at = optimizer_steps(self._inner_optimizer)  # (its step count now: a skipped batch next is seen)
        # said where meta_step misses the loss() calls: those the load dropped, or those of a step the checkpoint was
        # saved after, before its meta_step (not known for an older checkpoint); one saved at an iteration's end,
        # into a weighting with no calls, has none to miss: a meta_step with none since is a batch the loop skipped
        self._lost_calls = LOADED_SINCE if had or due is not False else ""
        self._resumed_calls = pending or 0
        self._load_note = LOADED_DURING if pending != 0 else ""  # (an older checkpoint's: not known)
        self._follows, self._restored = self.num_calls, restored_at(self.num_calls)  # (the log's rows after it: undone)

    def _options(self) -> str:
        return ""

    def __repr__(self) -> str:
        options = self._options()
        return (f"{type(self).__name__}(terms={self.term_names}, criterion={type(self.criterion).__name__}"
                f"{', ' + options if options else ''}, optimizer={type(self.optimizer).__name__})")
