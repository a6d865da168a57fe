"""One typed record of what a weighter call did, returned by ``meta_step``/``step`` and given to hooks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor


@dataclass(frozen=True, eq=False)
class MetaStepRecord(Mapping[str, Any]):
    """What one call of :meth:`HarmonizedWeighter.meta_step` or :meth:`~HarmonizedWeighter.step` did.

    It reads as a mapping of the fields that say something (``record["gamma_grad"]``,
    ``record.get("loss")``, ``"val_objective" in record``; fields that are ``None`` are absent),
    and as attributes.

    Attributes:
        iteration: how many calls the weighter has had, this one included. A ``step()`` whose
            model step was refused (``model_step_skipped``: not finite, skipped) is not counted:
            its record reports the iteration it was made as, which the next call takes again (in
            every mode and weighting). In the two calls the model's step is yours, so every
            ``meta_step`` counts.
        ran: whether a look-ahead ran in this call (``False`` with ``learn=False`` and on the
            calls ``meta_every`` passes over).
        skipped: whether the call learned nothing where it was due to: refused as non-finite
            (``nonfinite="skip"``, counted in ``num_skipped``: its look-ahead or update, ``ran``
            true, or ``step``'s model step, ``model_step_skipped`` true, in every mode and
            weighting), or, with ``ran`` false, passed over because no optimizer step was taken since
            :meth:`loss` (a ``GradScaler`` skipped it) or no step to score came since the last meta
            step (counted in ``num_calls`` only); ``message`` says which.
        meta_step: how many meta steps have succeeded so far.
        val_objective: :math:`L_{val}(\\theta')`, when a look-ahead ran.
        val_exit_losses: the validation objective's per-exit losses at :math:`\\theta'` (those of
            :class:`BalancedValidation`, or of an objective with ``exit_losses``), when a look-ahead
            ran; ``None`` for an objective that is a plain callable (its one value is
            ``val_objective``; logged as ``val_ce[k]`` it read as a cross-entropy).
        gamma_grad: :math:`\\nabla_\\gamma L_{val}(\\theta')` of a successful meta step: a float32 tensor of
            shape ``[num_terms]`` on gamma's device, in the order of ``term_names`` (a tensor, where ``gamma``
            and ``terms`` are dicts: ``dict(zip(weighter.term_names, record.gamma_grad.tolist()))`` names
            it); 0 for an inactive term (``criterion.active``).
        gamma: the loss weights after the call, by term name.
        terms: the unweighted training terms of this call, by term name, when computed.
        loss: the weighted training loss (``step`` only).
        model_step_skipped: whether ``step`` refused the model's step as non-finite.
        message: what was wrong, for a skipped call.
        follows: the iteration of the meta step this one follows in the weighter's history: its
            previous meta step kept, or, where none was kept since the weighter was built or loaded
            (``load_state_dict``), the iteration it was built (0) or loaded at. Set when the record is
            handed to the hooks (``None`` before, and on records of calls that kept no meta step); an
            attribute only, not one of the mapping's keys. A log's entries after it were written for
            steps the weighter no longer holds (undone by a resume or a rollback to a checkpoint, or
            put back by a hook that raised): :class:`CSVLogger` drops them and
            :class:`TensorBoardLogger` hides them at the next record.
        restored: whether the weighter was restored from a checkpoint taken after its first call
            (``load_state_dict``, or a copy: ``copy.deepcopy``, pickled with ``torch.save``), no meta
            step kept since: a log's entries after ``follows`` are then taken for steps undone even
            where none is before it (a checkpoint saved in a warm-up before the first meta step was
            logged). ``False`` for one restored from a checkpoint taken before its first call (a
            template for a new run). An attribute only, as ``follows``.
    """

    iteration: int
    ran: bool = False
    skipped: bool = False
    meta_step: int = 0
    val_objective: float | None = None
    val_exit_losses: list[float] | None = None
    gamma_grad: Tensor | None = None
    gamma: dict[str, float] = field(default_factory=dict)
    terms: dict[str, float] | None = None
    loss: float | None = None
    model_step_skipped: bool | None = None
    message: str | None = None
    follows: int | None = field(default=None, repr=False)
    restored: bool = field(default=False, repr=False)

    def _present(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("follows", "restored") and getattr(self, f.name) is not None}

    def __getitem__(self, key: str) -> Any:
        present = self._present()
        if key not in present:
            raise KeyError(key)
        return present[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._present().items() if k not in ("gamma_grad", "gamma", "terms")}
        return f"MetaStepRecord({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
