"""mode="fast": the model's step with the gamma it had is the look-ahead. Its meta-gradient against an
independent brute force of its own definition; the model after a fast step against a plain step."""

import copy

import pytest
import torch
from torch.func import functional_call

import metaweight as mw
from conftest import batch, tiny_net
from test_weighter import F64, OPTIMIZERS, rel_err


def setup(opt_name, mode):
    torch.manual_seed(0)
    model = tiny_net(3, dtype=F64)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    for _ in range(2):  # real optimizer state
        x, y = batch(dtype=F64)
        optimizer.zero_grad()
        sum(torch.nn.functional.cross_entropy(z, y) for z in model(x)).backward()
        optimizer.step()
    criterion, validation = mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3)
    validation.update(torch.tensor([1.7, 1.6, 1.5], dtype=F64))
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode=mode, gamma_optimizer="sgd",
                              gamma_lr=0.05, init=torch.tensor([1.0, 0.7, 1.3, 0.5, 0.9, 1.1]))
    return model, optimizer, criterion, validation, w


@pytest.mark.parametrize("opt_name", ["sgd", "nesterov_wd", "adam", "adamw"])
def test_fast_step_moves_the_model_exactly_as_a_plain_step_with_the_old_gamma(opt_name):
    model, optimizer, criterion, _, w = setup(opt_name, "fast")
    twin, twin_opt = copy.deepcopy((model, optimizer))
    gamma = w.gamma.detach().clone()
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    record = w.step(train, val)
    twin_opt.zero_grad()
    (gamma.to(F64) * criterion(twin(train[0]), train[1])).sum().backward()
    twin_opt.step()
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n  # parameters and BatchNorm statistics, bitwise
    assert str(optimizer.state_dict()) == str(twin_opt.state_dict())
    assert record.ran and not torch.equal(w.gamma, gamma)  # gamma changed, for the next step


def test_fast_meta_gradient_equals_a_brute_force_of_its_definition():
    """theta' = a real SGD step with the old gamma; v = grad L_val(theta'); D = lr (1 + mu) for Nesterov
    (lr * c by hand); the derivative at theta from per-term gradients: -<D v, grad L_k(theta)>."""
    model, optimizer, criterion, validation, w = setup("nesterov_wd", "fast")
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = w.gamma.detach().clone().to(F64)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    terms = criterion(functional_call(model, (params, buffers), (train[0],)), train[1])
    per_term = [torch.autograd.grad(terms[k], list(params.values()), retain_graph=True) for k in range(6)]
    moved, moved_opt = copy.deepcopy((model, optimizer))
    moved_opt.zero_grad()
    (gamma * criterion(moved(train[0]), train[1])).sum().backward()
    moved_opt.step()
    mparams = dict(moved.named_parameters())
    objective = validation(functional_call(moved, (mparams, {k: v.clone() for k, v in model.named_buffers()}),
                                           (val[0],)), val[1])
    v = torch.autograd.grad(objective, list(mparams.values()))
    group = optimizer.param_groups[0]
    c = group["lr"] * (1 + group["momentum"])  # Nesterov, dampening 0, after the first step
    ref = torch.stack([-c * sum((vi * gi).sum() for vi, gi in zip(v, per_term[k])) for k in range(6)])
    record = w.step(train, val)
    assert ref.norm() > 0
    # one-sided difference with h = sqrt(eps) x RMS(theta) / |w|: O(h) error, ~1e-7 relative in float64
    assert rel_err(record.gamma_grad, ref) < 1e-5


def test_fast_mode_refuses_the_two_call_form_and_what_it_cannot_replay():
    model, optimizer, _, _, w = setup("sgd", "fast")
    with pytest.raises(ValueError, match="mode='fast'.*step"):
        w.meta_step(batch(dtype=F64), batch(dtype=F64))
    with pytest.raises(ValueError, match="closed form"):
        mw.HarmonizedWeighter(model, torch.optim.RMSprop(model.parameters()), mw.DenseDistillLoss(3), mode="fast")
    with pytest.raises(ValueError, match="mode"):
        mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="quick")


def test_fast_mode_trains_and_skips_bad_batches_without_losing_anything():
    from test_errors import assert_same, snapshot

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                              meta_every=2)
    for _ in range(4):
        w.step(batch(), batch())
    assert w.num_meta_steps == 2
    before = snapshot(model, optimizer, w)
    x, y = batch()
    x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="Skipped"):
        assert w.step((x, y), batch()).model_step_skipped
    assert_same(before, snapshot(model, optimizer, w))
