"""Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaweight._checks import integer_value
from metaweight._record import MetaStepRecord
from metaweight._transaction import host_to_device
from metaweight._weighting import Weighting


def rlw_weights(draws: Tensor, active: Tensor) -> Tensor:
    r""":math:`\mathrm{softmax}(\lambda)` over the active terms (``draws``: one :math:`\lambda_k` per active term)."""
    logits = torch.full(active.shape, -torch.inf, dtype=draws.dtype, device=draws.device)
    logits[active] = draws
    return torch.softmax(logits, 0)


class RLW(Weighting):
    r"""Random Loss Weighting: new random weights on the simplex at every iteration.

    Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022 (first as "A Closer Look at Loss Weighting in Multi-Task
    Learning", 2021). At every iteration

    .. math::
        \lambda \sim \mathcal{N}(0, I_K), \qquad \gamma = \mathrm{softmax}(\lambda),

    the paper's default distribution (and LibMTL's), so the weights are positive and sum to 1.
    Note the scale: the fixed presets weigh every term 1 (sum :math:`K`), so with plain SGD RLW's
    steps are :math:`K` times smaller on average; the paper used Adam, which does not see the scale.

    The draws come from the weighting's own CPU generator, seeded by ``seed`` and saved in
    :meth:`state_dict`: a resumed run draws the same weights, and every DDP rank (same seed, same
    calls) holds the same ones. The weights of the first iteration are drawn at construction;
    each :meth:`meta_step` draws those of the next.

    Args:
        model: the network; ``model(x)`` returns what ``criterion`` takes.
        optimizer: the model's optimizer (used by :meth:`step` only).
        criterion: the loss terms (any criterion with ``term_names``; see :class:`Weighting`).
        seed: the seed of the generator of the draws.
        term_names: the criterion's term names, where it has none.
        nonfinite: ``"raise"`` or ``"skip"`` a non-finite model step in :meth:`step`.
        callbacks: hooks called with each update's :class:`MetaStepRecord`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)
        >>> w = mw.RLW(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2), seed=1)
        >>> round(sum(w.gamma_dict().values()), 6)
        1.0
    """

    needs_terms = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Any, *, seed: int = 0,
                 term_names: Sequence[str] | None = None, nonfinite: Literal["raise", "skip"] = "raise",
                 callbacks: Sequence[Callable[[MetaStepRecord], None]] = ()) -> None:
        if integer_value(seed) is None or integer_value(seed) < 0:  # type: ignore[operator]
            raise ValueError(f"Invalid seed: {seed!r}. Expected an int >= 0.")
        seed = int(integer_value(seed))  # type: ignore[arg-type]
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(model, optimizer, criterion, term_names=term_names, nonfinite=nonfinite,
                         callbacks=callbacks)
        self._setup()

    def _draw(self, generator: torch.Generator | None = None) -> Tensor:
        draws = torch.randn(self.num_active, generator=generator or self.generator, dtype=torch.float32)
        return rlw_weights(draws, self._terms.active_on(torch.device("cpu")))

    def _initial_gamma(self) -> Tensor:
        return self._draw()

    def _propose(self, terms: Tensor | None, train_batch: Any) -> dict[str, Tensor]:
        # (drawn on the host, for the same weights on every device; on CUDA copied without waiting for the
        # device's queue, which a blocking copy from pageable memory does)
        # (from a copy of the generator, whose state moves on only with an update kept: a refused one draws nothing)
        generator = torch.Generator().set_state(self.generator.get_state())
        gamma = host_to_device(self._draw(generator), self.device)  # softmax of normal draws: always finite
        return {"gamma": gamma, "generator": generator.get_state()}

    def _state_of(self, name: str) -> Any:
        return self.generator.get_state() if name == "generator" else super()._state_of(name)

    def _set_state(self, name: str, value: Tensor | int) -> None:
        if name == "generator":
            self.generator.set_state(value)  # type: ignore[arg-type]
        else:
            super()._set_state(name, value)

    _gamma_sum = "one"  # (a softmax)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("generator")
        if not isinstance(saved, Tensor) or saved.dtype != torch.uint8:
            raise ValueError(f"The checkpoint's `extra['generator']` should be a generator state (a uint8 tensor "
                             f"from torch.Generator.get_state()). Found {type(saved).__name__}.")
        try:
            torch.Generator().set_state(saved)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"The checkpoint's generator state does not load: {exc}") from None

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _state_options(self) -> dict[str, Any]:
        # the generator's state is that seed's stream
        return {**super()._state_options(), "seed": self.seed}

    def _options(self) -> str:
        return f"seed={self.seed}"
