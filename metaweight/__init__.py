"""metaweight: train multi-exit (early-exit) networks with Harmonized Dense Knowledge Distillation.

Wang & Li, "Harmonized Dense Knowledge Distillation Training for Multi-Exit
Architectures", AAAI 2021.

Quick start: a model returning a list of ``K`` exit logits (shallow to deep), the dense
distillation terms, and a weighter that learns one weight per term on held-out batches, inside
your own loop:

    >>> import torch, metaweight as mw
    >>> model = mw.MultiExit([torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()),
    ...                       torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())],
    ...                      [torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)])
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(num_exits=2))
    >>> train, val = (torch.randn(32, 8), torch.randint(0, 3, (32,))), (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> record = weighter.meta_step(train, val)        # learns the weights gamma; the model is untouched
    >>> loss = weighter.loss(model(train[0]), train[1])  # sum of gamma * terms
    >>> optimizer.zero_grad(); loss.backward(); optimizer.step()
    >>> sorted(weighter.gamma_dict())
    ['ce[1]', 'ce[2]', 'kd[2->1]']

Then evaluate every exit (:func:`collect_logits`, :func:`anytime_accuracy_from_logits`), set
exit thresholds for a compute budget (:func:`budgeted_curve`, :func:`thresholds_for_budget`)
and run real early exit (:class:`EarlyExit`). ``weighter.step(train, val)`` does the meta step
and the model's step in one call; :func:`preset` builds the paper's baselines. The README and
``docs/`` have the guides; ``examples/loop.py`` is the loop to copy.
"""

from metaweight._anytime import AnytimeResult, anytime_accuracy, anytime_accuracy_from_logits, collect_logits
from metaweight._attach import AttachedExits, attach_exits
from metaweight._budget import (
    BudgetCurve,
    BudgetPoint,
    ExitAssignment,
    budgeted_curve,
    evaluate_thresholds,
    exit_assignment,
    find_thresholds,
    geometric_exit_distribution,
    thresholds_for_budget,
)
from metaweight._calibration import Calibration, calibrate, expected_calibration_error, fit_temperatures
from metaweight._checkpoint import load_checkpoint, save_checkpoint
from metaweight._clipping import ClipGradNorm
from metaweight._early_exit import EarlyExit, EarlyExitResult
from metaweight._exit_rules import Entropy, ExitRule, Margin, MaxProbability, Patience, predict
from metaweight._flops import ExitCosts, exit_costs
from metaweight._logging import CSVLogger, TensorBoardLogger
from metaweight._losses import DenseDistillLoss
from metaweight._multiexit import MultiExit
from metaweight._on_outputs import OnOutputs
from metaweight._plots import plot_anytime, plot_budget_curves, plot_gamma_history, plot_reliability
from metaweight._dwa import DWA
from metaweight._famo import FAMO
from metaweight._gradnorm import GradNorm
from metaweight._presets import METHODS, WEIGHTINGS, Method, Preset, preset
from metaweight._rlw import RLW
from metaweight._sdn import SDNSchedule
from metaweight._uw import UW
from metaweight._weighting import LossWeighting, Weighting
from metaweight._capturable import DeviceRecord
from metaweight._record import MetaStepRecord
from metaweight._risk import AccuracyTarget, thresholds_for_accuracy
from metaweight._validation import BalancedValidation
from metaweight._weighter import HarmonizedWeighter

__version__ = "0.1.0"

__all__ = [
    "AccuracyTarget",
    "AnytimeResult",
    "AttachedExits",
    "BalancedValidation",
    "BudgetCurve",
    "BudgetPoint",
    "CSVLogger",
    "Calibration",
    "ClipGradNorm",
    "DWA",
    "DenseDistillLoss",
    "DeviceRecord",
    "EarlyExit",
    "EarlyExitResult",
    "Entropy",
    "ExitAssignment",
    "ExitCosts",
    "ExitRule",
    "FAMO",
    "GradNorm",
    "HarmonizedWeighter",
    "LossWeighting",
    "METHODS",
    "Margin",
    "MaxProbability",
    "MetaStepRecord",
    "Method",
    "MultiExit",
    "OnOutputs",
    "Patience",
    "Preset",
    "RLW",
    "SDNSchedule",
    "TensorBoardLogger",
    "UW",
    "WEIGHTINGS",
    "Weighting",
    "anytime_accuracy",
    "anytime_accuracy_from_logits",
    "attach_exits",
    "budgeted_curve",
    "calibrate",
    "collect_logits",
    "evaluate_thresholds",
    "exit_assignment",
    "exit_costs",
    "expected_calibration_error",
    "find_thresholds",
    "fit_temperatures",
    "geometric_exit_distribution",
    "load_checkpoint",
    "plot_anytime",
    "plot_budget_curves",
    "plot_gamma_history",
    "plot_reliability",
    "predict",
    "preset",
    "save_checkpoint",
    "thresholds_for_accuracy",
    "thresholds_for_budget",
]
