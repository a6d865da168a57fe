"""gamma, the loss weights :class:`~metaweight.HarmonizedWeighter` learns, and its optimizer: the
initial weights (``init=``), the optimizer built for them (``gamma_optimizer=``), and the check of a
checkpoint's gamma-optimizer state before it is loaded."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor

from metaweight._capturable import gamma_optimizer as capturable_gamma_optimizer
from metaweight._checks import check_has_values, in_dtype, per_term, real_numbers
from metaweight._on_outputs import unwrapped
from metaweight._losses import DenseDistillLoss
from metaweight._optimizers import IMPLEMENTATION_OPTIONS, check_option_values, check_saved_state

GammaInit = Union[Literal["uniform", "last", "random"], Tensor, Sequence[float], Mapping[str, float]]
INITS = ("uniform", "last", "random")
GAMMA_OPTIMIZERS = ("sgd", "adam")
GAMMA_OPTIMIZER = "gamma's optimizer (weighter.gamma_optimizer)"
FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")  # device types with torch's fused Adam kernel
# an optimizer's hyper-parameters name its kind: SGD's momentum/nesterov, Adam's betas/eps
_TELLING = {"momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered", "lr_decay", "rho",
            "etas", "step_sizes"}


def adam(gamma: Tensor, lr: float) -> torch.optim.Optimizer:
    """torch's Adam for ``gamma``, fused where its device has the kernel (torch checks that only at the first
    step, so the device is asked here): one kernel for gamma's step, its step count kept on the device (on
    CUDA the unfused one reads it back to the host at every step)."""
    return torch.optim.Adam([gamma], lr=lr, fused=gamma.device.type in FUSED_ADAM_DEVICES or None)


def initial_gamma(init: GammaInit, generator: torch.Generator | None, term_names: list[str], active: Tensor,
                  criterion: Any) -> Tensor:
    """The initial weights, float32 of shape ``(len(term_names),)`` on the CPU, zero where ``active`` (bool, one
    per term) is False: ``"uniform"`` (1 per active term), ``"last"`` (DBT-like: the last exit's terms; needs a
    :class:`~metaweight.DenseDistillLoss` ``criterion``), ``"random"`` (uniform in [0, 1), drawn by
    ``generator``), or one weight per term (a sequence, 1-d array or tensor, or a dict from term name).

    Raises:
        TypeError: ``generator`` is not a CPU generator, or ``init`` is no set of real numbers.
        ValueError: a name not in :data:`INITS`, another number of weights than terms, a weight that is
            negative or not finite, or one that is not zero for an inactive term.
    """
    active = active.cpu()
    n = len(term_names)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError(f"`generator` should be None or a CPU torch.Generator (init='random' draws on the CPU), "
                        f"e.g. torch.Generator().manual_seed(0). Found {generator!r}.")
    if isinstance(init, str):
        if init == "uniform":
            gamma = active.float()
        elif init == "last":
            criterion = unwrapped(criterion)  # (an OnOutputs of one)
            if not isinstance(criterion, DenseDistillLoss):
                raise ValueError("init='last' (DBT-like) needs a DenseDistillLoss criterion; give a tensor of "
                                 "initial weights instead.")
            K = criterion.num_exits
            gamma = torch.zeros(n, dtype=torch.float32)
            gamma[:K] = 1.0
            for idx, (i, _) in enumerate(criterion.pairs):
                if i == K - 1:
                    gamma[K + idx] = 1.0
            gamma = gamma * active
        elif init == "random":
            gamma = torch.rand(n, generator=generator, dtype=torch.float32) * active
        else:
            raise ValueError(f"Invalid init: {init!r}. Expected one of {INITS} or a tensor of {n} weights.")
        return gamma
    check_has_values(init, "`init`", "setting the initial weights")
    values = real_numbers(per_term(init, term_names, "init"))
    if values is None:
        raise TypeError(f"Invalid init: {init!r}. Expected one of {INITS}, or {n} real numbers >= 0, one weight "
                        f"per term {term_names} (a list, a 1-d NumPy array, a 1-d tensor, or a dict "
                        f"from term name to weight such as gamma_dict()).")
    if len(values) != n:
        raise ValueError(
            f"`init` should hold one weight per term, shape ({n},) for terms {term_names}. "
            f"Found {len(values)} weights."
        )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"`init` weights should be finite and >= 0. Found {values}.")
    gamma = in_dtype(values, torch.float32, "init")
    inactive = [name for name, a, g in zip(term_names, active, gamma) if not a and g != 0]
    if inactive:
        raise ValueError(
            f"`init` gives non-zero weight to terms the criterion does not compute (inactive): {inactive}. "
            f"Set them to 0 (or, for a DenseDistillLoss, use teachers='dense')."
        )
    return gamma


def check_gamma_optimizer_choice(choice: Any) -> None:
    """Refuse a ``gamma_optimizer=`` that is neither a name of :data:`GAMMA_OPTIMIZERS`, None, nor a callable."""
    if not (choice is None or callable(choice) or choice in GAMMA_OPTIMIZERS):
        raise ValueError(f"Invalid gamma_optimizer: {choice!r}. Expected one of {GAMMA_OPTIMIZERS} or "
                         f"a callable taking [gamma] and returning a torch.optim.Optimizer.")


def build_gamma_optimizer(choice: str | Callable[[list[Tensor]], torch.optim.Optimizer] | None, gamma: Tensor,
                          lr: float, capturable: bool) -> torch.optim.Optimizer:
    """gamma's optimizer: ``"adam"`` (the default, also for None; fused where the device has the kernel),
    ``"sgd"``, or what a callable returns for ``[gamma]``; with ``capturable=True`` a named one is built for
    graph capture (:mod:`metaweight._capturable`). Its options are checked as the model optimizer's are.

    Raises:
        TypeError: the callable returned no ``torch.optim.Optimizer``.
        ValueError: an option value the optimizer cannot step with (a negative learning rate, ...).
    """
    if choice is None:
        choice = "adam"
    if isinstance(choice, str) and capturable:
        optimizer = capturable_gamma_optimizer(choice, gamma, lr)
    elif isinstance(choice, str):
        optimizer = torch.optim.SGD([gamma], lr=lr) if choice == "sgd" else adam(gamma, lr)
    else:
        optimizer = choice([gamma])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "`gamma_optimizer` should return a torch.optim.Optimizer for [gamma]. "
                f"It returned `{type(optimizer).__name__}`."
            )
    check_option_values(type(optimizer), optimizer.param_groups, GAMMA_OPTIMIZER)
    return optimizer


def own_implementation(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a gamma-optimizer state dict with ``optimizer``'s implementation options (fused, capturable,
    foreach, differentiable) in place of the saved ones: torch's ``load_state_dict`` takes a parameter group's
    options from the state it loads, and a checkpoint of an eager weighter would un-fuse the gamma optimizer of a
    ``capturable=True`` one (or of one built on another device)."""
    out = copy.deepcopy(dict(saved))
    built = optimizer.param_groups[0]
    for group in out.get("param_groups", []):
        if isinstance(group, dict):
            group.update({k: built[k] for k in IMPLEMENTATION_OPTIONS if k in built})
    return out


def check_gamma_optimizer_state(optimizer: torch.optim.Optimizer, gamma: Tensor, state_dict: Mapping[str, Any]
                                ) -> None:
    """Refuse, with a ``ValueError`` and before anything is loaded, a checkpoint's gamma-optimizer state
    (``state_dict["gamma_optimizer"]``, its kind in ``state_dict["gamma_optimizer_type"]``) that ``optimizer``,
    gamma's, could not use: another kind of optimizer, another structure, option values it cannot step with,
    or a state of another shape than ``gamma``'s; a load into a copy decides the rest."""
    saved = state_dict["gamma_optimizer"]
    mine = type(optimizer).__name__
    kind = state_dict.get("gamma_optimizer_type")
    if kind is not None and kind != mine:
        raise ValueError(f"This checkpoint's gamma optimizer is {kind}, but this weighter's is {mine}. Build the "
                         f"weighter with the gamma_optimizer the checkpoint was saved with.")
    if not (isinstance(saved, Mapping) and isinstance(saved.get("param_groups"), list)
            and isinstance(saved.get("state"), Mapping) and len(saved["param_groups"]) == 1
            and isinstance(saved["param_groups"][0], Mapping)):
        raise ValueError("The checkpoint's `gamma_optimizer` is not the state_dict of an optimizer of gamma.")
    current = optimizer.state_dict()["param_groups"][0]
    if {k for k in saved["param_groups"][0] if k in _TELLING} != {k for k in current if k in _TELLING}:
        raise ValueError(f"This checkpoint's gamma optimizer has the settings {sorted(saved['param_groups'][0])}, "
                         f"which are not those of this weighter's {mine}. Build the weighter with the "
                         f"gamma_optimizer the checkpoint was saved with.")
    check_option_values(type(optimizer), saved["param_groups"], "The checkpoint's gamma optimizer")
    check_saved_state(saved["state"], gamma.shape, "The checkpoint's gamma optimizer")  # (before the load)
    scratch = copy.deepcopy(optimizer)
    try:
        scratch.load_state_dict(own_implementation(optimizer, saved))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"The checkpoint's gamma optimizer state does not load into {mine}: {exc}") from None
