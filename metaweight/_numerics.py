"""Sums of ``p log q`` that keep their limits where a class is masked out (a logit of ``-inf``)."""

from __future__ import annotations

import torch
from torch import Tensor


def p_log_q(p: Tensor, log_q: Tensor) -> Tensor:
    """``p * log_q`` elementwise, with ``0 * log 0 = 0`` (the limit), as ``torch.xlogy`` gives it.

    ``log_q`` stays in the log domain (a ``log_softmax``), so tiny probabilities keep their
    precision; ``torch.xlogy(p, q)`` would need ``q = exp(log_q)``, which underflows to 0. Where
    ``p`` is 0 neither the value nor the gradient sees ``log_q`` (which may be ``-inf``); a NaN
    ``p`` stays NaN.
    """
    zero = p == 0
    if p.requires_grad:  # d/dp = log_q would be -inf where p = 0: keep log_q out of those entries
        return torch.where(zero, torch.zeros_like(p), p * torch.where(zero, torch.zeros_like(log_q), log_q))
    return torch.where(zero, 0.0, p * log_q)  # d/dlog_q = p is 0 there already: one select is enough
