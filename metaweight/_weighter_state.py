"""The checks of a checkpoint of :class:`~metaweight.HarmonizedWeighter` (its ``state_dict()``) before
:meth:`~metaweight.HarmonizedWeighter.load_state_dict` changes anything: the terms and teachers it was
saved for, whether it learned gamma, gamma itself, gamma's optimizer, the validation average, the counters
and the accumulated step it was saved in."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaweight._checks import checked_counters, real_scalar
from metaweight._gamma import check_gamma_optimizer_state

if TYPE_CHECKING:
    from metaweight._weighter import HarmonizedWeighter


@dataclasses.dataclass(frozen=True)
class CheckedState:
    """What a checked checkpoint sets beside gamma's optimizer and the validation average (each loaded by its own
    ``load_state_dict``): gamma (float, on the CPU), the counters, the sum gamma is kept at, and the ``loss()``
    calls of the accumulated step it was saved in (None for an older checkpoint, which did not record them)."""

    gamma: Tensor
    num_meta_steps: int
    num_calls: int
    num_skipped: int
    gamma_sum: float
    pending_calls: int | None
    meta_step_due: bool | None  # saved between an optimizer step and its meta step (None: an older checkpoint)


def checked_state(w: HarmonizedWeighter, state_dict: Any) -> CheckedState:
    """``state_dict`` checked whole against the weighter ``w``, which it leaves unchanged.

    Raises:
        TypeError: ``state_dict`` is not a dict.
        ValueError: the checkpoint does not fit ``w`` (see :meth:`HarmonizedWeighter.load_state_dict`).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` should be a dict from HarmonizedWeighter.state_dict(). "
                        f"Found `{type(state_dict).__name__}`.")
    if "weighting" in state_dict:  # (a loss weighting's state_dict names its method)
        raise ValueError(f"This checkpoint is a {state_dict['weighting']}'s (a loss weighting), not a "
                         f"HarmonizedWeighter's. Build the weighting the checkpoint was saved with "
                         f"(metaweight.WEIGHTINGS). Nothing was changed.")
    required = ("term_names", "teachers", "gamma", "gamma_optimizer", "validation", "num_meta_steps", "gamma_sum")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"This checkpoint lacks {missing}: it is not a complete HarmonizedWeighter.state_dict() "
                         f"(keys found: {sorted(state_dict)}). Nothing was changed.")
    names = state_dict["term_names"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"The checkpoint's term_names should be a list of names. Found `{type(names).__name__}`.")
    if list(names) != w.term_names:
        def exits(terms: Sequence[str]) -> str:  # (a criterion of other terms than exits': no count of exits)
            count = _count_exits(terms)
            return f" ({count} exits)" if count else ""

        raise ValueError(
            f"This checkpoint is for the terms {names}{exits(names)}, but this weighter has "
            f"{w.term_names}{exits(w.term_names)}. Build the weighter with the criterion the checkpoint was saved "
            f"with. Nothing was changed."
        )
    teachers = getattr(w.criterion, "teachers", None)
    if not (state_dict["teachers"] is None or isinstance(state_dict["teachers"], str)) or \
            state_dict["teachers"] != teachers:
        raise ValueError(
            f"This checkpoint was saved with teachers={state_dict['teachers']!r}, but this criterion has "
            f"teachers={teachers!r}."
        )
    if "learn" in state_dict:  # (checkpoints saved before it was recorded: loaded as before)
        saved_learn = state_dict["learn"]
        if not isinstance(saved_learn, bool):
            raise ValueError(f"The checkpoint's learn should be a bool (whether its weighter learned gamma). "
                             f"Found {saved_learn!r}. Pass a HarmonizedWeighter.state_dict() as saved. Nothing "
                             f"was changed.")
        if saved_learn != w._built_to_learn:
            kinds = {True: "learned gamma (a weighter built with learn=True, e.g. preset 'hdkd')",
                     False: "fixed gamma (a weighter built with learn=False, e.g. preset 'naive_dkd')"}
            this = "it learns gamma" if w._built_to_learn else "its gamma is fixed"
            would = ("train with learned weights as if they were fixed" if saved_learn
                     else "start learning from fixed weights as if resuming a learned run")
            raise ValueError(f"This checkpoint holds a {kinds[saved_learn]}, but this weighter was built with "
                             f"learn={w._built_to_learn} ({this}): loading it would {would}. Build the "
                             f"weighter the checkpoint was saved with (learn={saved_learn}, or its preset) to "
                             f"resume that run. Nothing was changed.")
    constraint = state_dict.get("constraint", w.constraint)  # (checkpoints saved before it was recorded: as before)
    if constraint != w.constraint and w._built_to_learn:  # (fixed weights take no meta step to keep a sum by)
        raise ValueError(f"This checkpoint was saved by a weighter with constraint={constraint!r}, but this one has "
                         f"constraint={w.constraint!r}: 'normalize' keeps gamma at the sum it started from, 'clamp' "
                         f"lets it move, so the loaded gamma would jump at the next meta step or drift from then "
                         f"on. Build the weighter with constraint={constraint!r} to resume that run. Nothing was "
                         f"changed.")
    gamma = state_dict["gamma"]
    if not isinstance(gamma, Tensor) or gamma.shape != w.gamma.shape or not gamma.is_floating_point():
        raise ValueError(f"The checkpoint's gamma should be a float tensor of shape {tuple(w.gamma.shape)}. "
                         f"Found {gamma!r}.")
    if not torch.isfinite(gamma).all() or (gamma < 0).any():
        raise ValueError(f"The checkpoint's gamma {gamma.tolist()} holds non-finite or negative weights.")
    if (gamma[~w._terms.active.cpu()] != 0).any():
        raise ValueError(f"The checkpoint's gamma {gamma.tolist()} does not fit the terms {w.term_names}.")
    w._objective.check_state(state_dict["validation"])  # check before touching our own
    check_gamma_optimizer_state(w.gamma_optimizer, w.gamma, state_dict)
    counts, pending, due = checked_counters(state_dict, "HarmonizedWeighter")
    gamma_sum = real_scalar(state_dict["gamma_sum"])  # (the one reading of a number: a bool is none)
    if gamma_sum is None or not (math.isfinite(gamma_sum) and gamma_sum >= 0):
        raise ValueError(f"The checkpoint's gamma_sum {state_dict['gamma_sum']!r} should be a finite number >= 0.")
    num_meta_steps = counts["num_meta_steps"]
    return CheckedState(gamma, num_meta_steps, int(state_dict.get("num_calls", num_meta_steps)),
                        counts["num_skipped"], float(gamma_sum), pending, due)


def _count_exits(names: Iterable[str] | None) -> int:
    return sum(1 for n in names or [] if n.startswith("ce["))
