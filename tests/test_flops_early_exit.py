"""FLOPs per exit against a hand count; early exit against the full forward."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight as mw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def test_exit_costs_match_a_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # 8x8 output: 8*8 * 8 * 3*3*3 multiply-adds
    net = mw.MultiExit(
        [nn.Sequential(conv, nn.ReLU()), nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 4, 1))],
        [nn.Sequential(nn.Flatten(), nn.Linear(8 * 64, 5)), nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 5))])
    costs = mw.exit_costs(net, torch.randn(1, 3, 8, 8))
    stage1, head1 = 64 * 8 * 27, 8 * 64 * 5
    stage2, head2 = 16 * 4 * 8, 4 * 16 * 5
    assert costs.macs == [stage1 + head1, stage1 + head1 + stage2 + head2]
    assert costs.incremental_macs == [stage1 + head1, stage2 + head2]
    p = [sum(x.numel() for x in m.parameters()) for m in (net.stages[0], net.heads[0], net.stages[1], net.heads[1])]
    assert costs.params == [p[0] + p[1], sum(p)]
    assert costs.flops == [2 * m for m in costs.macs]


def test_exit_costs_are_per_sample_and_sum_to_the_flop_counter_total():
    from torch.utils.flop_counter import FlopCounterMode

    net = msdnet_cifar(10, 3, channels=4, growth_rate=2).eval()
    one = mw.exit_costs(net, torch.randn(1, 3, 32, 32))
    four = mw.exit_costs(net, torch.randn(4, 3, 32, 32))
    assert one.macs == four.macs
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 32, 32))
    assert one.flops[-1] == counter.get_total_flops()
    assert one.params[-1] == sum(p.numel() for p in net.parameters())


def test_shared_trunk_counted_once_when_a_head_reads_an_earlier_stage():
    """A model that is not a chain: exit 2 also reads stage 1's features; stage 1 counts once."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.s1, self.s2 = nn.Linear(6, 6), nn.Linear(6, 6)
            self.h1, self.h2 = nn.Linear(6, 2), nn.Linear(12, 2)

        def forward(self, x):
            a = self.s1(x)
            b = self.s2(a)
            return [self.h1(a), self.h2(torch.cat([a, b], 1))]

    costs = mw.exit_costs(Net(), torch.randn(1, 6))
    assert costs.macs == [36 + 12, 36 + 12 + 36 + 24]


def full_forward_first_exit(model, x, thresholds):
    with torch.no_grad():
        logits = torch.stack(model(x))
    first, prediction = mw.exit_assignment(logits, thresholds)
    return prediction, first


@pytest.mark.parametrize("make", [lambda: msdnet_cifar(10, 4, channels=4, growth_rate=2),
                                  lambda: branchynet(10, 3, num_exits=3, width=8)])
def test_early_exit_equals_first_exit_over_threshold_of_the_full_forward(make):
    net = make().double().eval()
    x = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(net(x))
    K = logits.shape[0]
    for q in (0.3, 1.0, 2.0):
        T = mw.find_thresholds(logits[:, :20], mw.geometric_exit_distribution(q, K))
        predictions, exits = mw.EarlyExit(net, T)(x)
        ref_pred, ref_exit = full_forward_first_exit(net, x, T)
        assert torch.equal(exits, ref_exit) and torch.equal(predictions, ref_pred)
        assert len(set(exits.tolist())) > 1 or q == 0.3


def test_early_exit_needs_exposed_stages():
    with pytest.raises(TypeError, match="stages"):
        mw.EarlyExit(nn.Linear(3, 3), [0.5])
    with pytest.raises(ValueError, match="2 thresholds"):
        mw.EarlyExit(mw.MultiExit([nn.Identity()] * 2, [nn.Identity()] * 2), [0.5])
