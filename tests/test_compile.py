"""torch.compile: a compiled model trains with every backend; the look-ahead runs the module eagerly."""

import copy

import pytest
import torch

import metaweight as mw
from conftest import batch, tiny_net
from test_weighter import rel_err


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
@pytest.mark.parametrize("backend", ["jvp", "finite_difference", "higher"])
def test_compiled_model_trains_like_the_eager_one(backend):
    torch.manual_seed(0)
    eager = tiny_net(3)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    weighters = [mw.HarmonizedWeighter(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                       mw.DenseDistillLoss(3), gamma_lr=0.05, backend=backend)
                 for m in (eager, compiled)]
    assert weighters[1].module is twin  # the look-ahead's module: the one under torch.compile
    for _ in range(3):
        train, val = batch(), batch()
        records = [w.step(train, val) for w in weighters]
    # same meta-gradients and weights up to the compiled kernels' rounding (amplified by finite differences)
    assert rel_err(records[1].gamma_grad, records[0].gamma_grad) < (5e-2 if backend == "finite_difference" else 1e-4)
    assert torch.allclose(weighters[0].gamma, weighters[1].gamma, atol=1e-3 if backend == "finite_difference" else 1e-5)
    for p, q in zip(eager.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    logits, labels = mw.collect_logits(compiled, [batch()])
    assert logits.shape == (3, 16, 5)


def test_early_exit_and_costs_on_a_compiled_model():
    torch.manual_seed(0)
    model = tiny_net(3).eval()
    compiled = torch.compile(model)
    x = torch.randn(12, 6)
    thresholds = torch.tensor([0.3, 0.3, -1.0])
    predictions, exits = mw.EarlyExit(compiled, thresholds)(x)
    with torch.no_grad():
        expected_exits, expected = mw.exit_assignment(torch.stack(model(x)), thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    assert mw.exit_costs(compiled, x[:1]).macs == mw.exit_costs(model, x[:1]).macs
