"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._record import MetaStepRecord
from metaweight._checks import real_numbers, real_option
from metaweight._weighting import Weighting, adam_update, check_number


def uw_gradient(log_vars: Tensor, terms: Tensor, active: Tensor) -> Tensor:
    r"""The gradient of :math:`\sum_k e^{-s_k} L_k + s_k/2` in :math:`s`: :math:`1/2 - e^{-s_k} L_k` (0 if inactive)."""
    return (0.5 - torch.exp(-log_vars) * terms) * active


class UW(Weighting):
    r"""Uncertainty weighting: one learned log-variance :math:`s_k = \log\sigma_k^2` per term.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. Each term is weighted by its learned precision:

    .. math::
        \mathcal{L} = \sum_k e^{-s_k} L_k + \tfrac{1}{2} s_k, \qquad \gamma_k = e^{-s_k},

    the paper's form for a classification term (Eq. 10: :math:`\frac{1}{\sigma^2}L + \log\sigma`),
    used here for every term (cross-entropies and distillation terms alike; a regression term's
    :math:`\frac{1}{2\sigma^2}L + \log\sigma` starts at half the weight and tends to the same one). :math:`s`
    starts at 0 (every weight 1)
    and follows :math:`\partial\mathcal{L}/\partial s_k = \tfrac12 - e^{-s_k}L_k`, whose fixed point
    is :math:`\gamma_k = 1/(2L_k)`.

    The paper trains :math:`s` with the network's optimizer. The weighting never changes the
    user's optimizer, so :math:`s` has its own Adam (``lr``; 0.01 by default, the step size of
    :class:`HarmonizedWeighter`'s :math:`\gamma`), stepped in :meth:`meta_step` from that closed-form
    gradient at the terms of the iteration's :meth:`loss` call (averaged over DDP ranks).

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        lr: the learning rate of :math:`s`'s Adam.
        betas: Adam's moment decays for :math:`s`.
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite update or model step.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> w = mw.UW(net, opt, mw.DenseDistillLoss(2, teachers="none"))
        >>> record = w.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> sorted(w.gamma_dict())
        ['ce[1]', 'ce[2]', 'kd[2->1]']
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *, lr: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), term_names: Sequence[str] | None = None,
                 nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        self.lr = check_number("lr", lr)
        if real_numbers(betas) is None or len(real_numbers(betas)) != 2:  # type: ignore[arg-type]
            raise ValueError(f"Invalid betas: {betas!r}. Expected two numbers in [0, 1).")
        # each scales Adam's float32 moments (and 1 - beta the gradient): the rule of every real option
        b1, b2 = (real_option(b, f"betas[{i}]", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
                  for i, b in enumerate(list(betas)))  # type: ignore[call-overload]
        self.betas = (b1, b2)
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        n = self._terms.num_terms
        self.log_vars = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg = torch.zeros(n, device=self.device, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(n, device=self.device, dtype=torch.float32)
        self._setup()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"log_vars": self.log_vars, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    _nonnegative = {"exp_avg_sq": "Adam's second moment is a mean of squares"}

    def _gamma_of(self, state: Mapping[str, Any]) -> Tensor:
        return torch.exp(-state["log_vars"].float().cpu()) * self._terms.active.cpu()

    def _combine(self, terms: Tensor) -> Tensor:
        s = self.log_vars.detach()
        return (self._constant_weights() * terms).sum() + 0.5 * (s * self._active).sum()

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Tensor]:
        assert terms is not None
        grad = uw_gradient(self.log_vars, terms.to(self.log_vars), self._active)
        s, m, v = adam_update(self.log_vars, grad, self.exp_avg, self.exp_avg_sq, self.num_meta_steps + 1,
                              lr=self.lr, betas=self.betas)
        s = s * self._active
        return {"log_vars": s, "exp_avg": m, "exp_avg_sq": v, "gamma": torch.exp(-s) * self._active}

    def _options(self) -> str:
        return f"lr={self.lr}, betas={self.betas}"
