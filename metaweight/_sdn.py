"""SDN's schedule of exit weights growing over training (Kaya, Hong & Dumitras, ICML 2019)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._record import MetaStepRecord
from metaweight._transaction import host_to_device
from metaweight._checks import in_dtype, real_scalar
from metaweight._weighting import Weighting, check_int

_CE = re.compile(r"^ce\[(\d+)\]$")


def sdn_weights(max_weights: Tensor, scheduled: Tensor, epoch: int, epochs: int) -> Tensor:
    r""":math:`\tau_k(e) = \min(C_k,\ 0.01 + e\,C_k/E)` on the scheduled terms, 1 on the others."""
    tau = torch.minimum(max_weights, 0.01 + epoch * max_weights / epochs)
    return torch.where(scheduled, tau, torch.ones_like(tau))


class SDNSchedule(Weighting):
    r"""SDN's fixed schedule: the weight of each internal exit grows linearly over training.

    Kaya, Hong & Dumitras, "Shallow-Deep Networks: Understanding and Mitigating Network
    Overthinking", ICML 2019, Sec. 4.1: the loss is :math:`\sum_{k<K} \tau_k L_k + L_K`, where the
    weight of internal classifier :math:`k` rises linearly from 0.01 to :math:`C_k` over the
    epochs and the final classifier keeps weight 1. As the authors' code (``sdn_train`` in
    ``model_funcs.py``) computes it, in epoch :math:`e = 1, \dots, E`:

    .. math:: \tau_k(e) = \min\big(C_k,\ 0.01 + e\,C_k / E\big).

    The paper sets :math:`C_k` to the classifier's relative position in the network (its code:
    0.15, 0.3, ..., 0.9 for six classifiers). By default :math:`C_k = k/K` on the terms named
    ``ce[...]`` but the last, the :math:`k`-th of the :math:`K` such terms in the order of their
    numbers (a :class:`DenseDistillLoss`'s ``ce[1]`` ... ``ce[K]``; exits numbered from 0 alike):
    each exit's relative depth in stages. ``max_weights`` sets them by term
    name instead, e.g. the exits' fractions of the network's cost from :func:`exit_costs`.
    Terms outside the schedule (the last exit, distillation terms) keep weight 1.

    The epoch is counted from the model steps taken: iteration :math:`t` (from 0; the meta steps
    kept, :attr:`num_meta_steps`) is in epoch :math:`1 + \lfloor t / \text{steps\_per\_epoch}
    \rfloor`, so a resumed run continues the schedule where it stopped. A :meth:`meta_step` after no
    step (after a micro-batch of an accumulated step, or a step a ``GradScaler`` skipped) does not
    count, as a :meth:`step` refused as non-finite does not: with a ``meta_step`` after every
    micro-batch the schedule is that of one ``meta_step`` per step (counting the calls ran it as
    many times faster as there were micro-batches).

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        epochs: :math:`E`, the number of epochs of training.
        steps_per_epoch: iterations per epoch.
        max_weights: :math:`C_k` by term name (default: ``ce[k]`` gets :math:`k/K`, :math:`k < K`).
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite model step in :meth:`step`.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8)] + [torch.nn.Linear(8, 8) for _ in range(3)],
        ...                    [torch.nn.Linear(8, 3)] * 4)
        >>> w = mw.SDNSchedule(net, torch.optim.SGD(net.parameters(), lr=0.1),
        ...                    mw.DenseDistillLoss(4, teachers="none"), epochs=10, steps_per_epoch=5)
        >>> [round(w.gamma_dict()[f"ce[{k}]"], 3) for k in (1, 2, 3, 4)]
        [0.035, 0.06, 0.085, 1.0]
    """

    needs_terms = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *, epochs: int,
                 steps_per_epoch: int, max_weights: Mapping[str, float] | None = None,
                 term_names: Sequence[str] | None = None, nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        self.epochs = check_int("epochs", epochs)
        self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch)
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        names = self.term_names
        if max_weights is None:
            exits = {n: int(m.group(1)) for n in names if (m := _CE.match(n))}
            if not exits:
                raise ValueError(f"SDNSchedule needs to know which terms are exits: none of the terms {names} is "
                                 f"named ce[k]. Pass max_weights={{term name: C_k}} for the terms to schedule.")
            order = sorted(exits, key=exits.__getitem__)  # (the k-th exit by number: ce[0] ... or ce[1] ...)
            K = len(order)
            max_weights = {n: (k + 1) / K for k, n in enumerate(order[:-1])}
        if not isinstance(max_weights, Mapping):
            raise TypeError(f"`max_weights` should be a mapping from term name to C_k. "
                            f"Found `{type(max_weights).__name__}`.")
        unknown = [n for n in max_weights if n not in names]
        if unknown:
            raise ValueError(f"`max_weights` names terms {unknown} that the criterion does not have ({names}).")
        values = {n: real_scalar(c) for n, c in max_weights.items()}
        bad = {n: max_weights[n] for n, c in values.items() if c is None or not 0 < c <= 1e6}
        if bad:
            raise ValueError(f"`max_weights` should map term names to numbers C_k > 0 and at most 1e6 (the cap on a "
                             f"term's weight). Found {bad}.")
        self.max_weights: dict[str, float] = values  # type: ignore[assignment]
        self._scheduled = torch.tensor([n in self.max_weights for n in names])
        self._max = in_dtype([self.max_weights.get(n, 1.0) for n in names], torch.float32, "max_weights")
        self._setup()

    def _weights_at(self, iteration: int) -> Tensor:
        epoch = 1 + iteration // self.steps_per_epoch
        return sdn_weights(self._max, self._scheduled, epoch, self.epochs)

    def _initial_gamma(self) -> Tensor:
        return self._weights_at(0)

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Tensor]:
        # (computed on the host; on CUDA copied without waiting for the device's queue, which a blocking copy waits for)
        return {"gamma": host_to_device(self._weights_at(self.num_meta_steps + 1), self.device) * self._active}

    def _gamma_of(self, state: Mapping[str, Any]) -> Tensor | None:
        # the schedule at the model steps taken; a checkpoint of an earlier version, whose schedule counted the
        # meta_step calls (num_calls, the same but for steps a GradScaler skipped), holds the weights at those
        expected = [self._weights_at(state[k]) * self._terms.active for k in ("num_meta_steps", "num_calls")]
        gamma = state["gamma"].float()
        return next((e for e in expected if torch.allclose(gamma, e, rtol=1e-5, atol=1e-6)), expected[0])

    def _state_options(self) -> dict[str, Any]:
        # the schedule's position and the weights it grows to
        return {**super()._state_options(), "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "max_weights": dict(self.max_weights)}

    def _options(self) -> str:
        return f"epochs={self.epochs}, steps_per_epoch={self.steps_per_epoch}, max_weights={self.max_weights}"
