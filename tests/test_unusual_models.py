"""Models whose structure the look-ahead must handle or refuse by name: spectral_norm beside BatchNorm, a step
in a worker thread, bare containers and submodules built in forward under ``higher``, a tensor held both as a
parameter and as a buffer."""

import pytest
import torch

import metaweight as mw
from conftest import batch, quiet, tiny_net
from test_compile import _real_step_meta_gradient, _val_objective
from test_weighter import rel_err

F64 = torch.float64
GAMMA = [1.0, 0.7, 1.3, 0.5, 0.9, 1.1]


def _spectral_bn_net():
    """tiny_net with BatchNorm, each stage's Linear under parametrizations.spectral_norm."""
    model = tiny_net(3, dtype=F64, batchnorm=True)
    for stage in model.stages:
        stage[0] = torch.nn.utils.parametrizations.spectral_norm(stage[0])
    return model


@pytest.mark.parametrize("backend, mode", [("jvp", "exact"), ("finite_difference", "exact"), ("jvp", "fast")])
def test_spectral_norm_beside_batchnorm_is_the_real_step_s_meta_gradient(backend, mode):
    # The look-ahead's buffers were views of one flat storage, sharing one version counter: the power
    # iteration's in-place write to u made autograd refuse the running mean BatchNorm saved from another view
    # ("modified by an inplace operation") in the jvp and finite_difference paths, and in mode='fast' step().
    # Reference: central differences in float64 of the validation objective after the real SGD step on copies
    # (the weighter is 1.5e-7 off, as on the net without spectral_norm: 1.0e-7; the reference's own error).
    model = _spectral_bn_net()
    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    train, val = batch(dtype=F64), batch(dtype=F64)
    expected = torch.tensor(_real_step_meta_gradient(model, GAMMA, criterion, train, val))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    weighter = mw.HarmonizedWeighter(model, optimizer, criterion, _val_objective, init=GAMMA, backend=backend,
                                     mode=mode)
    with quiet():  # (spectral_norm's buffers change in the forward: fast mode may warn)
        record = weighter.step(train, val)
    assert rel_err(record.gamma_grad, expected) < 1e-5

