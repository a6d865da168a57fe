"""The balanced validation objective of HDKD (Eq. 9/10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaweight._on_outputs import scored
from metaweight._checks import check_ignore_index, IGNORE_INDEX, check_num_exits, real_option, stack_exit_logits
from metaweight._losses import exit_cross_entropy


MIN_EXPECTED = 1e-4  # the floor of E[L_k] in the ratio: a cross-entropy of 1e-4 is 99.99% confidence


class BalancedValidation(nn.Module):
    r"""Cross-entropy of every exit on held-out data, balanced by a ratio regularizer.

    Wang & Li (AAAI 2021), Eq. 10:

    .. math::
        L_{val} = \alpha \sum_{k=1}^K L^{CE}_k
                + (1-\alpha) \sum_{k=1}^K \mathrm{softplus}\Big(\frac{L^{CE}_k}{\mathbb{E}[L^{CE}_k]} - 1\Big)

    with :math:`\mathbb{E}[L^{CE}_k]` an exponential moving average (Eq. 9):
    :math:`\mathbb{E} \leftarrow m\,\mathbb{E} + (1-m)\,L^{CE}_k`. The ratio term keeps the
    large losses of early exits from dominating the meta-gradient. The average in the ratio is
    floored at ``1e-4``, so an exit whose held-out loss is exactly 0 (a confident pretrained
    net, one class) gives a finite objective instead of 0/0.

    The average is a buffer (so it is in :meth:`state_dict`). Computing the objective never
    changes it: the :class:`HarmonizedWeighter` calls :meth:`update` once per meta step,
    with detached values, after the step succeeded. Before the first update the current
    (detached) losses stand in for the average, and the first update initialises it.

    Args:
        num_exits: the number of exits :math:`K`.
        alpha: the weight :math:`\alpha \in [0, 1]` of the plain cross-entropy
            (1 gives the summed cross-entropy alone).
        momentum: :math:`m \in [0, 1)` of the moving average (0.9 in the paper).
        ignore_index: labels equal to it (padding) are left out; token-level logits
            ``[B, T, C]`` with labels ``[B, T]`` are scored per token.

    A validation label on a class masked (``-inf``) at an exit gives that exit an infinite
    cross-entropy and the objective ``+inf``, as in :class:`DenseDistillLoss`; the
    :class:`HarmonizedWeighter` refuses (or, with ``nonfinite="skip"``, skips) such a meta step with
    a message naming the cause, and :meth:`update` refuses the value: it never enters the average.

    Example:
        >>> import torch, metaweight as mw
        >>> validation = mw.BalancedValidation(num_exits=2, alpha=0.5)
        >>> losses = torch.tensor([2.0, 1.0])
        >>> validation.update(losses)
        >>> round(float(validation.objective(torch.tensor([1.0, 1.0]))), 4)  # 0.5*2 + 0.5*(softplus(-0.5) + softplus(0))
        1.5836
    """

    expected: Tensor
    num_updates: Tensor

    def __init__(self, num_exits: int, alpha: float = 0.5, momentum: float = 0.9, *,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_exits = check_num_exits(num_exits)
        alpha = real_option(alpha, "alpha", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        momentum = real_option(momentum, "momentum", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        self.ignore_index = check_ignore_index(ignore_index)
        self.alpha = alpha
        self.momentum = momentum
        self.register_buffer("expected", torch.zeros(num_exits, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def initialized(self) -> bool:
        """Whether the moving average has received its first value."""
        return bool(self.num_updates > 0)

    def exit_losses(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        """The cross-entropy of each exit, a tensor of shape ``[num_exits]``."""
        logits, target = stack_exit_logits(outputs, target, self.num_exits, where="model output on the validation batch",
                                           ignore_index=self.ignore_index)
        return exit_cross_entropy(logits, target)

    def objective(self, exit_losses: Tensor) -> Tensor:
        """Eq. 10 for given per-exit losses, against the current moving average."""
        if not isinstance(exit_losses, Tensor):
            raise TypeError(f"`exit_losses` should be a Tensor of {self.num_exits} losses. "
                            f"Found `{type(exit_losses).__name__}`.")
        if exit_losses.shape != (self.num_exits,):
            raise ValueError(
                f"Expected one loss per exit, shape ({self.num_exits},). Found {tuple(exit_losses.shape)}."
            )
        total = exit_losses.sum()
        if self.alpha == 1.0:
            return total
        scored(self)  # (a weighter whose validation objective calls this one without its update is told so)
        # before the first update the batch's own losses stand in for the average (no host read)
        expected = torch.where(self.num_updates > 0, self.expected.to(exit_losses), exit_losses.detach())
        # an exit already at (nearly) zero loss would make the ratio 0/0: its average is floored
        ratio = F.softplus(exit_losses / expected.clamp_min(MIN_EXPECTED) - 1.0).sum()
        return self.alpha * total + (1.0 - self.alpha) * ratio

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        """Eq. 10 on a validation batch; does not update the moving average."""
        return self.objective(self.exit_losses(outputs, target))

    @torch.no_grad()
    def update(self, exit_losses: Tensor) -> None:
        """Fold detached per-exit losses into the moving average (Eq. 9)."""
        if not isinstance(exit_losses, Tensor):
            raise TypeError(f"`exit_losses` should be a Tensor of {self.num_exits} losses. "
                            f"Found `{type(exit_losses).__name__}`.")
        losses = exit_losses.detach().to(self.expected)
        if losses.shape != self.expected.shape:
            raise ValueError(f"Expected one loss per exit, shape ({self.num_exits},). Found {tuple(losses.shape)}.")
        if not torch.isfinite(losses).all():
            raise ValueError(f"Refusing to fold non-finite validation losses {losses.tolist()} into the average.")
        self._fold(losses)

    @torch.no_grad()
    def _fold(self, losses: Tensor) -> None:
        """Eq. 9 for losses already checked (shape, finite): on the device, no host read."""
        losses = losses.detach().to(self.expected)
        averaged = self.expected.mul(self.momentum).add(losses, alpha=1.0 - self.momentum)
        self.expected.copy_(torch.where(self.num_updates > 0, averaged, losses))
        self.num_updates += 1

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, refusing (changing nothing) a state of another number of exits."""
        expected = state_dict.get("expected") if isinstance(state_dict, Mapping) else None
        if isinstance(expected, Tensor) and expected.shape != (self.num_exits,):
            raise ValueError(f"This state is of a BalancedValidation with {expected.numel()} exits (`expected` of "
                             f"shape {tuple(expected.shape)}), but this one has num_exits={self.num_exits}. Build it "
                             f"with num_exits={expected.numel()}, or load the state saved for this model.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, alpha={self.alpha}, momentum={self.momentum}"
