"""metaweight: train multi-exit (early-exit) networks with Harmonized Dense Knowledge Distillation.

Wang & Li, "Harmonized Dense Knowledge Distillation Training for Multi-Exit
Architectures", AAAI 2021.
"""

from metaweight._anytime import AnytimeResult, anytime_accuracy, anytime_accuracy_from_logits, collect_logits
from metaweight._losses import DenseDistillLoss
from metaweight._multiexit import MultiExit
from metaweight._presets import METHODS, Method, Preset, preset
from metaweight._validation import BalancedValidation
from metaweight._weighter import HarmonizedWeighter

__version__ = "0.1.0"

__all__ = [
    "AnytimeResult",
    "BalancedValidation",
    "DenseDistillLoss",
    "HarmonizedWeighter",
    "METHODS",
    "Method",
    "MultiExit",
    "Preset",
    "anytime_accuracy",
    "anytime_accuracy_from_logits",
    "collect_logits",
    "preset",
]
