"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._record import MetaStepRecord
from metaweight._weighting import Weighting, check_int, check_number


def dwa_weights(last: Tensor, before: Tensor, active: Tensor, temperature: float, count: int) -> Tensor:
    r""":math:`K\,\mathrm{softmax}_k(r_k/T)` over the active terms, :math:`r_k = \bar L_k(t-1)/\bar L_k(t-2)`;
    ``count`` is :math:`K`, the number of active terms (given: no read of ``active``). Where
    :math:`\bar L_k(t-2)` is 0 (a term exactly 0 over a whole window: distillation between heads initialised to
    zero), :math:`r_k` has no value and is taken as 1, as in the first two windows."""
    known = active & (before != 0)
    ratio = torch.where(known, last / torch.where(known, before, torch.ones_like(before)), torch.ones_like(last))
    logits = torch.where(active, ratio / temperature, torch.full_like(ratio, -torch.inf))
    return count * torch.softmax(logits, 0)


class DWA(Weighting):
    r"""Dynamic Weight Average: weights from the rate at which each term's average loss falls.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, Eq. 7:

    .. math::
        \gamma_k(t) = \frac{K \exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)}, \qquad
        r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)},

    where :math:`\bar L_k(t)` is the average of term :math:`k` over window :math:`t` (the paper's
    epoch), :math:`K` the number of (active) terms, so the weights sum to :math:`K`, and
    :math:`T = 2` the paper's temperature. The first two windows use :math:`\gamma_k = 1`. A term
    whose average over window :math:`t-2` is exactly 0 (distillation between heads initialised to
    zero) has no rate: its :math:`r_k` is 1 (dividing by 0 refused every update for good).

    ``window`` is the number of iterations averaged: your iterations per epoch for the
    paper's rule, or fewer for a per-window variant: a window is that many updates kept (a skipped
    meta step adds nothing to it, nor counts), counted in host-side ints (:attr:`num_windows`,
    :attr:`calls_in_window`). The sums are kept on the device; under DDP
    the terms are averaged over the ranks first (one all-reduce of the term vector).

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        window: iterations per averaging window (the paper: one epoch).
        temperature: :math:`T` (2 in the paper).
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite update or model step.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> w = mw.DWA(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2), window=2)
        >>> for _ in range(6):
        ...     _ = w.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> round(sum(w.gamma_dict().values()), 4)
        3.0
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *, window: int,
                 temperature: float = 2.0, term_names: Sequence[str] | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        self.window = check_int("window", window)
        self.temperature = check_number("temperature", temperature, strict=True, powers=(1, -1))  # ratio / T
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        n = self._terms.num_terms
        self.running_sum = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.last_average = torch.zeros(n, device=self.device, dtype=torch.float32)  # window t-1
        self.previous_average = torch.zeros(n, device=self.device, dtype=torch.float32)  # window t-2
        # host-side counters (Python ints: no device tensor, no read): complete windows so far, and the updates
        # summed into the open one. A window is `window` updates kept, not `window` meta_step calls: a skipped
        # call (non-finite, or after an optimizer that did not step) adds nothing to the sum it is divided into
        self.num_windows = 0
        self.calls_in_window = 0
        self._setup()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"running_sum": self.running_sum, "last_average": self.last_average,
                "previous_average": self.previous_average}

    _gamma_sum = "active"  # (K softmax, or 1 on each active term in the first two windows)

    def _extra_state(self) -> dict[str, Any]:
        return {"num_windows": self.num_windows, "calls_in_window": self.calls_in_window}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        counts = {k: state.get(k) for k in ("num_windows", "calls_in_window")}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values()) or \
                counts["calls_in_window"] >= self.window:
            raise ValueError(f"The checkpoint's DWA counters {counts} should be ints >= 0, calls_in_window < window "
                             f"({self.window}). Pass a DWA.state_dict() saved with window={self.window}. Nothing "
                             f"was changed.")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (see :meth:`Weighting.load_state_dict`); a checkpoint of an earlier
        version, with ``num_windows`` a tensor and the window's position that of ``num_calls``, loads as such."""
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("num_windows"), Tensor) and \
                isinstance(state_dict.get("extra"), Mapping) and "num_windows" not in state_dict["extra"]:
            calls, windows = state_dict.get("num_calls"), state_dict["num_windows"]
            if isinstance(calls, int) and not isinstance(calls, bool) and windows.numel() == 1 and \
                    not windows.is_floating_point():
                state_dict = {k: v for k, v in state_dict.items() if k != "num_windows"}
                state_dict["extra"] = {**state_dict["extra"], "num_windows": int(windows),
                                       "calls_in_window": calls % self.window}
        super().load_state_dict(state_dict)

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.num_windows, self.calls_in_window = state["num_windows"], state["calls_in_window"]

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Any]:
        assert terms is not None
        running = self.running_sum + terms.to(self.running_sum) * self._active
        calls = self.calls_in_window + 1
        if calls < self.window:
            return {"running_sum": running, "calls_in_window": calls}
        average = running / calls
        windows = self.num_windows + 1
        gamma = dwa_weights(average, self.last_average, self._active, self.temperature, self.num_active) \
            if windows >= 2 else self.gamma
        return {"running_sum": torch.zeros_like(running), "last_average": average,
                "previous_average": self.last_average.clone(), "num_windows": windows, "calls_in_window": 0,
                "gamma": gamma}

    def _state_options(self) -> dict[str, Any]:
        # the running sums are over windows of this many steps
        return {**super()._state_options(), "window": self.window}

    def _options(self) -> str:
        return f"window={self.window}, temperature={self.temperature}"
