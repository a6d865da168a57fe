"""BalancedValidation against Eq. 9/10 written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import metaweight as mw


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_objective_is_eq10_against_the_moving_average():
    v = mw.BalancedValidation(3, alpha=0.3, momentum=0.9)
    history = [torch.tensor([2.0, 1.5, 1.0]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 0.5, 0.25])]
    expected = None
    for losses in history:
        v.update(losses)
        expected = losses.tolist() if expected is None else [0.9 * e + 0.1 * l for e, l in zip(expected, losses.tolist())]
    assert v.expected.tolist() == pytest.approx(expected, rel=1e-6)
    assert int(v.num_updates) == 3
    current = [1.2, 0.9, 0.4]
    want = 0.3 * sum(current) + 0.7 * sum(softplus(c / e - 1) for c, e in zip(current, expected))
    assert float(v.objective(torch.tensor(current))) == pytest.approx(want, rel=1e-6)


def test_first_value_stands_in_then_initialises():
    v = mw.BalancedValidation(2, alpha=0.5)
    losses = torch.tensor([2.0, 1.0], requires_grad=True)
    obj = v.objective(losses)
    assert obj.item() == pytest.approx(0.5 * 3.0 + 0.5 * 2 * math.log(2.0))
    # the stand-in average is a constant: d/dl softplus(l/E - 1) = sigmoid(0)/E
    (g,) = torch.autograd.grad(obj, losses)
    assert g.tolist() == pytest.approx([0.5 + 0.5 * 0.5 / 2.0, 0.5 + 0.5 * 0.5 / 1.0])
    assert not v.initialized
    v.update(losses)
    assert v.initialized and v.expected.tolist() == [2.0, 1.0]


def test_forward_does_not_update_and_alpha_one_is_summed_ce():
    logits = [torch.randn(10, 4) for _ in range(3)]
    y = torch.randint(0, 4, (10,))
    v = mw.BalancedValidation(3, alpha=1.0)
    got = v(logits, y)
    assert float(got) == pytest.approx(sum(float(F.cross_entropy(z, y)) for z in logits), rel=1e-6)
    assert not v.initialized


def test_update_refuses_nan_and_keeps_the_average():
    v = mw.BalancedValidation(2)
    v.update(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        v.update(torch.tensor([float("nan"), 1.0]))
    assert v.expected.tolist() == [1.0, 2.0] and int(v.num_updates) == 1


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"alpha": -0.1}, {"momentum": 1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        mw.BalancedValidation(3, **kwargs)
