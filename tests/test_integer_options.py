"""Every public integer option takes what NumPy arithmetic and torch give for an integer (a NumPy
integer scalar, a 0-d integer tensor) as it takes a Python int, through the one rule
(``integer_value``); bools and floats are refused with the option named."""

import numpy as np
import pytest
import torch

import metaweight as mw


def _multiexit():
    return mw.MultiExit([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])


def _weighter(cls, **options):
    net = _multiexit()
    return cls(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2), **options)


LABELS = torch.arange(64) % 4
LOGITS = torch.randn(3, 64, 4, generator=torch.Generator().manual_seed(0)) + 2 * torch.nn.functional.one_hot(LABELS, 4)

# (option, a call taking its value, a good value); each must accept the value as an int, a NumPy
# integer and a 0-d integer tensor, and refuse a bool and a float
OPTIONS = [
    ("num_exits", lambda v: mw.geometric_exit_distribution(0.5, v), 3),
    ("iterations", lambda v: mw.thresholds_for_budget(LOGITS, LABELS, [1, 2, 3], 2.0, iterations=v), 20),
    ("candidates", lambda v: mw.thresholds_for_accuracy(LOGITS, LABELS, 0.1, candidates=v), 20),
    ("seed", lambda v: _weighter(mw.RLW, seed=v), 3),
    ("window", lambda v: _weighter(mw.DWA, window=v), 2),
    ("meta_every", lambda v: _weighter(mw.HarmonizedWeighter, meta_every=v), 2),
    ("num_exits", lambda v: mw.DenseDistillLoss(v), 2),
    ("iterations", lambda v: mw.fit_temperatures(LOGITS, LABELS, iterations=v), 5),
    ("bins", lambda v: mw.expected_calibration_error(LOGITS, LABELS, bins=v), 10),
    ("num_exits", lambda v: mw.exit_costs(_multiexit(), torch.randn(1, 4), num_exits=v), 2),
]


@pytest.mark.parametrize("name, call, good", OPTIONS, ids=[f"{o[0]}-{i}" for i, o in enumerate(OPTIONS)])
def test_integer_options_take_numpy_and_tensor_integers(name, call, good):
    for value in (good, np.int64(good), np.int32(good), torch.tensor(good)):
        call(value)
    for bad in (True, float(good), torch.tensor(float(good)), torch.tensor([good, good])):
        with pytest.raises((ValueError, TypeError), match=name):
            call(bad)


def test_integer_options_are_kept_as_python_ints():
    """A NumPy or tensor integer is stored as the int it holds, not as the object given."""
    assert type(_weighter(mw.RLW, seed=np.int64(3)).seed) is int
    assert type(_weighter(mw.DWA, window=torch.tensor(2)).window) is int
    assert mw.geometric_exit_distribution(0.5, torch.tensor(3)).shape == (3,)
