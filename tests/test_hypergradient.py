"""The fast backends against higher, finite differences and each other; schedules; fallbacks."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net
from metaweight._optimizers import lookahead_update
from test_weighter import F64, OPTIMIZERS, rel_err, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from msdnet import msdnet_cifar  # noqa: E402


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lookahead_update_is_a_real_optimizer_step(opt_name):
    model, optimizer, *_ = setup(opt_name)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    grads[3] = None  # a parameter with no gradient is skipped, as torch does
    new, _ = lookahead_update(optimizer, params, grads)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p, q in zip(params, new):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "weight_decay": 0.05}])
def test_a_fused_adams_step_counts_are_read_on_the_device_giving_the_host_s_numbers(kind, options, monkeypatch):
    """A fused Adam keeps its step counts on the parameters' device: with ``device_counts`` the look-ahead takes
    each parameter's bias corrections from its own count there (the counts differ: a parameter that went
    without a gradient for a step lags), with no read back to the host, and gives the numbers of the counts
    read back (the reference: the same function reading them) and of the optimizer's own step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 3))
    optimizer = kind(model.parameters(), lr=0.01, fused=True, **options)
    params = list(model.parameters())
    for i in range(6):
        model.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        if i in (1, 4):
            params[3].grad = None  # (its count lags by two)
        if i == 2:
            params[5].grad = None
        optimizer.step()
    assert len({int(optimizer.state[p]["step"]) for p in params}) == 3
    grads = [torch.randn_like(p) for p in params]
    grads[1] = None  # a parameter with no gradient: left where it is
    reference = lookahead_update(optimizer, params, grads)

    def no_read(*args, **kwargs):
        raise AssertionError("read back to the host")
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    monkeypatch.setattr(torch.Tensor, "__float__", no_read)
    monkeypatch.setattr(torch.Tensor, "__int__", no_read)
    with torch.profiler.profile() as prof:
        new, jac = lookahead_update(optimizer, params, grads, device_counts=True)
    monkeypatch.undo()
    assert not [e for e in prof.events() if e.name == "aten::_local_scalar_dense"]
    for a, b in zip(reference[0] + reference[1], new + jac):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p, q in zip(params, new):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lookahead_jacobian_matches_finite_differences(opt_name):
    model, optimizer, *_ = setup(opt_name)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    _, jac = lookahead_update(optimizer, params, grads)
    h = 1e-7
    for i, (p, g) in enumerate(zip(params, grads)):
        plus, _ = lookahead_update(optimizer, params, [x + h if j == i else x for j, x in enumerate(grads)])
        minus, _ = lookahead_update(optimizer, params, [x - h if j == i else x for j, x in enumerate(grads)])
        fd = -(plus[i] - minus[i]) / (2 * h)  # theta' = theta - U(g): dU/dg
        assert torch.allclose(torch.as_tensor(jac[i], dtype=F64).expand_as(fd), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_jvp_agrees_with_higher_and_finite_difference_backend_within_2e_2(opt_name):
    grads = {}
    for backend in ("higher", "jvp", "finite_difference"):
        torch.manual_seed(1)
        model, optimizer, criterion, validation, weighter = setup(opt_name, backend=backend)
        grads[backend] = weighter.meta_step(batch(dtype=F64), batch(n=12, dtype=F64))["gamma_grad"]
    assert rel_err(grads["jvp"], grads["higher"]) < 1e-4
    assert rel_err(grads["finite_difference"], grads["higher"]) < 2e-2


def dropout_net():
    return mw.MultiExit([nn.Sequential(nn.Linear(6, 10), nn.Dropout(0.3), nn.Tanh()),
                         nn.Sequential(nn.Linear(10, 10), nn.Dropout(0.3), nn.Tanh())],
                        [nn.Linear(10, 5), nn.Linear(10, 5)]).double()


def test_dropout_masks_are_replayed_so_jvp_equals_higher():
    """The jvp pass must see the dropout masks of the forward whose gradient it differentiates."""
    out = {}
    for backend in ("higher", "jvp"):
        torch.manual_seed(0)
        model = dropout_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), backend=backend)
        torch.manual_seed(5)
        out[backend] = w.meta_step(batch(dtype=F64), batch(dtype=F64))["gamma_grad"]
        out[backend + "_rng"] = torch.rand(3)  # the RNG stream after the meta step is the same too
    assert rel_err(out["jvp"], out["higher"]) < 1e-6
    assert torch.equal(out["jvp_rng"], out["higher_rng"])


def test_msdnet_jvp_agrees_with_higher():
    grads = {}
    for backend in ("higher", "jvp", "finite_difference"):
        torch.manual_seed(0)
        net = msdnet_cifar(10, 3, channels=4, growth_rate=2).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        x, y = torch.randn(6, 3, 32, 32, dtype=F64), torch.randint(0, 10, (6,))
        opt.zero_grad(); sum(nn.functional.cross_entropy(z, y) for z in net(x)).backward(); opt.step()
        w = mw.preset("hdkd", 3).weighter(net, opt, backend=backend)
        grads[backend] = w.meta_step((x, y), (torch.randn(6, 3, 32, 32, dtype=F64), torch.randint(0, 10, (6,))))["gamma_grad"]
    assert rel_err(grads["jvp"], grads["higher"]) < 1e-4
    assert rel_err(grads["finite_difference"], grads["higher"]) < 2e-2


def test_lookahead_params_subset_matches_a_real_step_of_that_subset():
    model, optimizer, criterion, validation, weighter = setup(
        "nesterov_wd", lookahead_params=lambda name: name.startswith("heads."))
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = weighter.gamma.detach().clone()

    def objective(g):
        m, o = copy.deepcopy((model, optimizer))
        o.zero_grad()
        (g * criterion(m(train[0]), train[1])).sum().backward()
        for name, p in m.named_parameters():
            if not name.startswith("heads."):
                p.grad = None  # torch skips parameters without a gradient
        o.step()
        with torch.no_grad():
            return float(validation(m(val[0]), val[1]))

    ref = torch.zeros(len(gamma), dtype=F64)
    for k in range(len(gamma)):
        e = torch.zeros(len(gamma), dtype=F64); e[k] = 1e-6
        ref[k] = (objective(gamma.to(F64) + e) - objective(gamma.to(F64) - e)) / 2e-6
    got = weighter.meta_step(train, val)["gamma_grad"]
    assert rel_err(got, ref) < 1e-6


def test_meta_every_runs_the_look_ahead_on_every_nth_call():
    model, optimizer, criterion, validation, weighter = setup("sgd", meta_every=3)
    ran = [weighter.meta_step(batch(dtype=F64), batch(dtype=F64)).ran for _ in range(7)]
    assert ran == [True, False, False, True, False, False, True]
    assert weighter.num_meta_steps == 3


def test_unknown_optimizer_falls_back_to_higher_with_a_warning():
    model = tiny_net(2)
    with pytest.warns(UserWarning, match="falling back to backend='higher' for `Adagrad`") as caught:
        w = mw.HarmonizedWeighter(model, torch.optim.Adagrad(model.parameters(), lr=0.01), mw.DenseDistillLoss(2))
    assert {c.filename for c in caught} == {__file__}  # the caller's line, not ours
    assert w.backend == "higher"
    assert w.meta_step(batch(), batch())["gamma_grad"].abs().sum() > 0


@pytest.mark.parametrize("reuse", [False, True])
def test_failed_step_restores_batchnorm_statistics(reuse):
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", reuse_forward=reuse)
    before = copy.deepcopy(model.state_dict())
    x, y = batch(dtype=F64)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite"):
        weighter.step((x, y), batch(dtype=F64))
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k


class TiedHeads(nn.Module):
    """One module registered under two names, and one Parameter shared by two modules (tied embeddings)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.again = self.block  # the same module under a second name, as [layer] * 2 in a ModuleList
        self.embed = nn.Linear(6, 6, bias=False)
        self.head1 = nn.Linear(6, 5)
        self.head2 = nn.Linear(6, 5)
        self.head2.weight = self.head1.weight  # shared across two modules

    def forward(self, x):
        a = torch.tanh(self.block(self.embed(x)))
        b = torch.tanh(self.again(a))
        return [self.head1(a), self.head2(b)]


@pytest.mark.parametrize("backend", ["jvp", "finite_difference"])
def test_tied_weights_are_restored_and_the_meta_gradient_is_right(backend):
    grads = {}
    for name in ("higher", backend):
        torch.manual_seed(0)
        model = TiedHeads().double()
        params_before = {n: p for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), backend=name)
        grads[name] = w.meta_step(batch(dtype=F64), batch(dtype=F64))["gamma_grad"]
        assert all(p is params_before[n] and isinstance(p, nn.Parameter) for n, p in model.named_parameters())
        assert model.head2.weight is model.head1.weight
        w.step(batch(dtype=F64), batch(dtype=F64))  # and the model still trains
    assert rel_err(grads[backend], grads["higher"]) < (1e-6 if backend == "jvp" else 1e-4)
