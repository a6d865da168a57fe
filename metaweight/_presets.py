"""The training methods compared in the HDKD paper, as presets of one machinery."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metaweight._dwa import DWA
from metaweight._famo import FAMO
from metaweight._gradnorm import GradNorm
from metaweight._losses import DenseDistillLoss
from metaweight._rlw import RLW
from metaweight._sdn import SDNSchedule
from metaweight._uw import UW
from metaweight._validation import BalancedValidation
from metaweight._weighter import HarmonizedWeighter
from metaweight._weighting import Weighting


@dataclass(frozen=True)
class Method:
    """How one method sets the shared machinery: which teachers, and whether gamma is learned.

    Attributes:
        name: the preset's name (``"hdkd"``, ...).
        teachers: ``"dense"``, ``"last"`` or ``"none"`` (see :class:`DenseDistillLoss`).
        learn: whether gamma is learned by the meta step.
        description: one line on what the method trains.
        citation: where the method comes from.
    """

    name: str
    teachers: str
    learn: bool
    description: str
    citation: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("msdnet", "none", False, "sum of the exits' cross-entropies, uniform weights",
               "Huang et al., Multi-Scale Dense Networks, ICLR 2018"),
        Method("dbt", "last", False, "CE of every exit + KD from the last exit to each earlier one, uniform (Eq. 3, lambda=1)",
               "Phuong & Lampert, Distillation-Based Training for Multi-Exit Architectures, ICCV 2019"),
        Method("naive_dkd", "dense", False, "CE + KD from every later exit to every earlier one, uniform (Eq. 4)",
               "Wang & Li, HDKD, AAAI 2021 (NaiveDKD baseline)"),
        Method("hmsdnet", "none", True, "MSDNet's CE terms with harmonized (learned) weights",
               "Wang & Li, HDKD, AAAI 2021 (HMSDNet)"),
        Method("hdbt", "last", True, "DBT's terms with harmonized weights",
               "Wang & Li, HDKD, AAAI 2021 (HDBT)"),
        Method("hdkd", "dense", True, "dense distillation with harmonized weights (Eq. 5-10)",
               "Wang & Li, HDKD, AAAI 2021"),
    )
}


# the loss-weighting methods beside HDKD's, by the names LibMTL and the papers use; each class takes
# (model, optimizer, criterion, *, options) and any criterion of named terms
WEIGHTINGS: dict[str, type[Weighting]] = {
    "uw": UW,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "rlw": RLW,
    "famo": FAMO,
    "sdn": SDNSchedule,
}


@dataclass
class Preset:
    """A method's criterion and weighter settings, ready to wrap a model and optimizer.

    Attributes:
        method: the :class:`Method` this preset was built from.
        criterion: the :class:`DenseDistillLoss` with the method's teachers.
        weighter_options: the keyword arguments the method fixes for
            :class:`HarmonizedWeighter` (``learn`` and ``init``).
    """

    method: Method
    criterion: DenseDistillLoss
    weighter_options: dict[str, Any] = field(default_factory=dict)

    def weighter(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        validation: BalancedValidation | None = None,
        **options: Any,
    ) -> HarmonizedWeighter:
        """A :class:`HarmonizedWeighter` for ``model`` with this method's settings.

        ``options`` are further :class:`HarmonizedWeighter` keyword arguments
        (``gamma_lr``, ``constraint``, ...); they may not change ``learn``.
        """
        if "learn" in options and options["learn"] != self.weighter_options["learn"]:
            raise ValueError(
                f"Method {self.method.name!r} has learn={self.weighter_options['learn']}; pick the matching "
                f"method instead of overriding it ({', '.join(METHODS)})."
            )
        merged = {**self.weighter_options, **options}
        return HarmonizedWeighter(model, optimizer, self.criterion, validation, **merged)


def preset(name: str, num_exits: int, *, temperature: float = 3.0, init: Any = "uniform") -> Preset:
    """The criterion and weighter settings of one of the paper's methods.

    ========== ========= ============ ===================================================
    name       teachers  gamma        what it is
    ========== ========= ============ ===================================================
    msdnet     none      fixed at 1   Huang et al. 2018: sum of the exits' CE
    dbt        last      fixed at 1   Phuong & Lampert 2019, as HDKD's Eq. 3 with lambda=1
    naive_dkd  dense     fixed at 1   dense distillation, uniform weights (Eq. 4)
    hmsdnet    none      learned      harmonized MSDNet
    hdbt       last      learned      harmonized DBT
    hdkd       dense     learned      HDKD (Eq. 5-10)
    ========== ========= ============ ===================================================

    The paper's seventh column, "Impr" (IMTA, Li et al. 2019), is not a preset: its
    gradient equilibrium rescales gradients inside the architecture (1/(K-i) around
    exit i) and its inline KD uses a fixed T=3 from the last exit, so it belongs to the
    model, not to the loss weighting; its KD part is ``dbt`` with ``temperature=3``.
    Phuong & Lampert's temperature annealing is not reproduced by ``dbt`` either.

    Args:
        name: one of ``msdnet``, ``dbt``, ``naive_dkd``, ``hmsdnet``, ``hdbt``, ``hdkd``.
        num_exits: the model's number of exits.
        temperature: the KD temperature ``T``.
        init: the initial gamma (see :class:`HarmonizedWeighter`); the paper's
            HDKD starts DS-like, ``"uniform"``.

    Example:
        >>> import metaweight as mw
        >>> p = mw.preset("hdbt", num_exits=3)
        >>> p.criterion.active.tolist()
        [True, True, True, False, True, True]
        >>> p.weighter_options
        {'learn': True, 'init': 'uniform'}
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` should be a method name, one of {list(METHODS)}. Found `{type(name).__name__}`.")
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        from metaweight import WEIGHTINGS  # (the package's table of the loss weightings; imported at call time)

        if key in WEIGHTINGS:
            raise ValueError(f"{name!r} is a loss weighting, not a preset of the HarmonizedWeighter: build it "
                             f"as mw.WEIGHTINGS[{key!r}](model, optimizer, criterion) "
                             f"(mw.{WEIGHTINGS[key].__name__}(...)). The presets are {list(METHODS)}.")
        raise ValueError(f"Unknown method {name!r}. Expected one of {list(METHODS)} (the loss weightings: "
                         f"mw.WEIGHTINGS).")
    method = METHODS[key]
    criterion = DenseDistillLoss(num_exits, temperature=temperature, teachers=method.teachers)
    return Preset(method, criterion, {"learn": method.learn, "init": init})
