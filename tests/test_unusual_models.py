"""Models whose structure the look-ahead must handle or refuse by name: spectral_norm beside BatchNorm, a step
in a worker thread, bare containers and submodules built in forward under ``higher``, a tensor held both as a
parameter and as a buffer."""

import concurrent.futures
import copy
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

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


class _Gate(torch.nn.Module):
    """Identity; in the first tangent forward (the jvp's) it says so and waits up to a second for ``go``."""

    def __init__(self, inside: threading.Event, go: threading.Event) -> None:
        super().__init__()
        self.inside, self.go = inside, go

    def forward(self, x):
        if fwAD.unpack_dual(x).tangent is not None and not self.inside.is_set():
            self.inside.set()
            self.go.wait(1.0)
        return x


def _gated_step(inside, go):
    torch.manual_seed(0)
    model = tiny_net(3, dtype=F64)
    model.stages[0].append(_Gate(inside, go))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0),
                                     mw.BalancedValidation(3), init=GAMMA, gamma_optimizer="sgd")
    torch.manual_seed(1)
    return weighter.step(batch(dtype=F64), batch(dtype=F64)).gamma_grad


def test_jvp_steps_in_two_threads_at_once_give_the_main_thread_s_gamma_gradient():
    # torch's forward-AD level is process-wide: a step's tangent forward while another thread's was open failed
    # with "Nested forward mode AD is not supported at the moment" (two weighters in a thread pool). A worker
    # holds its tangent forward open (the gate) while the main thread steps; both must equal the main thread's
    # own steps, one after the other.
    done = threading.Event()
    done.set()
    expected = _gated_step(done, done)
    inside, go = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        worker = pool.submit(_gated_step, inside, go)
        assert inside.wait(30)
        try:
            here = _gated_step(done, done)  # waits for the worker's level to close (the gate's 1 s)
        finally:
            go.set()
        there = worker.result()
    assert torch.equal(here, expected) and torch.equal(there, expected)


class _Grouped(torch.nn.Module):
    """A bare ``nn.Module()`` grouping a layer (and an empty one): higher's patched class for ``nn.Module`` itself
    had no consistent MRO (a ``TypeError``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net(3, dtype=F64, batchnorm=False)
        self.group = torch.nn.Module()
        self.group.mix = torch.nn.Linear(5, 5).to(F64)
        self.empty = torch.nn.Module()

    def forward(self, x):
        return [o + 0.1 * self.group.mix(o) for o in self.net(x)]


class _BuiltInForward(torch.nn.Module):
    """Builds a submodule at its first call: higher's copy cannot run it (an ``AttributeError`` on
    ``_param_names``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net(3, dtype=F64, batchnorm=False)

    def forward(self, x):
        if not hasattr(self, "made"):
            self.made = torch.nn.Identity()
        return [self.made(o) for o in self.net(x)]


def _weighter(model, backend):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return optimizer, mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0),
                                            mw.BalancedValidation(3), init=GAMMA, backend=backend)


def test_higher_runs_a_model_holding_bare_module_containers_as_jvp_does():
    train, val = batch(dtype=F64), batch(dtype=F64)
    grads = {}
    for backend in ("jvp", "higher"):
        torch.manual_seed(0)
        model = _Grouped()
        _, weighter = _weighter(model, backend)
        grads[backend] = weighter.step(train, val).gamma_grad
        assert type(model.group) is torch.nn.Module and type(model.empty) is torch.nn.Module  # (put back)
    assert rel_err(grads["higher"], grads["jvp"]) < 1e-10


def test_higher_refuses_a_submodule_built_in_forward_by_name_changing_nothing():
    from test_loop_features import same, state
    model = _BuiltInForward()
    optimizer, weighter = _weighter(model, "higher")
    before = state(model, optimizer, weighter)
    with pytest.raises(ValueError, match=r"forward built a submodule \(made = Identity.*Build it in __init__"):
        weighter.step(batch(dtype=F64), batch(dtype=F64))
    assert same(before, state(model, optimizer, weighter)) and not hasattr(model, "made")
    assert all(p.grad is None for p in model.parameters())


class _Aliased(torch.nn.Module):
    """A parameter also registered as a buffer (the same tensor object)."""

    def __init__(self, alias: bool = True) -> None:
        super().__init__()
        self.net = tiny_net(3, dtype=F64, batchnorm=False)
        self.scale = torch.nn.Parameter(torch.ones(5, dtype=F64))
        if alias:
            self.register_buffer("scale_copy", self.scale)

    def forward(self, x):
        return [o * self.scale for o in self.net(x)]


_ALIASED = r"parameter `scale` is buffer `scale_copy`.*Hold it once.*backend='higher' with mode='exact'"


@pytest.mark.parametrize("backend, mode", [("jvp", "exact"), ("finite_difference", "exact"), ("jvp", "fast"),
                                           ("higher", "fast")])
def test_a_tensor_both_parameter_and_buffer_is_refused_by_name_at_construction(backend, mode):
    # (torch's functional_call said "got multiple values for keys ['scale', 'scale_copy'], which are tied")
    model = _Aliased()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    with pytest.raises(ValueError, match=_ALIASED):
        mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0), backend=backend, mode=mode)


def test_a_tensor_made_both_parameter_and_buffer_after_construction_is_refused_by_step_changing_nothing():
    from test_loop_features import same, state
    model = _Aliased(alias=False)
    optimizer, weighter = _weighter(model, "jvp")
    model.register_buffer("scale_copy", model.scale)
    before = state(model, optimizer, weighter)
    with pytest.raises(ValueError, match=_ALIASED):
        weighter.step(batch(dtype=F64), batch(dtype=F64))
    assert same(before, state(model, optimizer, weighter)) and model.scale_copy is model.scale


@pytest.mark.parametrize("backend, mode", [("jvp", "exact"), ("finite_difference", "exact"), ("higher", "exact"),
                                           ("jvp", "fast")])
def test_the_legacy_spectral_norm_is_refused_pointing_to_its_parametrization(backend, mode):
    # Each path refused it with the fix of another: higher its forward hooks (use jvp), jvp and finite_difference
    # a stop-gradient found by the gradient check (use higher), fast step() likewise.
    model = tiny_net(3, dtype=F64, batchnorm=False)
    for stage in model.stages:
        stage[0] = torch.nn.utils.spectral_norm(stage[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    with pytest.raises(ValueError, match=r"\['stages.0.0', 'stages.1.0', 'stages.2.0'\] use the legacy "
                                         r"torch.nn.utils.spectral_norm.*parametrizations.spectral_norm"):
        mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0), backend=backend, mode=mode)


class _Encoder(nn.Module):
    """Two tasks on a plain nn.TransformerEncoder: on the CPU its attention is torch's fused kernel
    (``_scaled_dot_product_flash_attention_for_cpu``), with neither a forward-mode nor a second derivative."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                             enable_nested_tensor=False)
        self.classify, self.regress = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x):
        h = self.encoder(self.embed(x)).mean(1)
        return self.classify(h), self.regress(h).squeeze(-1)


class _TwoTasks(nn.Module):
    term_names = ("ce", "mse")

    def forward(self, outputs, target):
        return torch.stack([F.cross_entropy(outputs[0], target[0]), F.mse_loss(outputs[1], target[1])])


def _two_tasks_objective(outputs, target):
    return F.cross_entropy(outputs[0], target[0]) + F.mse_loss(outputs[1], target[1])


def test_fused_attention_is_refused_by_both_exact_backends_saying_what_works():
    """torch's fused attention has no forward-mode derivative (jvp) and no second derivative (higher): jvp's refusal
    sent the user to backend='higher', which then failed with autograd's bare RuntimeError (helper-165). Both refuse
    with a ValueError naming the kernel, the MATH kernel and mode='fast', changing nothing; under
    sdpa_kernel(SDPBackend.MATH) the two exact backends give the same meta-gradient, and mode='fast' runs as it is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    train = (torch.randint(0, 10, (8, 5), generator=g), (torch.randint(0, 3, (8,), generator=g), torch.randn(8)))
    val = (torch.randint(0, 10, (8, 5), generator=g), (torch.randint(0, 3, (8,), generator=g), torch.randn(8)))
    before = copy.deepcopy(model.state_dict())
    grads = {}
    for backend in ("jvp", "higher"):
        w = mw.HarmonizedWeighter(model, optimizer, _TwoTasks(), _two_tasks_objective, backend=backend)
        with pytest.raises(ValueError, match=r"fused attention kernels.*SDPBackend\.MATH.*mode='fast'"):
            w.meta_step(train, val)
        assert w.gamma_dict() == {"ce": 1.0, "mse": 1.0}
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        with sdpa_kernel(SDPBackend.MATH):
            grads[backend] = w.meta_step(train, val).gamma_grad
    assert torch.allclose(grads["jvp"], grads["higher"], rtol=1e-4, atol=1e-7)
    fast = mw.HarmonizedWeighter(model, optimizer, _TwoTasks(), _two_tasks_objective, mode="fast")
    assert fast.step(train, val).ran
