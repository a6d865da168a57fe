"""Costs that match what early exit runs: the FLOPs EarlyExit executes on a mixed batch, counted by
torch.utils.flop_counter, equal the sum over samples of the executed cost of the exit each took."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import metaweight as mw
from conftest import tiny_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from msdnet import msdnet_cifar  # noqa: E402


def executed_flops(predictor, x):
    counter = FlopCounterMode(display=False)
    with counter:
        _, exits = predictor(x)
    return counter.get_total_flops(), exits


def test_executed_flops_of_early_exit_match_the_predicted_cost_msdnet():
    torch.manual_seed(0)
    model = msdnet_cifar(10, 4, channels=8).eval()
    x = torch.randn(24, 3, 32, 32)
    executed = mw.exit_costs(model, x[:1], executed=True)
    lazy = mw.exit_costs(model, x[:1])
    # MSDNet's finer scales inside a block feed only later exits: early exit runs more than exit k needs
    assert all(e >= m for e, m in zip(executed.macs, lazy.macs)) and executed.macs[0] > lazy.macs[0]
    assert executed.macs[-1] == lazy.macs[-1]  # the last exit needs everything either way
    with torch.no_grad():
        logits = torch.stack(model(x))
    conf = torch.softmax(logits, -1).max(-1).values
    thresholds = torch.tensor([float(conf[0].quantile(0.6)), float(conf[1].quantile(0.5)),
                               float(conf[2].quantile(0.5)), -1.0])
    predictor = mw.EarlyExit(model, thresholds)
    first, _ = executed_flops(predictor, x)
    flops, exits = executed_flops(predictor, x)
    counts = torch.bincount(exits, minlength=4).tolist()
    assert len([c for c in counts if c]) >= 3  # a real mix of exits
    predicted = sum(c * m for c, m in zip(counts, executed.macs))
    assert flops // 2 == predicted
    # the first call also checks, on its first 8 samples, that the stages compute what the forward does: the
    # forward and the stages to the last exit, each the last exit's cost per sample
    assert first // 2 == predicted + 2 * 8 * executed.macs[-1]
    # the budgeted point with executed costs predicts the same cost per sample
    point = mw.evaluate_thresholds(logits, torch.zeros(24, dtype=torch.long), thresholds, executed.macs)
    assert point.cost * 24 == predicted


def test_executed_costs_of_a_multi_exit_mlp_are_its_stages_and_heads():
    model = tiny_net(3, batchnorm=False).eval()
    executed = mw.exit_costs(model, torch.randn(1, 6), executed=True)
    # stage k: 6x10 or 10x10 linear, head: 10x5: cumulative multiply-adds
    assert executed.macs == [60 + 50, 60 + 50 + 100 + 50, 60 + 50 + 2 * (100 + 50)]


def test_executed_costs_are_msdnets_own_count_and_the_default_charges_exit_k_less():
    """MSDNet's counter (its public code's op_counter) charges exit k every op run before classifier
    k, the finer scales of block k that only later exits need included: exit_costs(executed=True)
    counts that (its convolutions and linear layers; references/op_counter.py, written from the
    description), at every exit. The default, what each exit depends on, leaves those scales out,
    so it is lower at exit 1 and never higher (the docs called the default MSDNet's convention)."""
    from references.op_counter import msdnet_exit_macs

    torch.manual_seed(0)
    for model in (msdnet_cifar(10, 4, channels=8).eval(),
                  msdnet_cifar(10, 4, base=1, step=1, step_mode="lin_grow", channels=4, growth_rate=2).eval()):
        x = torch.randn(1, 3, 32, 32)
        heads = model.exit_stages()[1]
        linears = [[m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1] for head in heads]
        reference = msdnet_exit_macs(model, x, linears)
        assert mw.exit_costs(model, x, executed=True).macs == reference
        default = mw.exit_costs(model, x).macs
        assert default[-1] == reference[-1] and default[0] < reference[0]
        assert all(d <= r for d, r in zip(default, reference))
