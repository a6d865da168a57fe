"""Replaying the user's optimizer: one place for its update, its Jacobian and its checks.

The look-ahead :math:`\\theta' = \\theta - U(g)` needs the step the user's optimizer *would* take,
without taking it. Two front ends use the same arithmetic:

* :func:`lookahead_update` — the step out of place from the optimizer's current state, and its
  diagonal Jacobian :math:`D = \\partial U / \\partial g` (the ``jvp`` and ``finite_difference``
  backends);
* :class:`DifferentiableAdam` / :class:`DifferentiableAdamW` — the same step inside `higher`'s
  differentiable optimizers (the ``higher`` backend; higher's own SGD matches torch's, its Adam
  puts ``eps`` elsewhere and it has no AdamW).

Adam's moments and denominator are written once, in :func:`_adam_moments`. Nothing here writes
to the user's optimizer or its state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import higher
import higher.optim
import torch
from torch import Tensor, nn

from metaweight._checks import real_scalar

EXACT_UPDATE_TYPES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def supports_exact_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`lookahead_update` knows this optimizer's step in closed form (SGD, Adam, AdamW and
    RMSprop, each with all its options; other optimizers: backend='higher' replays them)."""
    return type(optimizer) in EXACT_UPDATE_TYPES


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that hold it as ``.optimizer``, whatever their own step does: what
    the loss weightings count steps of (they replay no step). :class:`HarmonizedWeighter`, which replays it,
    unwraps with :func:`stepped_optimizer` instead."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if supports_exact_update(optimizer) or not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner
    return optimizer


# Optimizer wrappers whose step() is the step of the optimizer they hold as ``.optimizer`` and nothing more that
# moves the parameters: skipped or unscaled by a GradScaler, counted, run through a closure (Accelerate's
# AcceleratedOptimizer; Lightning's LightningOptimizer, in both packages' module paths; Fabric's _FabricOptimizer,
# likewise). Known by (module, qualname) anywhere in the class's MRO, without importing the packages: Lightning and
# Fabric make each wrapper an instance of a class built on the fly from theirs and the inner optimizer's.
DELEGATING_WRAPPERS: frozenset[tuple[str, str]] = frozenset({
    ("accelerate.optimizer", "AcceleratedOptimizer"),
    ("lightning.pytorch.core.optimizer", "LightningOptimizer"),
    ("pytorch_lightning.core.optimizer", "LightningOptimizer"),
    ("lightning.fabric.wrappers", "_FabricOptimizer"),
    ("lightning_fabric.wrappers", "_FabricOptimizer"),
})


def delegates_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of the :data:`DELEGATING_WRAPPERS` (or a subclass of one)."""
    return any((getattr(c, "__module__", None), getattr(c, "__qualname__", None)) in DELEGATING_WRAPPERS
               for c in type(optimizer).__mro__)


def _class_name(kind: type) -> str:
    """``kind``'s name in backticks, with its module where it is not torch's."""
    module = getattr(kind, "__module__", "") or ""
    return f"`{kind.__qualname__}`" if module.startswith("torch.") else f"`{kind.__qualname__}` (from {module})"


def stepped_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer whose step ``optimizer.step()`` takes: ``optimizer`` itself, or the one inside the
    :data:`DELEGATING_WRAPPERS` around it (through up to 8 of them). Any other wrapper holding a torch optimizer as
    ``.optimizer`` is refused with a ``TypeError``: its own step may do more than the inner one (Lookahead's
    interpolation toward slow weights, the master weights of DeepSpeed's ZeRO or apex's FP16_Optimizer), and a
    look-ahead replaying the inner step would give the meta-gradient of another step. Reads only."""
    current, found = optimizer, optimizer
    for _ in range(8):
        inner = getattr(current, "optimizer", None)
        if type(current) in REPLAYED_OPTIONS or inner is None or inner is current:
            break
        if delegates_step(current):
            current = inner
            if isinstance(current, torch.optim.Optimizer):
                found = current
            continue
        if isinstance(inner, torch.optim.Optimizer):
            wrapper, held = _class_name(type(current)), _class_name(type(inner))
            raise TypeError(
                f"`optimizer` is (or wraps) a {wrapper}, which holds a {held} as .optimizer. The look-ahead "
                f"replays the step of the optimizer inside, but a wrapper's own step may do more than call it "
                f"(Lookahead's interpolation toward slow weights, the master weights of DeepSpeed's ZeRO or apex's "
                f"FP16_Optimizer): the meta-gradient would be that of another step. HarmonizedWeighter unwraps only "
                f"wrappers whose step is the inner optimizer's: Accelerate's AcceleratedOptimizer, Lightning's "
                f"LightningOptimizer and Fabric's _FabricOptimizer. Pass the `{type(inner).__qualname__}` itself if "
                f"`{type(current).__qualname__}.step()` only calls its step, or use a loss weighting that replays no "
                f"step (metaweight.UW, metaweight.DWA, metaweight.GradNorm, metaweight.FAMO, ...), which take any "
                f"wrapper. Nothing was changed.")
        break
    return found


# The options of each optimizer's constructor that its replay reads: the closed form of
# :func:`lookahead_update` for SGD, Adam and AdamW (and the same arithmetic in `higher`:
# DifferentiableSGD, DifferentiableAdam/AdamW below), higher's own differentiable optimizers for the
# others (Adagrad's initial_accumulator_value lives in the state the replay copies). Options that
# choose an implementation, not the arithmetic, are known too. ``maximize`` is known and replayed by
# none: refused when set. Any other option of the constructor (one a later PyTorch adds) is refused,
# never ignored; keys a constructor does not take (a scheduler's "initial_lr", a user's "name") are
# not options and are left alone.
IMPLEMENTATION_OPTIONS = frozenset({"foreach", "capturable", "differentiable", "fused"})
REPLAYED_OPTIONS: dict[type, frozenset[str]] = {
    torch.optim.SGD: frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov"}),
    torch.optim.Adam: frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay"}),
    torch.optim.Adadelta: frozenset({"lr", "rho", "eps", "weight_decay"}),
    torch.optim.Adagrad: frozenset({"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"}),
    torch.optim.Adamax: frozenset({"lr", "betas", "eps", "weight_decay"}),
    torch.optim.ASGD: frozenset({"lr", "lambd", "alpha", "t0", "weight_decay"}),
    torch.optim.RMSprop: frozenset({"lr", "alpha", "eps", "weight_decay", "momentum", "centered"}),
    torch.optim.Rprop: frozenset({"lr", "etas", "step_sizes"}),
}
REPLAYED_OPTIONS[torch.optim.AdamW] = REPLAYED_OPTIONS[torch.optim.Adam]


def decoupled_weight_decay(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether the group's weight decay is decoupled (AdamW's rule), read from the group's own options:
    ``torch.optim.Adam(..., decoupled_weight_decay=True)`` steps exactly as AdamW does."""
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


@dataclass(frozen=True)
class OptionRange:
    """The values a real-number option may take: a finite number from ``low`` to ``high`` (an open end
    excluded; ``high`` may be ``inf``), and what a value outside does to the replayed step (``why``)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is finite and in the range (NaN is in none)."""
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def problem(self, value: float) -> str:
        """What is wrong with a ``value`` :meth:`accepts` refuses, in a few words."""
        if not math.isfinite(value):
            return "not finite"
        if value < self.low or (self.low_open and value == self.low):
            return f"{'not above' if self.low_open else 'below'} {self.low:g}"
        return f"{'not below' if self.high_open else 'above'} {self.high:g}"

    def __str__(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


_AT_LEAST_0 = OptionRange(0.0)
_ASCENT = "its step would ascend the loss it should descend (as maximize=True would)"
# The one table of the values each optimizer option may take, for the user's optimizer the look-ahead replays
# and for gamma's own: the ranges of torch.optim's constructors, where torch checks them, and finite always
# (torch's ``lr < 0`` lets NaN through, and an option set after construction, by hand or by a scheduler, is never
# checked by torch). A key ``"RMSprop.alpha"`` is that class's own option where the name means something else
# elsewhere. A tuple option (``betas``) has one range per entry. Option names not here are not range-checked.
OPTION_RANGES: dict[str, OptionRange | tuple[OptionRange, ...]] = {
    "lr": OptionRange(0.0, why=_ASCENT),
    "momentum": _AT_LEAST_0,
    "dampening": OptionRange(0.0, 1.0),
    "weight_decay": _AT_LEAST_0,
    "eps": OptionRange(0.0, low_open=True, why="a second moment of 0 would divide by 0"),
    "betas": (OptionRange(0.0, 1.0, high_open=True), OptionRange(0.0, 1.0, high_open=True)),
    "alpha": OptionRange(0.0, 1.0, why="its running average of squared gradients could turn negative"),
    "ASGD.alpha": _AT_LEAST_0,
    "rho": OptionRange(0.0, 1.0),
    "lr_decay": _AT_LEAST_0,
    "initial_accumulator_value": _AT_LEAST_0,
    "lambd": _AT_LEAST_0,
    "t0": _AT_LEAST_0,
    "etas": (OptionRange(0.0, 1.0, low_open=True, high_open=True), OptionRange(1.0, low_open=True)),
    "step_sizes": (_AT_LEAST_0, _AT_LEAST_0),
}


def check_option_values(kind: type, groups: Sequence[Mapping[str, Any]], who: str = "The optimizer") -> None:
    """Refuse, naming it, an option value outside :data:`OPTION_RANGES` in any of ``groups`` (the
    ``param_groups`` of an optimizer of class ``kind``, or those of a state dict about to be loaded): a NaN,
    an infinity, a negative learning rate, ``betas`` outside [0, 1), ``eps <= 0``, ... The one check of option
    values, for the user's optimizer and gamma's, at construction and before every meta step (a scheduler
    may set a learning rate between steps). A tensor value on a device is not read back to the host (nor
    checked); one on the CPU is. The table's ranges are those of torch's optimizers (:data:`REPLAYED_OPTIONS`'
    classes and their subclasses, for the options those classes have); another class's options may mean
    something else under the same name (Adafactor's ``eps`` is a pair, Adan has three ``betas``): there only
    ``lr``'s range is checked, and other real-number options of the table's shape only for being finite. Reads only: raises before
    anything changes."""
    own = next((options for t, options in REPLAYED_OPTIONS.items() if issubclass(kind, t)), frozenset())
    for i, group in enumerate(groups):
        for name, value in group.items():
            known = name in own
            allowed = OPTION_RANGES.get(f"{kind.__name__}.{name}", OPTION_RANGES.get(name))
            if allowed is None or value is None or isinstance(value, bool):
                continue
            entries = (value,) if isinstance(allowed, OptionRange) else value
            ranges = (allowed,) if isinstance(allowed, OptionRange) else allowed
            if not known:
                if not isinstance(entries, (tuple, list)) or len(entries) != len(ranges) or any(
                        real_scalar(e.reshape(()) if isinstance(e, Tensor) and e.numel() == 1 else e) is None
                        for e in entries if not (isinstance(e, Tensor) and e.device.type != "cpu")):
                    continue  # (not the shape or kind of value the name has in torch's optimizers)
                if name != "lr":
                    ranges = tuple(OptionRange(-math.inf) for _ in ranges)  # finite only
            if not isinstance(entries, (tuple, list)) or len(entries) != len(ranges):
                raise ValueError(f"{who} has {name}={value!r} (parameter group {i}): expected {len(ranges)} numbers, "
                                 f"{', '.join(map(str, ranges))}. Nothing was changed.")
            for j, (entry, allowed_one) in enumerate(zip(entries, ranges)):
                if isinstance(entry, Tensor) and entry.device.type != "cpu":
                    continue  # (not read back to the host: a capturable or fused step's tensor lr)
                if isinstance(entry, Tensor) and entry.numel() == 1:
                    entry = entry.reshape(())  # (torch takes a 1-element tensor lr of any shape)
                number = real_scalar(entry)
                label = name if len(ranges) == 1 else f"{name}[{j}]"
                if number is None:
                    raise ValueError(f"{who} has {label}={entry!r} (parameter group {i}), which is not a real number: "
                                     f"expected {allowed_one}. Nothing was changed.")
                if not allowed_one.accepts(number):
                    why = " With it, every step would be NaN or inf." if not math.isfinite(number) else \
                        f" With it, {allowed_one.why}." if allowed_one.why else ""
                    raise ValueError(
                        f"{who} has {label}={number!r}, {allowed_one.problem(number)} (parameter group {i}): expected "
                        f"{allowed_one}.{why} Set param_groups[{i}][{name!r}] in range (a learning-rate scheduler "
                        f"that set it?). Nothing was changed.")


def check_optimizer_options(optimizer: torch.optim.Optimizer, *, state: bool = True) -> None:
    """Reject optimizer options the look-ahead would silently get wrong: read the optimizer's options
    and every parameter group's values (at construction and again before every meta step, for every
    backend and mode, so options set later are seen) and refuse, naming it, any option the replay of
    this optimizer class does not replay (:data:`REPLAYED_OPTIONS`), ``maximize=True`` and any value
    outside :data:`OPTION_RANGES` (:func:`check_option_values`). An
    optimizer class with no replay is refused at construction (:func:`metaweight._backends.optimizer_refusal`).
    With ``state``, :func:`check_optimizer_state` too (a Python loop over the parameters: about 0.3 ms for
    the 418 of the CIFAR MSDNet)."""
    replayed = next((v for t, v in REPLAYED_OPTIONS.items() if type(optimizer) is t), None)
    if replayed is not None:
        known = replayed | IMPLEMENTATION_OPTIONS | {"maximize"}
        unknown = sorted(set(optimizer.defaults) - known)
        if unknown:
            raise ValueError(
                f"`{type(optimizer).__name__}` has the option(s) {unknown}, which the look-ahead does not know how to "
                f"replay (a newer PyTorch?). For `{type(optimizer).__name__}` it replays {sorted(replayed)} (and "
                f"ignores the implementation choices {sorted(IMPLEMENTATION_OPTIONS)}). Remove the option, or pass "
                f"learn=False to keep the loss weights fixed. Nothing was changed.")
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(
                f"Parameter group {i} of the optimizer has maximize=True; the look-ahead assumes the "
                f"optimizer minimizes the training loss. Use maximize=False. Nothing was changed."
            )
        if isinstance(optimizer, torch.optim.SGD) and group.get("dampening", 0) and group.get("nesterov", False):
            raise ValueError("Nesterov momentum requires dampening=0, as in torch.optim.SGD.")
    check_option_values(type(optimizer), optimizer.param_groups)
    if state:
        check_optimizer_state(optimizer)


_SCALAR_STATE = frozenset({"step", "eta", "mu", "mu_product"})  # torch's 0-d state in its scalar dtype, by design


# State that is a running sum or average of squares (Adam's second moments, RMSprop's square_avg, Adagrad's sum,
# Adadelta's, Adamax's infinity norm): never negative; a negative entry makes the step's square root NaN.
NONNEGATIVE_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf"})


def check_saved_state(state: Mapping[Any, Any], shape: Sequence[int], who: str = "The checkpoint's optimizer") -> None:
    """Refuse the per-parameter ``state`` of an optimizer state dict (``state_dict()["state"]``, about to be
    loaded for parameters of ``shape``) that no optimizer could have reached: a step count that is not a whole
    number >= 0 (a 0-d tensor or a Python number), a non-finite value, a per-entry state that is not a
    floating-point tensor of ``shape``, or a negative entry of state that is a sum or average of squares
    (:data:`NONNEGATIVE_STATE`). torch's ``load_state_dict`` takes all of these and the next step is NaN,
    complex or a division by zero. Reads only: raises before anything is loaded."""
    for key, entries in state.items():
        if not isinstance(entries, Mapping):
            raise ValueError(f"{who}'s state of parameter {key!r} should be a dict of its state (exp_avg, step, "
                             f"...). Found `{type(entries).__name__}`. Nothing was changed.")
        for name, value in entries.items():
            where = f"{who}'s state {name!r} (parameter {key!r})"
            if name == "step":
                count = real_scalar(value)
                if count is None or not math.isfinite(count) or count < 0 or count != int(count):
                    shown = value.tolist() if isinstance(value, Tensor) else value
                    raise ValueError(f"{where} is {shown!r}: a step count is a whole number >= 0 (a 0-d tensor or "
                                     f"a Python number), counting the steps taken. Load a checkpoint that "
                                     f"HarmonizedWeighter.state_dict() wrote. Nothing was changed.")
                continue
            if value is None or not isinstance(value, Tensor):  # (SGD's momentum_buffer=None; non-tensor options)
                continue
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{where} holds non-finite values: the optimizer's next step would be NaN. Load "
                                 f"a checkpoint saved before the values went non-finite. Nothing was changed.")
            if name in _SCALAR_STATE:
                continue
            if not value.is_floating_point() or tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where} is a {value.dtype} tensor of shape {tuple(value.shape)}, but the parameter "
                                 f"is a float tensor of shape {tuple(shape)}: it is not the state of this parameter. "
                                 f"Nothing was changed.")
            if name in NONNEGATIVE_STATE and (value < 0).any():
                raise ValueError(f"{where} has negative entries ({float(value.min())!r} the least): it is a sum or "
                                 f"average of squares, never negative, and the step's square root of it would be "
                                 f"NaN. Load a checkpoint that HarmonizedWeighter.state_dict() wrote. Nothing was "
                                 f"changed.")


def check_optimizer_state(optimizer: torch.optim.Optimizer, *, first_only: bool = False,
                          after_failed_step: bool = False) -> None:
    """Refuse optimizer state (momentum buffers, Adam's moments) in another dtype or on another device than
    its parameter: what ``model.to(torch.bfloat16)`` or ``model.to("cuda")`` after the optimizer's first
    step leaves (torch casts state to its parameter only in ``Optimizer.load_state_dict``). The look-ahead
    would replay a step whose arithmetic mixes them, which torch's own step does otherwise or refuses
    (Adam's ``lerp_``). State with dimensions only: 0-d state (step counts, ASGD's ``eta``, NAdam's
    ``mu_product``) is kept in torch's scalar dtype by design. Metadata only: no tensor is read. With
    ``first_only``, the first parameter holding state in each group alone: what a whole model's conversion
    shows, at a cost that does not grow with the parameters. With ``after_failed_step``, the cause of an
    ``optimizer.step()`` that raised: the message says the parameters torch reached first may have stepped."""
    outcome = ("torch's optimizer raised part way through its step: the parameters it reached before this one may "
               "have been stepped and their step counts raised (the weighter's own state and the buffers are "
               "restored). Reload the model and optimizer from your last checkpoint if that matters."
               if after_failed_step else "Nothing was changed.")
    for i, group in enumerate(optimizer.param_groups):
        held = (p for p in group["params"] if p in optimizer.state)
        for p in itertools.islice(held, 1) if first_only else held:
            for key, value in optimizer.state[p].items():
                # (0-d state, a step count or ASGD's eta and NAdam's mu_product, is kept in torch's scalar dtype and
                # may live on the CPU by design: it enters the arithmetic as a scalar; a 0-d parameter's moments not)
                per_entry = value.dim() > 0 or (p.dim() == 0 and key not in _SCALAR_STATE) \
                    if isinstance(value, Tensor) else False
                if per_entry and value.is_floating_point() \
                        and (value.dtype != p.dtype or value.device != p.device):
                    raise ValueError(
                        f"The optimizer's state {key!r} of a parameter of shape {tuple(p.shape)} (group {i}) is "
                        f"{value.dtype} on {value.device}, but the parameter is {p.dtype} on {p.device}: the model "
                        f"was converted (e.g. model.to(torch.bfloat16) or model.to('cuda')) after the optimizer had "
                        f"stepped, and the state was not. The step (and the look-ahead, which replays it) would mix "
                        f"the two, or fail (torch's Adam refuses to). Convert the state with the "
                        f"parameters: optimizer.load_state_dict(optimizer.state_dict()) casts each state tensor to "
                        f"its parameter's dtype and device (or build the optimizer after converting the model). "
                        f"{outcome}")


def check_optimizer_covers_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """The optimizer must update parameters of the model: one that holds none of them (the optimizer of another
    model, or of the inner model where the weighter was given a wrapper of another) is refused. A tensor it holds
    that is no parameter of the model (a criterion's learned scale, in a group of its own) is left alone, as it is
    when added after construction (:func:`check_parameters_replaced`)."""
    model_params = {id(p) for p in model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if held and model_params and not any(id(p) in model_params for p in held):
        p = held[0]
        raise ValueError(
            f"The optimizer holds none of the model's parameters (its first tensor, of shape {tuple(p.shape)}, is "
            f"not a parameter of the model). Give HarmonizedWeighter the model whose parameters the optimizer "
            f"updates (for DistributedDataParallel, the wrapped model).")


# mode="fast" scores the step just taken by recomputing the training terms around it: a tensor outside the model
# that the same step moves (a criterion's parameter) changes them, and the meta-gradient (2e8 times the exact one,
# relative, on a scaled DenseDistillLoss) would be that of no step
FAST_OUTSIDE_MODEL = (
    "The optimizer steps {count} trainable tensor(s) that are no parameters of the model (shapes {shapes}; a "
    "criterion's learned scale, say). mode='fast' scores the step just taken by computing the training terms again "
    "around it, and those tensors, stepped with the model, change the terms: its meta-gradient would be that of no "
    "step. Use mode='exact' (its look-ahead holds them as they are), or step them with an optimizer of their own. "
    "(The tensors of a module replaced in the model but left in the optimizer are refused too where they hold a "
    "gradient, e.g. the last one before the replacement where only model.zero_grad() clears: drop them from the "
    "optimizer, or clear with optimizer.zero_grad().) Nothing was changed.")


def check_parameters_replaced(optimizer: torch.optim.Optimizer, before: Iterable[tuple[str, Tensor]],
                              now: Mapping[str, Tensor], call: str) -> None:
    """Refuse (a ``ValueError``, before anything changes) an optimizer holding a tensor that was a parameter of the
    model ``before`` (``(name, parameter)`` at the weighter's last call) and is not ``now`` (every name the model
    holds a parameter under now, a tied weight's each, to the parameter), where the optimizer does not hold the
    parameter now under that name either: the parameter was replaced since (``load_state_dict(..., assign=True)``,
    a module swapped for a new one), and the optimizer would step the old tensor while the model stays as it is.
    An old tensor left beside its successor (a head swapped and added with ``optimizer.add_param_group``, a weight
    tied to one the optimizer holds) steps nothing of the model and is left alone, as is a tensor the optimizer
    holds that never was the model's (a criterion's learned scale in a group of its own). ``call`` names the method
    checking (``"HarmonizedWeighter.step"``)."""
    current = {id(p) for p in now.values()}
    gone = {id(p): name for name, p in before if id(p) not in current}  # (``before`` holds them: ids no one else's)
    if not gone:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            name = gone.get(id(p))
            if name is None:
                continue
            successor = now.get(name)
            if successor is not None and id(successor) in held:
                continue
            holds = "another now" if successor is not None else "no parameter under that name now"
            raise ValueError(
                f"{call}: the optimizer (parameter group {i}) holds the tensor that was the "
                f"model's parameter `{name}` (shape {tuple(p.shape)}) at the last call, and the model holds "
                f"{holds}: it was replaced since (load_state_dict(..., assign=True), a module swapped for a "
                f"new one), so the optimizer would step the old tensor and leave the model as it is. Build the "
                f"optimizer anew over model.parameters() (new.load_state_dict(old.state_dict()) keeps its state, "
                f"parameter by parameter in order), add the new parameters with optimizer.add_param_group(...), or "
                f"load weights with assign=False, which copies them into the parameters the optimizer holds. "
                f"Nothing was changed.")


# ----------------------------------------------------------------------------------------- Adam, once
def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose gradient is 0, not inf, where ``x == 0`` (entries with no gradient yet)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _adam_moments(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], decoupled: bool,
                  ) -> dict[str, Any]:
    """One Adam/AdamW/AMSGrad step from ``state``, out of place and differentiable, as torch.optim computes it.

    Returns the new parameter (``new``), the new moments (``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with AMSGrad), ``step``, and what the Jacobian needs: ``d`` (the gradient
    after coupled weight decay), ``second`` (the second moment used), ``flows`` (where it depends
    on this step's gradient), ``denom``, ``sbc2`` (the square root of the second bias correction) and
    ``lr_bc1`` (the learning rate over the first).
    """
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    counted = state.get("step", 0)  # (lookahead_update passes the count read once for many parameters)
    step = counted if isinstance(counted, _DeviceCounts) else int(counted) + 1
    base, d = p, g
    if wd:
        if decoupled:
            base = p * (1 - lr * wd)
        else:
            d = g + wd * p
    m0, v0 = state.get("exp_avg"), state.get("exp_avg_sq")
    m = d * (1 - beta1) if m0 is None else m0 * beta1 + d * (1 - beta1)
    v = d * d * (1 - beta2) if v0 is None else v0 * beta2 + d * d * (1 - beta2)
    second, flows, vmax = v, v > 0, None
    if group.get("amsgrad", False):
        vmax0 = state.get("max_exp_avg_sq")
        if vmax0 is not None:
            second = torch.maximum(vmax0, v)
            flows = flows & (v > vmax0)
        vmax = second
    if isinstance(step, _DeviceCounts):  # the bias corrections of each parameter's own count, on the device
        sbc2, lr_bc1 = step.corrections(beta1, beta2, lr, p.dtype)
    else:
        bc1, sbc2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
        lr_bc1 = lr / bc1
    denom = _safe_sqrt(second) / sbc2 + eps
    return {"new": base - lr_bc1 * m / denom, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax,
            "step": step, "d": d, "second": second, "flows": flows, "denom": denom, "sbc2": sbc2,
            "lr_bc1": lr_bc1, "beta2": beta2}


def _rmsprop_step(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, Tensor]:
    r"""One ``torch.optim.RMSprop`` step (weight decay, momentum, ``centered``) from ``state``, out of place,
    and its diagonal Jacobian. With :math:`d = g + \lambda\theta`, :math:`v = \alpha v_0 + (1-\alpha) d^2`,
    centered :math:`m = \alpha m_0 + (1-\alpha) d` (else :math:`m = 0`), :math:`r = \sqrt{v - m^2}`,
    :math:`a = r + \epsilon` and the momentum buffer :math:`b = \mu b_0 + d / a` (:math:`v_0, m_0, b_0 = 0`
    before the first step), the step is :math:`U = lr\, b` (:math:`lr\, d / a` without momentum) and
    :math:`\partial U/\partial g = lr\,(1/a - d\,\partial r/\partial d\,/ a^2)` with
    :math:`\partial r/\partial d = (1-\alpha)(d - m) / r` (0 where :math:`r = 0`): the momentum term
    :math:`\mu b_0` does not depend on :math:`g`. Source: ``torch.optim.RMSprop``'s single-tensor step."""
    lr, alpha, eps, wd = float(group["lr"]), float(group["alpha"]), float(group["eps"]), float(group["weight_decay"])
    momentum = _momentum(group)
    d = g + wd * p if wd else g
    v0 = state.get("square_avg")
    v = d * d * (1 - alpha) if v0 is None else v0 * alpha + d * d * (1 - alpha)
    if group.get("centered", False):
        m0 = state.get("grad_avg")
        m = torch.lerp(torch.zeros_like(d) if m0 is None else m0, d, 1 - alpha)
        spread = torch.addcmul(v, m, m, value=-1)
    else:
        m, spread = None, v
    root = _safe_sqrt(spread)
    avg = root + eps
    flows = spread > 0
    slope = (1 - alpha) * (d if m is None else d - m)
    droot = torch.where(flows, slope / torch.where(flows, root, torch.ones_like(root)), torch.zeros_like(root))
    jacobian = lr * (1 / avg - d * droot / (avg * avg))
    if momentum:
        b0 = state.get("momentum_buffer")
        buf = d / avg if b0 is None else b0 * momentum + d / avg
        return p - lr * buf, jacobian
    return p - lr * d / avg, jacobian


def _momentum(group: dict[str, Any]) -> float:
    """RMSprop's ``momentum`` as a float: one given as a one-element tensor is read like a number (read back
    from its device, as torch's own RMSprop step reads it to decide whether momentum is on)."""
    momentum = group.get("momentum", 0)
    return float(momentum.reshape(()).item()) if isinstance(momentum, Tensor) else float(momentum)


def _sgd_jacobian(has_buffer: bool, group: dict[str, Any]) -> float:
    """SGD's constant dU/dg (as :func:`_sgd_step` computes it), from whether a momentum buffer exists."""
    mu, damp, nesterov = float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"])
    c = 1.0
    if mu:
        c_buf = 1 - damp if has_buffer else 1.0
        c = 1 + mu * c_buf if nesterov else c_buf
    return float(group["lr"]) * c


def _sgd_step(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, float]:
    """One SGD step (momentum, dampening, Nesterov, weight decay) and its constant dU/dg."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    mu, damp, nesterov = float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"])
    d = g + wd * p if wd else g
    c = 1.0
    if mu:
        buf0 = state.get("momentum_buffer")
        buf, c_buf = (d, 1.0) if buf0 is None else (buf0 * mu + d * (1 - damp), 1 - damp)
        d, c = (d + mu * buf, 1 + mu * c_buf) if nesterov else (buf, c_buf)
    return p - lr * d, lr * c


class _DeviceCounts:
    """The Adam step counts of one bucket of parameters flattened together, as tensors on their device (a
    fused or capturable Adam keeps them there): the bias corrections of the step about to be taken, for each
    parameter from its own count, spread over its entries, with no read back to the host.

    The host computes each correction from the count read back (``1 - beta ** t`` with Python floats); here
    it is computed in float64 for all the bucket's counts at once: the same to the last bit or two of
    float64 (a vectorised ``pow`` may round its last bit otherwise), then stored in the parameters' dtype,
    as the host's number is when it multiplies or divides them."""

    def __init__(self, counts: Sequence[Tensor], sizes: Sequence[int]) -> None:
        self.counts, self.sizes = list(counts), tuple(sizes)

    def corrections(self, beta1: float, beta2: float, lr: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(sqrt(1 - beta2**t), lr / (1 - beta1**t))`` with ``t`` each count plus one (computed in float64),
        one entry per entry of the flat bucket in ``dtype`` (a 0-d tensor for a bucket of one parameter, which
        is not flattened)."""
        t = torch.stack(self.counts).to(torch.float64).reshape(-1) + 1
        bc1 = 1 - torch.pow(beta1, t)
        sbc2 = torch.sqrt(1 - torch.pow(beta2, t)).to(dtype)
        lr_bc1 = (lr / bc1).to(dtype)
        if len(self.sizes) == 1:
            return sbc2[0], lr_bc1[0]
        sizes, total = _sizes(self.sizes, bc1.device), sum(self.sizes)
        return torch.repeat_interleave(sbc2, sizes, output_size=total), \
            torch.repeat_interleave(lr_bc1, sizes, output_size=total)


_SIZES: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _sizes(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """``sizes`` as a tensor on ``device``, made once (a copy from the host, which a CUDA graph could not
    capture: made at the first device step, before any capture)."""
    key = (sizes, device)
    if key not in _SIZES:
        if len(_SIZES) > 64:  # (models come and go: keep a few)
            _SIZES.clear()
        _SIZES[key] = torch.tensor(sizes, dtype=torch.long, device=device)
    return _SIZES[key]


def _on_device_counts(group: dict[str, Any]) -> bool:
    """Whether this group's Adam keeps its step counts on the parameters' device (fused or capturable)."""
    return bool(group.get("fused") or group.get("capturable"))


@torch.no_grad()
def lookahead_update(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None], *,
    jacobian_only: bool = False, device_counts: bool = False, keep_unreached: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor | float]]:
    """One step of ``optimizer`` from ``params`` with ``grads``, out of place, and its diagonal Jacobian.

    Returns ``(new_params, D)`` with ``new_params[i] = params[i] - U(grads)[i]`` exactly as
    ``optimizer.step()`` would compute it from its current state, and ``D[i] = dU_i/dg_i``
    (a tensor, or a float where it is constant). Parameters the optimizer does not hold, or
    without a gradient, stay where they are with ``D = 0``. Nothing is written anywhere.
    With ``jacobian_only`` the new parameters are not computed (``new_params`` is then the
    parameters themselves), which for SGD costs no tensor arithmetic at all. With ``device_counts``
    the step counts of a fused or capturable Adam/AdamW (tensors on the parameters' device) are not
    read back to the host: each parameter's bias corrections are computed from its own count there
    (the same numbers on the CPU; ``capturable=True``'s step, which a CUDA graph may capture).

    With ``keep_unreached`` (a 0-d bool tensor on the device), Adam's ``D`` is 0 where the gradient is
    exactly 0 unless it is ``True``, for the finite differences along :math:`D \\odot v`
    (:func:`drop_unreached`). No host read.
    """
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    new: list[Tensor] = []
    jac: list[Tensor | float] = []
    check_optimizer_options(optimizer, state=False)  # options may have been set since construction (the state: by
    # the weighter's loop check before every meta step)
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    rmsprop = type(optimizer) is torch.optim.RMSprop
    new: list[Tensor | None] = [None] * len(params)
    jac: list[Tensor | float] = [0.0] * len(params)
    # Parameters that step alike (one group, device, dtype, the same state keys and step count) are
    # updated as one flat vector: a handful of kernels per bucket instead of a handful per parameter.
    buckets: dict[tuple[Any, ...], list[int]] = {}
    on_device = {i for i, p in enumerate(params) if adam and device_counts and id(p) in where
                 and _on_device_counts(where[id(p)])}
    steps: dict[int, Any] = _adam_steps(optimizer, params, grads, where, skip=on_device) if adam else {}
    steps.update({i: "device" for i in on_device})  # (one bucket for all: each parameter's count is its own)
    for i, (p, g) in enumerate(zip(params, grads)):
        group = where.get(id(p))
        if group is None or g is None:
            new[i] = p.detach()
            continue
        state = optimizer.state.get(p, {})  # keyed by the parameter itself: look up before detaching
        keys = tuple(sorted(k for k, v in state.items() if isinstance(v, Tensor) and k != "step"))
        sparse = i if g.layout != torch.strided else None  # a sparse gradient steps on its own, unflattened
        buckets.setdefault((id(group), p.device, p.dtype, g.dtype, keys, steps.get(i), sparse), []).append(i)
    for (_, _, _, _, keys, step, _), idx in buckets.items():
        group = where[id(params[idx[0]])]
        if jacobian_only and not adam and not rmsprop:
            c = _sgd_jacobian("momentum_buffer" in keys, group)
            for i in idx:
                new[i], jac[i] = params[i], c
            continue
        states = [optimizer.state.get(params[i], {}) for i in idx]
        p = _flat([params[i] for i in idx])  # (no_grad: the arithmetic records no graph)
        g = _flat([grads[i] for i in idx])  # type: ignore[misc]
        state = {k: _flat([s[k] for s in states]) for k in states[0] if isinstance(states[0][k], Tensor)
                 and k != "step"}
        if adam:
            counts = [s.get("step") for s in states]
            state["step"] = step if step != "device" else _DeviceCounts(
                [c if isinstance(c, Tensor) else torch.zeros((), device=p.device) for c in counts],
                [params[i].numel() for i in idx])
            a = _adam_moments(p, g, state, group, decoupled_weight_decay(optimizer, group))
            sq = a["second"].sqrt()
            flows = a["flows"]
            # d U / d g = lr/bc1 * ((1-beta1)/denom - m * d(denom)/dg / denom^2), d(sqrt v)/dg = (1-beta2) d / sqrt v
            dsq = torch.where(flows, (1 - a["beta2"]) * a["d"] / torch.where(flows, sq, torch.ones_like(sq)),
                              torch.zeros_like(sq))
            beta1 = float(group["betas"][0])
            d = a["lr_bc1"] * ((1 - beta1) / a["denom"] - a["exp_avg"] * (dsq / a["sbc2"]) / (a["denom"] * a["denom"]))
            if keep_unreached is not None and g.layout == torch.strided:
                d = drop_unreached(d, g, keep_unreached)
            for i, n, j in zip(idx, _unflat(a["new"], [params[i] for i in idx]),
                               _unflat(d, [params[i] for i in idx])):
                new[i], jac[i] = n, j
        elif rmsprop:
            p_new, d = _rmsprop_step(p, g, state, group)
            if keep_unreached is not None and g.layout == torch.strided:
                d = drop_unreached(d, g, keep_unreached)
            for i, n, j in zip(idx, _unflat(p_new, [params[i] for i in idx]), _unflat(d, [params[i] for i in idx])):
                new[i], jac[i] = n, j
        else:
            p_new, c = _sgd_step(p, g, state, group)
            for i, n in zip(idx, _unflat(p_new, [params[i] for i in idx])):
                new[i], jac[i] = n, c
    return new, jac  # type: ignore[return-value]


def drop_unreached(d: Tensor, g: Tensor, keep: Tensor) -> Tensor:
    r"""Adam's :math:`D` with 0 where the training gradient :math:`g` is exactly 0, unless ``keep`` (a 0-d bool
    tensor) is ``True``: for the finite differences of the terms along :math:`w = D \\odot v` (``mode="fast"``,
    ``backend="finite_difference"``).

    Where Adam's second moment is 0 (a weight that never had a gradient: a dead ReLU unit's, a feature or a
    token absent from the training batches, or tiny gradients at the first step), :math:`D = lr/\epsilon`,
    some :math:`10^5` times its value elsewhere, and :math:`w` points almost only along weights that no
    training term depends on. The difference's step, sized by :math:`\lVert w \rVert`, then moves the
    weights that matter by less than rounding: the meta-gradient came out 0 or far off. The directional
    derivative :math:`\sum_j \partial L_k/\partial\theta_j\, w_j` does not read those entries when every
    :math:`\partial L_k/\partial\theta_j` is 0, which :math:`g_j = \sum_k \gamma_k \partial L_k/\partial
    \theta_j = 0` says when every active :math:`\gamma_k` is non-zero (a term of weight 0 leaves its
    gradient out of :math:`g`: then ``keep``). So dropping them changes the derivative only by rounding
    (entries that cancel to exactly 0 across terms aside), and the step length is set by the rest. No host
    read."""
    return torch.where((g != 0) | keep, d, torch.zeros((), dtype=d.dtype, device=d.device))


def unweighted_term(gamma: Tensor, active: Tensor) -> Tensor:
    """Whether a term the criterion computes has weight 0 (a 0-d bool tensor, no host read): its gradient is
    then missing from the step's, which cannot tell which weights the terms do not reach
    (:func:`drop_unreached`)."""
    return ((gamma == 0) & active).any()


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """One vector of the tensors' entries (a single tensor, sparse ones included, as it is); 1-D tensors
    go into the ``cat`` as they are (a ``reshape`` is one more op per tensor)."""
    if len(tensors) == 1:
        return tensors[0]
    return torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped as ``like``: one ``as_strided`` each (``split`` and ``view`` are two)."""
    if len(like) == 1:
        return [flat]
    if flat.dim() != 1 or flat.stride(0) != 1:
        return [v.view(t.shape) for v, t in zip(torch.split(flat, [t.numel() for t in like]), like)]
    views, offset = [], flat.storage_offset()
    for t in like:
        views.append(flat.as_strided(t.shape, _contiguous_strides(t.shape), offset))
        offset += t.numel()
    return views


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _adam_steps(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None],
                where: dict[int, Any], skip: set[int] = frozenset()) -> dict[int, int]:  # type: ignore[assignment]
    """Each stepping parameter's Adam step count (0 before its first step), read in one transfer (but
    those in ``skip``)."""
    counted = [(i, optimizer.state.get(p, {}).get("step")) for i, (p, g) in enumerate(zip(params, grads))
               if id(p) in where and g is not None and i not in skip]
    tensors = [(i, s) for i, s in counted if isinstance(s, Tensor)]
    steps = {i: int(s) for i, s in counted if s is not None and not isinstance(s, Tensor)}
    steps.update({i: 0 for i, s in counted if s is None})
    if tensors:
        try:  # step counts live on one device (the CPU unless capturable): one stack, one transfer
            values = torch.stack([s.detach().reshape(()) for _, s in tensors]).tolist()
        except RuntimeError:
            values = [float(s) for _, s in tensors]
        steps.update({i: int(v) for (i, _), v in zip(tensors, values)})
    return steps


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """``torch.optim.Adam`` (and AdamW with ``decoupled=True``) as a differentiable step for `higher`."""

    decoupled = False

    def _update(self, grouped_grads, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                a = _adam_moments(p, g, state, group, bool(group.get("decoupled_weight_decay", self.decoupled)))
                state.update(step=a["step"], exp_avg=a["exp_avg"], exp_avg_sq=a["exp_avg_sq"])
                if a["max_exp_avg_sq"] is not None:
                    state["max_exp_avg_sq"] = a["max_exp_avg_sq"]
                group["params"][p_idx] = a["new"]


class DifferentiableAdamW(DifferentiableAdam):
    """``torch.optim.AdamW`` as a differentiable step (decoupled weight decay)."""

    decoupled = True


_OURS: dict[type, type] = {
    torch.optim.SGD: higher.optim.DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
}


# Optimizers whose step depends on the gradient only through its sign: the step is piecewise constant in the
# gradient, so its derivative with respect to the loss weights is zero wherever it exists, and a look-ahead
# through it gives gamma a meta-gradient of exactly zero (gamma would never leave its initial value).
SIGN_ONLY: frozenset[type] = frozenset({torch.optim.Rprop})


def sign_only_refusal(kind: type) -> str:
    """Why the look-ahead cannot learn through ``kind``, one of :data:`SIGN_ONLY`.

    Rprop steps each parameter by its own step size times the sign of its gradient: a small change
    of the loss weights leaves the step as it is, so the meta-gradient of any look-ahead through it is
    zero (Franceschi et al. 2017's hypergradient through the step's Jacobian; the sign's derivative is
    zero). Refused where the weighter is asked to learn, before anything runs
    (:func:`metaweight._backends.optimizer_refusal`).
    """
    return (f"`{kind.__name__}` steps each parameter by a step size times the sign of its gradient: a small change "
            f"of the loss weights gamma does not change that step, so the look-ahead's meta-gradient is zero and "
            f"gamma would never leave its initial values.")


def replayable_types() -> tuple[type, ...]:
    """The optimizer classes whose step the ``higher`` backend replays (:func:`differentiable_optimizer_type`):
    ours (SGD, Adam, AdamW) and those `higher` implements, :data:`SIGN_ONLY` included."""
    return tuple(_OURS) + tuple(t for t in higher.optim._opt_mapping if t not in _OURS)


def differentiable_optimizer_type(optimizer: torch.optim.Optimizer) -> type:
    """The differentiable optimizer class that replays ``optimizer``'s step, or a TypeError. (The weighter
    refuses an optimizer it cannot replay at construction: :func:`metaweight._backends.optimizer_refusal`.)"""
    for torch_type, diff_type in _OURS.items():
        if type(optimizer) is torch_type:
            return diff_type
    higher_types = higher.optim._opt_mapping  # Adagrad, RMSprop, ... as higher implements them
    if type(optimizer) in higher_types:
        return higher_types[type(optimizer)]
    supported = sorted(t.__name__ for t in replayable_types() if t not in SIGN_ONLY)
    raise TypeError(
        f"The look-ahead cannot replay a `{type(optimizer).__name__}` step. It replays these optimizer classes "
        f"only: {', '.join(supported)}. Use one of them, or pass learn=False to keep the loss weights fixed."
    )
