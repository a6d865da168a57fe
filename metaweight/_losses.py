"""Dense knowledge distillation between the exits of a multi-exit network (HDKD Eq. 4/5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaweight._checks import (check_ignore_index, IGNORE_INDEX, check_exit_outputs, check_num_exits, real_option,
                                real_scalar, stack_exit_logits)
from metaweight._numerics import p_log_q

TEACHERS = ("dense", "last", "none")


def exit_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The mean cross-entropy of every exit: logits ``[K, B, C]`` and labels ``[B]`` give ``[K]``."""
    K, batch, _ = logits.shape
    return F.cross_entropy(
        logits.flatten(0, 1), target.repeat(K), reduction="none", label_smoothing=label_smoothing
    ).view(K, batch).mean(1)


class DenseDistillLoss(nn.Module):
    r"""All the loss terms of dense distillation, one tensor entry per term, never summed.

    For a network with :math:`K` exits and logits :math:`z_1, \dots, z_K` (shallow to deep)
    this returns the :math:`K + K(K-1)/2` terms of Wang & Li (AAAI 2021), Eq. 5:

    * ``ce[k]`` for :math:`k = 1..K`: the cross-entropy :math:`L^{CE}_k` of exit :math:`k`;
    * ``kd[i->j]`` for every teacher :math:`i = 2..K` and student :math:`j = 1..i-1`:

      .. math:: L^{KD}_{i \to j} = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z_i/T) \,\|\,
                \mathrm{softmax}(z_j/T)\big),

      averaged over the batch, with the teacher :math:`z_i` detached. A class the teacher gives
      probability 0 (a masked class, logit ``-inf``) adds 0, the limit of :math:`p \log(p/q)`.

    The order is the CE terms first, then the KD terms in the order of Eq. 5's double sum
    (teacher ``i`` outer, student ``j`` inner): ``kd[2->1], kd[3->1], kd[3->2], kd[4->1], ...``.
    :attr:`term_names` lists it.

    The paper writes the distillation term (Eq. 2) as a cross-entropy between soft labels.
    We use the KL divergence with the teacher detached, as Hinton et al. do: it differs
    from the teacher-to-student cross-entropy only by the teacher's entropy, a constant
    for the student, so the gradients are the same and a perfect student scores 0.

    ``teachers`` selects which terms are *active*: ``"dense"`` (every later exit teaches,
    HDKD/NaiveDKD), ``"last"`` (only the last exit teaches, DBT, Eq. 3) or ``"none"``
    (plain multi-exit cross-entropy, MSDNet). Inactive terms are not computed and are
    returned as exact zeros, so the vector keeps one layout whatever the teachers.

    Args:
        num_exits: the number of exits :math:`K`.
        temperature: the distillation temperature :math:`T` (> 0).
        teachers: ``"dense"``, ``"last"`` or ``"none"``.
        label_smoothing: passed to the cross-entropy terms (0 as in the paper). Smoothing spreads
            target mass over all ``C`` classes, so with a class masked to ``-inf`` in the logits
            every CE term is infinite (``F.cross_entropy`` does the same): mask by leaving the
            class out of the logits, or use no smoothing with masked classes.
        ignore_index: labels equal to it (padding) are left out of every term.

    A label on a class masked (``-inf``) at an exit makes that exit's CE term ``+inf``, as
    ``F.cross_entropy`` gives it (its likelihood is 0): not refused here, where checking would cost a
    read back to the host every step, but the value says so, and :class:`HarmonizedWeighter`
    refuses such a step, naming the cause. Held-out fits (:func:`fit_temperatures`,
    :func:`calibrate`) refuse such labels before fitting.

    Shapes: logits ``[B, C]`` with labels ``[B]`` (one prediction per sample), or token-level
    logits ``[B, T, C]`` with labels ``[B, T]`` (an early-exit language model or token
    classifier). Every term is a mean over the scored positions: samples, or tokens whose
    label is not ``ignore_index``.

    Attributes:
        term_names: the names of the terms, in order (``ce[k]``, then ``kd[i->j]``).
        active: a bool tensor, which terms the chosen teachers compute.
        pairs: the (teacher, student) exit indices (0-based) of the KD terms, in order.

    Example:
        >>> import torch, metaweight as mw
        >>> criterion = mw.DenseDistillLoss(num_exits=3, temperature=3.0)
        >>> criterion.term_names
        ['ce[1]', 'ce[2]', 'ce[3]', 'kd[2->1]', 'kd[3->1]', 'kd[3->2]']
        >>> logits = [torch.randn(4, 10) for _ in range(3)]
        >>> criterion(logits, torch.tensor([0, 3, 9, 1])).shape
        torch.Size([6])
    """

    def __init__(
        self,
        num_exits: int,
        temperature: float = 3.0,
        teachers: str = "dense",
        *,
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.num_exits = check_num_exits(num_exits)
        temperature_value = real_option(temperature, "temperature", "a finite number > 0",
                                        lambda v: math.isfinite(v) and v > 0, powers=(1, -1, 2))  # logits / T, KD * T²
        if not isinstance(teachers, str) or teachers not in TEACHERS:
            raise ValueError(f"Invalid teachers: {teachers!r}. Expected one of {TEACHERS}.")
        if real_scalar(label_smoothing) is None:  # not a number at all: a type error, as before
            raise TypeError(f"Invalid label_smoothing: {label_smoothing!r}. Expected a number in [0, 1).")
        label_smoothing = real_option(label_smoothing, "label_smoothing", "a number in [0, 1)",
                                      lambda v: 0.0 <= v < 1.0)
        self.temperature = temperature_value
        self.teachers = teachers
        self.label_smoothing = label_smoothing
        self.ignore_index = check_ignore_index(ignore_index)

        K = num_exits
        self.pairs: list[tuple[int, int]] = [(i, j) for i in range(1, K) for j in range(i)]
        self.term_names: list[str] = [f"ce[{k + 1}]" for k in range(K)] + [
            f"kd[{i + 1}->{j + 1}]" for i, j in self.pairs
        ]
        if teachers == "dense":
            active_pairs = list(self.pairs)
        elif teachers == "last":
            active_pairs = [(i, j) for i, j in self.pairs if i == K - 1]
        else:
            active_pairs = []
        active = torch.zeros(len(self.term_names), dtype=torch.bool)
        active[:K] = True
        for p in active_pairs:
            active[K + self.pairs.index(p)] = True
        self.register_buffer("active", active, persistent=False)
        self.register_buffer("_active_index", active.nonzero().flatten(), persistent=False)
        self.register_buffer("_teacher", torch.tensor([i for i, _ in active_pairs], dtype=torch.long), persistent=False)
        self.register_buffer("_student", torch.tensor([j for _, j in active_pairs], dtype=torch.long), persistent=False)

    @property
    def num_terms(self) -> int:
        """The length of the term vector, :math:`K + K(K-1)/2`."""
        return len(self.term_names)

    def index(self, name: str) -> int:
        """The position of the term called ``name`` (e.g. ``"kd[3->1]"``) in the term vector."""
        try:
            return self.term_names.index(name)
        except ValueError:
            raise ValueError(f"No term named {name!r}. The terms are {self.term_names}.") from None

    def forward(
        self, outputs: Sequence[Tensor], target: Tensor, *, teacher_outputs: Sequence[Tensor] | None = None
    ) -> Tensor:
        """The vector of all loss terms, in the order of :attr:`term_names`.

        Args:
            outputs: ``K`` logits tensors of shape ``[B, C]`` (or ``[B, T, C]``), shallow to deep.
            target: class indices of shape ``[B]`` (or ``[B, T]``).
            teacher_outputs: logits to take the teachers' soft targets from instead of
                ``outputs`` (same shapes); used to hold the teachers fixed while the
                students move, e.g. in finite differences. Always detached.

        Returns:
            A float32 (or float64, for float64 logits) tensor of shape ``[num_terms]``.
        """
        logits, flat = stack_exit_logits(outputs, target, self.num_exits, ignore_index=self.ignore_index)
        K = self.num_exits
        ce = exit_cross_entropy(logits, flat, self.label_smoothing)
        if self._teacher.numel() == 0:
            values = ce
        else:
            T = self.temperature
            log_p = F.log_softmax(logits / T, dim=-1)
            if teacher_outputs is None:
                teacher = log_p[self._teacher.to(log_p.device)].detach()
            else:
                check_exit_outputs(teacher_outputs, K, where="teacher_outputs")
                if teacher_outputs[0].shape != outputs[0].shape:
                    raise ValueError(f"teacher_outputs have shape {tuple(teacher_outputs[0].shape)}, outputs "
                                     f"{tuple(outputs[0].shape)}.")
                fixed, _ = stack_exit_logits(teacher_outputs, target, K, where="teacher_outputs",
                                             ignore_index=self.ignore_index)
                fixed = fixed.detach()
                if fixed.shape != logits.shape:
                    raise ValueError(f"teacher_outputs have shape {tuple(fixed.shape)[1:]}, outputs {tuple(logits.shape)[1:]}.")
                teacher = F.log_softmax(fixed.to(logits.dtype) / T, dim=-1)[self._teacher.to(logits.device)]
            student = log_p[self._student.to(log_p.device)]
            p_teacher = teacher.exp()  # classes the teacher gives 0 (masked, -inf) add 0, the limit of p log(p/q)
            kd = p_log_q(p_teacher, teacher - student).sum(-1).mean(-1) * (T * T)
            values = torch.cat([ce, kd])
        if values.numel() == self.num_terms:
            return values
        return values.new_zeros(self.num_terms).index_copy(0, self._active_index.to(values.device), values)

    def extra_repr(self) -> str:
        return f"num_exits={self.num_exits}, temperature={self.temperature}, teachers={self.teachers!r}"
