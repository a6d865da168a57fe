"""Exit rules: how sure each exit is about each sample. A sample leaves at the first exit whose score
reaches that exit's threshold; the threshold search, the budgeted curve and :class:`EarlyExit` take
any rule.

Every rule maps exit logits ``[K, N, C]`` to scores ``[K, N]`` (higher: more ready to leave); the
score of exit ``k`` may depend on exits ``1..k`` only, so that early exit can compute it on the way.
The prediction at an exit is always its most probable class, the first on ties (:func:`predict`). Logits holding a NaN give a NaN
score, which never passes a threshold: the sample goes on to the next exit. The last exit takes every
sample left, so a NaN row there would be predicted as its argmax (class 0 for an all-NaN row): the
functions that predict or score (:class:`EarlyExit`, :func:`exit_assignment`,
:func:`evaluate_thresholds`, :func:`budgeted_curve`, anytime accuracy, calibration, ...) refuse NaN
logits wherever a prediction would be taken from them (the fits, wherever they are), with a
``ValueError`` naming the exit and the count. A row with no softmax (all ``-inf``: every class
masked; or a ``+inf``) gives a NaN score here too, and is refused by the same functions at any exit
its sample reaches: no sample is silently kept in the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from metaweight._checks import unstacked_hint
from metaweight._numerics import p_log_q


def supports_float64(device: torch.device | str) -> bool:
    """Whether ``device`` holds float64 tensors (Apple's MPS does not)."""
    return torch.device(device).type != "mps"


def decision_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype thresholds are kept and compared in on ``device``: float64 (a float32 score against a
    float64 threshold such as ``0.2013`` compares exactly), float32 where the device has no float64
    (MPS). :class:`EarlyExit`'s thresholds and :func:`reaches` both use this one rule."""
    return torch.float64 if supports_float64(device) else torch.float32


def score_dtype(logits: Tensor) -> Tensor:
    """The logits in the precision scores are computed in: their own for float64 (and wider), float32
    for float32, float16 and bfloat16 (a softmax in half precision would round the scores)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def calibrated(logits: Tensor, temperatures: Sequence[float] | Tensor) -> Tensor:
    """Exit logits ``[K, ...]`` divided by one temperature per exit, in the precision scores are
    computed in (:func:`score_dtype`: float32 for half precision, so that ``logits / 1e-4`` does not
    overflow float16, and bfloat16 does not round the quotient). :meth:`Calibration.apply` and
    :class:`EarlyExit` (``temperatures=``) both divide with this one rule, so thresholds found on
    ``calibration.apply(logits)`` score exactly as the predictor does."""
    z = score_dtype(logits)
    t = torch.as_tensor(temperatures, dtype=z.dtype, device=z.device) if not isinstance(temperatures, Tensor) \
        else temperatures.detach().to(dtype=z.dtype).to(z.device)
    return z / t.reshape(-1, *([1] * (z.dim() - 1)))


def reaches(scores: Tensor, thresholds: Tensor) -> Tensor:
    """``scores >= thresholds`` compared exactly: both in :func:`decision_dtype` (float64; float32
    on a device without float64, MPS). Every function that decides an exit compares with this one
    rule, so :class:`EarlyExit` and :func:`exit_assignment` agree on every sample.

    The scores are not cast first: torch's type promotion compares a float32 score with a float64
    threshold in float64 (the conversion is exact), and on a GPU the comparison kernel converts as
    it reads, one launch where a cast and a comparison were two (the CPU still makes a float64
    temporary). Promotion needs the threshold to have dimensions: a 0-d float64 tensor beside a
    float32 one takes the float32 dtype (rounding ``0.2013`` to the nearest float32), so a 0-d
    threshold is given as many dimensions of size 1 as the scores have (the result's shape is
    the same)."""
    dtype = decision_dtype(scores.device)
    thresholds = thresholds.to(dtype=dtype).to(scores.device)
    if thresholds.dim() == 0 and scores.dim() > 0:
        thresholds = thresholds.reshape([1] * scores.dim())
    return torch.ge(scores, thresholds)


def predict(logits: Tensor) -> Tensor:
    """The predicted class at every exit: the index of the largest logit, the first on ties
    (``torch.argmax``'s rule; the softmax is monotone, so it is the most probable class).
    Every public function that predicts a class uses this one rule. This primitive does not
    check its input (no host read): a row holding NaN gives the index of its first NaN, which
    the functions built on it refuse to return or score.

    Args:
        logits: ``[..., C]``, in any floating dtype (the argmax is taken in that dtype).

    Raises:
        TypeError: ``logits`` not a tensor.

    Example:
        >>> import torch, metaweight as mw
        >>> mw.predict(torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]])).tolist()  # ties: the first
        [1, 0]
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"`logits` should be a Tensor [..., C]. Found `{type(logits).__name__}`."
                        + (unstacked_hint(logits) or " (e.g. torch.as_tensor(logits))"))
    return logits.argmax(dim=-1)


class ExitRule:
    """The base of the exit rules: ``scores(logits [K, N, C]) -> [K, N]``, higher leaves earlier.

    ``name`` names the rule in messages and in :class:`EarlyExit`'s saved state, whose thresholds are
    numbers on that rule's scores (loading them under another rule is refused): a subclass that sets
    none and defines its own ``scores`` is named by its module and qualified name
    (``"mypackage.rules.MyRule"``); one whose ``scores`` are the very function its parent's name stands
    for (inherited, not from a mixin) keeps its parent's name (the same scale)."""

    name: str = "rule"
    uses_history: bool = False  # whether exit k's score reads exits before k (early exit keeps them then)
    _default_name: bool = True
    _named_scores: Callable[..., Tensor]  # (set below the class: the function its name stands for)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls._default_name = False
        elif cls.scores is not cls._named_scores or cls.name == "rule":  # two rules of one's own are not both "rule"
            cls._default_name = True
            cls.name = f"{cls.__module__}.{cls.__qualname__}"
        # else: the scores of the class the name came from (inherited as they are, not from a mixin), so its name
        # (and whether it was given) are inherited
        cls._named_scores = cls.scores  # the scores the class's name stands for

    def scores(self, logits: Tensor) -> Tensor:
        """The score of every exit for every sample ``[K, N]``: float32, float64 for float64 logits
        (see :func:`score_dtype`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ExitRule._named_scores = ExitRule.scores


class MaxProbability(ExitRule):
    """The softmax confidence of the predicted class (MSDNet, BranchyNet): ``max_c p_c``."""

    name = "max_probability"

    def scores(self, logits: Tensor) -> Tensor:
        return torch.softmax(score_dtype(logits), dim=-1).max(dim=-1).values


class Entropy(ExitRule):
    """Minus the entropy of the softmax (DeeBERT): ``sum_c p_c log p_c``; a sample leaves when its
    entropy is at most ``-threshold``. A class with probability 0 (a logit of ``-inf``, a masked
    class) adds 0, the limit of ``p log p``."""

    name = "entropy"

    def scores(self, logits: Tensor) -> Tensor:
        log_p = torch.log_softmax(score_dtype(logits), dim=-1)
        return p_log_q(log_p.exp(), log_p).sum(-1)  # 0 log 0 = 0: a masked class (-inf logit) adds nothing


class Margin(ExitRule):
    """The gap between the two most probable classes: ``p_(1) - p_(2)`` (1 with a single class)."""

    name = "margin"

    def scores(self, logits: Tensor) -> Tensor:
        p = torch.softmax(score_dtype(logits), dim=-1)
        if p.shape[-1] == 1:
            return torch.ones(p.shape[:-1], device=p.device, dtype=p.dtype)
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]


class Patience(ExitRule):
    """PABEE's counter (Zhou et al. 2020): at exit ``k``, how many exits in a row before it predicted
    the class exit ``k`` predicts (0 at the first exit, or after a change). With threshold ``t`` a
    sample leaves once ``t + 1`` consecutive exits agree."""

    name = "patience"
    uses_history = True

    def scores(self, logits: Tensor) -> Tensor:
        predictions = predict(logits)
        broken = torch.isnan(logits).any(-1)
        counts = torch.zeros(predictions.shape, dtype=score_dtype(logits[:0]).dtype, device=predictions.device)
        for k in range(1, predictions.shape[0]):
            same = (predictions[k] == predictions[k - 1]) & ~broken[k - 1]
            counts[k] = torch.where(same, counts[k - 1] + 1, torch.zeros_like(counts[k]))
        return counts.masked_fill(broken, float("nan"))


RULES = {rule.name: rule for rule in (MaxProbability, Entropy, Margin, Patience)}


def as_rule(rule: ExitRule | str) -> ExitRule:
    """An exit rule from itself or its name."""
    if isinstance(rule, ExitRule):
        return rule
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]()
    raise ValueError(f"Invalid exit rule: {rule!r}. Expected an ExitRule or one of {sorted(RULES)}.")
