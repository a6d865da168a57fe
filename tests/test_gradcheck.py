"""Stop-gradients and custom backwards inside the model (issue 21): right or refused.

Every spelling of a stop-gradient a model may hold, in every mode and backend: the meta-gradient
of ``step()`` is compared with central differences of the validation objective after real SGD
steps on copies of the model (the step autograd's gradients take), float64. A model the check
accepts must be right; one it refuses must have been wrong without the check
(``check_gradients=False``), and the refusal changes nothing.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

import metaweight as mw

F64 = torch.float64
LR = 0.1
GAMMA = [1.0, 0.8, 0.6, 1.2, 0.9, 0.7]  # DenseDistillLoss(3): 3 CE and 3 KD terms


class HalfBackward(torch.autograd.Function):
    """A custom backward that is not the derivative of the forward (half of it); no jvp."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class RightBackward(torch.autograd.Function):
    """A custom Function whose backward and jvp are the derivative of its forward: right."""

    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return tangent * (s + x * s * (1 - s))


def stop(spelling: str, h: torch.Tensor) -> torch.Tensor:
    """The features the first two exits read, through one spelling of a stop-gradient."""
    if spelling == "detach":
        return h.detach()
    if spelling == "data":
        return h.data
    if spelling == "detach_":
        return h.clone().detach_()
    if spelling == "gradient equilibrium":
        return 0.5 * h + 0.5 * h.detach()
    if spelling == "item rescale":
        return h / h.norm().item()
    if spelling == "no_grad rescale":
        with torch.no_grad():
            scale = h.abs().mean()
        return h / scale
    if spelling == "inference_mode rescale":
        with torch.inference_mode():
            scale = h.abs().mean()
        return h / scale.clone()
    if spelling == "tolist copy":
        return torch.tensor(h.tolist(), dtype=h.dtype)
    if spelling == "numpy copy":
        return torch.from_numpy(np.array(h.detach().numpy()))
    if spelling == "straight-through":
        return h + (torch.round(h * 4) / 4 - h).detach()
    if spelling == "custom backward":
        return HalfBackward.apply(h)
    if spelling == "custom, right backward":  # right: accepted
        return RightBackward.apply(h)
    assert spelling == "none"
    return h


class Net(nn.Module):
    """The issue's 3-exit MLP (Linear 6->8->8->8, tanh, heads 8->4); ``spelling`` on the first two exits."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.blocks = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleList([nn.Linear(8, 4) for _ in range(3)])

    def forward(self, x):
        outputs, h = [], x
        for i, (block, head) in enumerate(zip(self.blocks, self.heads)):
            h = torch.tanh(block(h))
            outputs.append(head(stop(self.spelling, h) if i < 2 else h))
        return outputs


SPELLINGS = ["detach", "data", "detach_", "gradient equilibrium", "item rescale", "no_grad rescale",
             "inference_mode rescale", "tolist copy", "numpy copy", "straight-through", "custom backward"]
RIGHT = ["none", "custom, right backward"]
FORMS = [("exact", "jvp"), ("exact", "finite_difference"), ("exact", "higher"), ("fast", "jvp")]


def data():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g, dtype=F64), torch.randint(0, 4, (16,), generator=g)
    xv, yv = torch.randn(16, 6, generator=g, dtype=F64), torch.randint(0, 4, (16,), generator=g)
    return (x, y), (xv, yv)


def setup(spelling: str, mode: str, backend: str, **kwargs):
    torch.manual_seed(0)
    model = Net(spelling).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    validation = mw.BalancedValidation(3, alpha=1.0)  # the exits' summed cross-entropy
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode=mode, backend=backend,
                              gamma_optimizer="sgd", init=torch.tensor(GAMMA, dtype=F64), **kwargs)
    return model, optimizer, criterion, validation, w


def reference(model, criterion, validation, train, val, delta: float = 1e-5) -> torch.Tensor:
    """d L_val(theta') / d gamma by central differences, theta' = one real SGD step of autograd's
    gradients of sum_k gamma_k L_k at theta (the step both modes score)."""
    (x, y), (xv, yv) = train, val

    def after_step(gamma):
        twin = copy.deepcopy(model)
        opt = torch.optim.SGD(twin.parameters(), lr=LR)
        (torch.tensor(gamma, dtype=F64) * criterion(twin(x), y)).sum().backward()
        opt.step()
        with torch.no_grad():
            return float(validation(twin(xv), yv))

    grads = []
    for k in range(len(GAMMA)):
        plus, minus = list(GAMMA), list(GAMMA)
        plus[k] += delta
        minus[k] -= delta
        grads.append((after_step(plus) - after_step(minus)) / (2 * delta))
    return torch.tensor(grads, dtype=F64)


def state(model, optimizer, w):
    return copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict(), w.num_calls,
                          w.num_meta_steps, w.num_skipped))


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode,backend", FORMS)
@pytest.mark.parametrize("spelling", SPELLINGS + RIGHT)
def test_a_stop_gradient_inside_the_model_is_refused_changing_nothing_or_the_meta_gradient_is_right(
        spelling, mode, backend):
    train, val = data()
    model, optimizer, criterion, validation, w = setup(spelling, mode, backend, check_gradients=False)
    ref = reference(model, criterion, validation, train, val)
    unchecked = rel_err(w.step(train, val).gamma_grad, ref)  # what the weighter gives without the check

    model, optimizer, criterion, validation, w = setup(spelling, mode, backend)
    before = state(model, optimizer, w)
    try:
        record = w.step(train, val)
    except ValueError as exc:
        assert "stop-gradient" in str(exc) and "check_gradients=False" in str(exc)
        assert spelling not in RIGHT, str(exc)
        assert unchecked > 1e-3, f"refused, but the meta-gradient was right: {unchecked:.2e}"
        assert same(before, state(model, optimizer, w))
        assert all(p.grad is None for p in model.parameters())
        with pytest.raises(ValueError, match="stop-gradient"):  # refused again: nothing was taken as checked
            w.step(train, val)
        return
    tolerance = 1e-6 if (mode, backend) in (("exact", "jvp"), ("exact", "higher")) else 1e-3
    assert rel_err(record.gamma_grad, ref) < tolerance, (spelling, rel_err(record.gamma_grad, ref))


def test_every_spelling_is_refused_in_some_form_and_each_form_refuses_what_it_gets_wrong():
    """The walk above accepts a right answer; this pins that the stop-gradients are not right by luck:
    each spelling is refused by every form (the validation objective sees the first two exits)."""
    train, val = data()
    for spelling in SPELLINGS:
        for mode, backend in FORMS:
            _, _, _, _, w = setup(spelling, mode, backend)
            with pytest.raises(ValueError, match="stop-gradient"):
                w.step(train, val)


def test_the_two_call_form_and_meta_step_are_checked_too():
    train, val = data()
    model, optimizer, _, _, w = setup("detach", "exact", "jvp")
    before = state(model, optimizer, w)
    with pytest.raises(ValueError, match="validation losses differs"):
        w.meta_step(train, val)
    assert same(before, state(model, optimizer, w))

    model, optimizer, _, _, w = setup("detach", "fast", "jvp")
    loss = w.loss(model(train[0]), train[1])
    loss.backward()
    optimizer.step()
    gamma = w.gamma.clone()
    with pytest.raises(ValueError, match="stop-gradient"):
        w.meta_step(train, val)
    assert torch.equal(gamma, w.gamma) and w.num_meta_steps == 0


def test_a_detached_teacher_inside_the_model_that_the_validation_does_not_score_is_not_refused():
    """A teacher the model detaches itself (the KD target of a criterion of the user's) that the
    validation objective does not read: autograd's step and the jvp's tangent both stop there, so
    backend='jvp' is right, and 'higher' differentiates autograd's step: neither is refused, and both
    give the reference."""

    class WithTeacher(Net):
        def forward(self, x):
            outputs = super().forward(x)
            return outputs, torch.softmax(outputs[2] / 2.0, dim=1).detach()

    def criterion(outputs, target):
        exits, teacher = outputs
        ce = [nn.functional.cross_entropy(o, target) for o in exits]
        kd = [-(teacher * torch.log_softmax(o / 2.0, dim=1)).sum(1).mean() for o in exits[:2]]
        return torch.stack(ce + kd)

    names = ["ce1", "ce2", "ce3", "kd1", "kd2"]
    gamma = torch.tensor(GAMMA[:5], dtype=F64)
    validation = mw.BalancedValidation(3, alpha=1.0)
    train, val = data()
    for backend in ("jvp", "higher"):
        torch.manual_seed(0)
        model = WithTeacher("none").to(F64)
        twin = copy.deepcopy(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, criterion, lambda o, y: validation(o[0], y), term_names=names,
                                  backend=backend, gamma_optimizer="sgd", init=gamma.clone())
        got = w.step(train, val).gamma_grad

        def after_step(g):
            net = copy.deepcopy(twin)
            opt = torch.optim.SGD(net.parameters(), lr=LR)
            (g * criterion(net(train[0]), train[1])).sum().backward()
            opt.step()
            with torch.no_grad():
                return float(validation(net(val[0])[0], val[1]))

        eye = torch.eye(5, dtype=F64) * 1e-5
        ref = torch.tensor([(after_step(gamma + e) - after_step(gamma - e)) / 2e-5 for e in eye], dtype=F64)
        assert rel_err(got, ref) < 1e-6, backend


def test_the_check_runs_once_draws_no_random_numbers_of_the_user_s_and_leaves_buffers_alone():
    train, val = data()

    class WithBatchNormAndDropout(Net):
        def __init__(self):
            super().__init__("none")
            self.bn = nn.BatchNorm1d(8)
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return super().forward(self.drop(x @ torch.ones(6, 6, dtype=x.dtype) / 6))

    runs = []
    for check in (True, False):
        torch.manual_seed(0)
        model = WithBatchNormAndDropout().to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), gamma_optimizer="sgd",
                                  check_gradients=check)
        torch.manual_seed(5)
        records = [w.step(train, val) for _ in range(3)]
        runs.append((torch.rand(()), [r.gamma_grad for r in records], copy.deepcopy(model.state_dict())))
    (r1, g1, s1), (r2, g2, s2) = runs
    assert torch.equal(r1, r2)  # the check put the generators back
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert same(s1, s2)


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype():
    """A float32 constant in a matmul (or uint8 inputs cast with .float()) cannot run on float64 copies: the
    check runs on copies in the model's own dtype instead, coarser (a gap above 1e-2), from the first step:
    the detached heads are refused (0.05 off unchecked, a review measured), the plain model is not."""

    class Float32Inside(Net):
        def forward(self, x):
            outputs = super().forward(x)
            return [o @ torch.eye(4) for o in outputs]  # a float32 constant: no float64 forward

    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for spelling in ("none", "detach"):
        torch.manual_seed(0)
        model = Float32Inside(spelling)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3))
        if spelling == "detach":
            before = state(model, optimizer, w)
            with pytest.raises(ValueError, match="stop-gradient"):
                w.step((x, y), (x, y))
            assert same(before, state(model, optimizer, w))
        else:
            w.step((x, y), (x, y))
            assert w.num_meta_steps == 1 and w._gradients_checked


def test_a_backward_that_is_not_differentiable_is_refused_by_higher_alone():
    """A right custom backward computed under no_grad (a fused kernel's): jvp, finite differences and the fast
    mode need no second derivative and are right; higher differentiates through it (0.32 off unchecked)."""

    class NoGradBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            with torch.no_grad():
                return grad * (1 - y * y)

        @staticmethod
        def jvp(ctx, tangent):
            raise NotImplementedError  # (never called: forward_ad not used below for the refusal)

    class Fused(Net):
        def forward(self, x):
            outputs, h = [], x
            for block, head in zip(self.blocks, self.heads):
                h = NoGradBackward.apply(block(h))
                outputs.append(head(h))
            return outputs

    train, val = data()
    torch.manual_seed(0)
    model = Fused("none").to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0),
                              mw.BalancedValidation(3, alpha=1.0), backend="higher", gamma_optimizer="sgd",
                              init=torch.tensor(GAMMA, dtype=F64))
    before = state(model, optimizer, w)
    with pytest.raises(ValueError, match="backend='higher'"):
        w.step(train, val)
    assert same(before, state(model, optimizer, w))
    for mode, backend in (("exact", "finite_difference"), ("fast", "jvp")):
        torch.manual_seed(0)
        model = Fused("none").to(F64)
        ref = reference(model, mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3, alpha=1.0),
                        train, val)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=LR),
                                  mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3, alpha=1.0),
                                  mode=mode, backend=backend, gamma_optimizer="sgd",
                                  init=torch.tensor(GAMMA, dtype=F64))
        assert rel_err(w.step(train, val).gamma_grad, ref) < 1e-3


def test_check_gradients_can_be_switched_off_after_construction():
    train, val = data()
    model, optimizer, _, _, w = setup("detach", "exact", "jvp")
    with pytest.raises(ValueError, match="stop-gradient"):
        w.step(train, val)
    w.check_gradients = False
    w.step(train, val)


def test_check_gradients_is_a_flag():
    model = Net("none")
    with pytest.raises(TypeError, match="check_gradients"):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                              check_gradients="yes")


class RightNet(Net):
    """Right models a check of autograd against differences could mistake for stop-gradients (a fresh review
    of the check found each refused): a ReLU of an exact zero (zero bias, zero inputs: autograd's one-sided
    derivative), an embedding's padding row (no gradient by design), a teacher's parameters under no_grad
    that no optimizer holds, a block reentrant checkpointing leaves without gradient."""

    def __init__(self, kind: str) -> None:
        super().__init__("none")
        self.kind = kind
        if kind == "relu of an exact zero":
            nn.init.zeros_(self.blocks[0].bias)
        self.embedding = nn.Embedding(10, 8, padding_idx=0)
        self.teacher = nn.Linear(6, 4)

    def forward(self, x):
        outputs, h = [], x
        for i, (block, head) in enumerate(zip(self.blocks, self.heads)):
            if i == 0 and self.kind == "reentrant checkpoint, input without grad":
                h = torch.tanh(torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True))
            elif i == 0 and self.kind == "relu of an exact zero":
                h = torch.relu(block(h))
            else:
                h = torch.tanh(block(h))
            if i == 0 and self.kind == "embedding padding row":
                h = h + self.embedding((x[:, :2].abs() * 3).long() % 10).sum(1)
            outputs.append(head(h))
        if self.kind == "teacher under no_grad":
            with torch.no_grad():
                soft = self.teacher(x)
            outputs[2] = outputs[2] + 0.1 * soft
        return outputs


RIGHT_MODELS = ["relu of an exact zero", "embedding padding row", "teacher under no_grad",
                "reentrant checkpoint, input without grad"]


@pytest.mark.parametrize("mode,backend", FORMS)
@pytest.mark.parametrize("kind", RIGHT_MODELS)
def test_right_models_with_parameters_or_points_autograd_leaves_alone_are_not_refused(kind, mode, backend):
    (x, y), val = data()
    if kind == "relu of an exact zero":
        x = x.clone()
        x[:4] = 0.0  # (a zero background)
    torch.manual_seed(0)
    model = RightNet(kind).to(F64)
    teacher = kind == "teacher under no_grad"
    if not teacher:
        model.teacher.requires_grad_(False)  # (unused here; step() refuses a trainable part no optimizer holds)
    params = [p for n, p in model.named_parameters() if not n.startswith("teacher")]
    optimizer = torch.optim.SGD(params, lr=LR)
    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    validation = mw.BalancedValidation(3, alpha=1.0)
    ref = reference(model, criterion, validation, (x, y), val)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode=mode, backend=backend,
                              gamma_optimizer="sgd", init=torch.tensor(GAMMA, dtype=F64))
    if not teacher:
        record = w.step((x, y), val)  # not refused
    else:  # (trainable, held by no optimizer: held fixed in the two calls, which the check must not refuse)
        if mode == "exact":
            record = w.meta_step((x, y), val)
        optimizer.zero_grad()
        w.loss(model(x), y).backward()
        optimizer.step()
        if mode == "fast":
            record = w.meta_step((x, y), val)
    if (mode, backend) in (("exact", "jvp"), ("exact", "higher")):
        assert rel_err(record.gamma_grad, ref) < 1e-6


def test_reentrant_checkpointing_is_refused_where_the_look_ahead_would_take_it_at_the_wrong_point():
    """With the input made to require grad (the usual workaround for reentrant checkpointing) the block's
    gradients are taken at the module's own parameters at backward time: every form 0.3 off unchecked."""

    class Checkpointed(Net):
        def forward(self, x):
            x = x.detach().requires_grad_(True)
            outputs, h = [], x
            for i, (block, head) in enumerate(zip(self.blocks, self.heads)):
                h = torch.tanh(torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True) if i == 0 else block(h))
                outputs.append(head(h))
            return outputs

    train, val = data()
    for mode, backend in FORMS:
        torch.manual_seed(0)
        model = Checkpointed("none").to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode=mode, backend=backend)
        before = state(model, optimizer, w)
        with pytest.raises(ValueError, match="reentrant activation checkpointing"):
            w.step(train, val)
        assert same(before, state(model, optimizer, w))


def test_labels_flattened_over_tokens_are_checked_on_the_whole_batch():
    """Labels of shape (B*T,) for inputs (B, T): no sample cut applies (none would match), the check runs."""

    class Tokens(Net):
        def forward(self, x):  # x: (B, T, 6) -> exits (B*T, 4)
            return [o.reshape(-1, 4) for o in super().forward(x.reshape(-1, 6))]

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 10, 6, generator=g, dtype=F64), torch.randint(0, 4, (120,), generator=g)
    for spelling, refused in (("none", False), ("detach", True)):
        torch.manual_seed(0)
        model = Tokens(spelling).to(F64)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=LR), mw.DenseDistillLoss(3))
        if refused:
            with pytest.raises(ValueError, match="stop-gradient"):
                w.step((x, y), (x, y))
        else:
            w.step((x, y), (x, y))
            assert w._gradients_checked


def test_state_a_model_builds_at_its_first_forward_is_built_in_the_model_s_own_dtype():
    """A table cached at the first forward (rotary embeddings' pattern) is built by a forward in the model's
    dtype before the check's float64 copies run: the user's step is not broken by a float64 table."""

    class Cached(Net):
        table = None

        def forward(self, x):
            if self.table is None:
                self.table = torch.eye(6, dtype=x.dtype, device=x.device)
            return super().forward(x @ self.table)

    torch.manual_seed(0)
    model = Cached("none")
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=LR), mw.DenseDistillLoss(3))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    for _ in range(2):
        w.step((x, y), (x, y))
    assert model.table.dtype == torch.float32


def test_learn_switched_on_for_a_weighter_built_without_it_is_refused_clearly():
    for mode in ("exact", "fast"):
        model = Net("none")
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=LR), mw.DenseDistillLoss(3),
                                  learn=False, mode=mode)
        w.learn = True
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        with pytest.raises(ValueError, match="built with learn=False"):
            w.step((x, y), (x, y))
        w.learn = False
        w.step((x, y), (x, y))  # (and off again: fine)


def test_the_fast_mode_takes_a_criterion_without_teacher_outputs_and_checks_it():
    """A criterion without a `teacher_outputs` keyword raised a TypeError after the model's step; now its
    terms are differenced as it computes them: right where it holds no detached target (per-exit
    cross-entropies), refused before the model's step where it does (a KD target it detaches itself)."""
    def plain(outputs, y):
        return torch.stack([nn.functional.cross_entropy(o, y) for o in outputs])

    def own_kd(outputs, y):
        target = torch.softmax(outputs[-1].detach(), dim=1)
        kd = [-(target * torch.log_softmax(o, dim=1)).sum(1).mean() for o in outputs[:-1]]
        return torch.stack([nn.functional.cross_entropy(o, y) for o in outputs] + kd)

    train, val = data()
    validation = mw.BalancedValidation(3, alpha=1.0)
    for criterion, names in ((plain, ["a", "b", "c"]), (own_kd, ["a", "b", "c", "d", "e"])):
        torch.manual_seed(0)
        model = Net("none").to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, term_names=names, mode="fast",
                                  gamma_optimizer="sgd")
        if criterion is plain:
            w.step(train, val)
        else:
            before = state(model, optimizer, w)
            with pytest.raises(ValueError, match="training terms differs"):
                w.step(train, val)
            assert same(before, state(model, optimizer, w))


def test_a_criterion_computing_in_low_precision_is_named_where_the_check_cannot_conclude():
    """A criterion that casts the logits down (to bfloat16 before its cross-entropy) rounds the float64 copies
    the check differences: the fast mode's check cannot conclude, and its warning named only the model
    (helper-101's report); it names the criterion and the cast too. The jvp backend's forward against reverse
    mode is refused (the two round apart), and the refusal names the cast beside the stop-gradients."""
    def in_bfloat16(outputs, y):
        return torch.stack([nn.functional.cross_entropy(o.to(torch.bfloat16).float(), y) for o in outputs])

    train, val = data()
    for mode in ("fast", "exact"):
        torch.manual_seed(0)
        model = Net("none").to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        w = mw.HarmonizedWeighter(model, optimizer, in_bfloat16, mw.BalancedValidation(3, alpha=1.0),
                                  term_names=["a", "b", "c"], mode=mode, gamma_optimizer="sgd")
        if mode == "fast":
            # (its differences disagree: kinks are named beside the cast, as a deep ReLU network's on real images
            # disagree too, where the warning named a cast the model did not have: helper-177)
            with pytest.warns(RuntimeWarning, match=r"could not check .*disagree by .*not smooth enough.*kink.*or the "
                                                 r"model, the criterion .*computes below float64 inside \(a \.float"
                                                 r"\(\) or \.half\(\)"):
                w.step(train, val)
        else:
            with pytest.raises(ValueError, match=r"forward-mode derivative.*cast to float16 or bfloat16 inside "
                                                 r"the model or the criterion.*check_gradients=False"):
                w.step(train, val)
            # backend='higher' is refused too (its check's differences round apart as well): its refusal names the
            # cast, and neither refusal sends the user to the other backend as the way out (helper-110's report)
            torch.manual_seed(0)
            model = Net("none").to(F64)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            w = mw.HarmonizedWeighter(model, optimizer, in_bfloat16, mw.BalancedValidation(3, alpha=1.0),
                                      term_names=["a", "b", "c"], mode=mode, gamma_optimizer="sgd", backend="higher")
            with pytest.raises(ValueError, match=r"cast to float16 or bfloat16 inside") as refusal:
                w.step(train, val)
            assert "for a cast, neither backend is the way out" in str(refusal.value)


class _Hooked(nn.Module):
    """Three exits of Linear, LayerNorm (with it the old check found a gap, not noise) and tanh, whose forward
    registers saved-tensor hooks: non-reentrant activation checkpointing of each stage, or ``save_on_cpu``."""

    def __init__(self, hooks, norm=nn.LayerNorm):
        super().__init__()
        self.hooks = hooks
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(6 if k == 0 else 10, 10), norm(10)) for k in range(3))
        self.heads = nn.ModuleList(nn.Linear(10, 5) for _ in range(3))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        outputs = []
        with torch.autograd.graph.save_on_cpu() if self.hooks == "offload" else contextlib.nullcontext():
            for stage, head in zip(self.stages, self.heads):
                if self.hooks == "checkpoint":
                    x = checkpoint(lambda u, stage=stage: torch.tanh(stage(u)), x, use_reentrant=False)
                else:
                    x = torch.tanh(stage(x))
                outputs.append(head(x))
        return outputs


@pytest.mark.parametrize("outer", ["", "save_on_cpu"])
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d])
@pytest.mark.parametrize("mode, backend", [("exact", "jvp"), ("exact", "finite_difference"), ("exact", "higher"),
                                           ("fast", "jvp")])
def test_activation_checkpointing_is_said_for_what_it_is(mode, backend, norm, outer):
    """Non-reentrant activation checkpointing recomputes the forward at backward time with the module's own
    parameters, not the check's float64 copies: the check found a gap and blamed a stop-gradient or a cast (the
    default backend, which cannot take checkpointing, refused with that reason instead of its own), or warned of
    kinks and casts in the modes that take checkpointing (helper-181). Now the backends that cannot take it refuse
    with their own reason; the others warn once that the check is off for this model, and learn. The same inside
    the caller's own save_on_cpu() (helper-186: the model's hooks were not asked about there, and the gap was put
    down to kinks, a cast or the float64 copies)."""
    import warnings

    if outer:
        with torch.autograd.graph.save_on_cpu():
            return test_activation_checkpointing_is_said_for_what_it_is(mode, backend, norm, "")

    torch.manual_seed(0)
    model = _Hooked("checkpoint", norm)  # (BatchNorm: the recomputation fails on the check's float64 copies; it was
    # said as the copies' failure, at the second meta step, helper-184)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode=mode, backend=backend)
    data = [(torch.randn(16, 6), torch.randint(0, 5, (16,))) for _ in range(4)]
    if mode == "exact" and backend != "higher":
        # (inside the caller's save_on_cpu(): the backend's refusal of the caller's hooks, before the check)
        with pytest.raises(ValueError, match="activation checkpointing.*[Uu]se backend='higher' or mode='fast'"):
            w.step(data[0], data[1])
        return
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        w.step(data[0], data[1])
        w.step(data[2], data[3])
    messages = [str(m.message) for m in said]
    assert len(messages) == 1 and "activation checkpointing" in messages[0], messages
    assert w.num_meta_steps == 2 and len(set(w.gamma_dict().values())) > 1


@pytest.mark.parametrize("mode, backend", [("exact", "higher"), ("fast", "jvp")])
def test_saved_tensor_hooks_that_recompute_nothing_keep_the_check(mode, backend):
    """Activations offloaded with torch.autograd.graph.save_on_cpu (saved-tensor hooks that recompute nothing):
    the check of a9b7d96 turned itself off for any saved-tensor hook, warning of checkpointing (helper-183). The
    hooks are now asked about only where the check found a gap: this model is checked, without a word."""
    import warnings

    torch.manual_seed(0)
    model = _Hooked("offload")
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                              mode=mode, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            w.step((torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,))))
    assert w.num_meta_steps == 2 and w._gradients_checked


class _TwoExits(nn.Module):
    """Two exits of Linear and tanh, the second stage's input detached with ``detach`` (a real stop-gradient)."""

    def __init__(self, detach=False):
        super().__init__()
        self.detach = detach
        self.stages = nn.ModuleList(nn.Linear(6 if k == 0 else 10, 10) for k in range(2))
        self.heads = nn.ModuleList(nn.Linear(10, 5) for _ in range(2))

    def forward(self, x):
        outputs = []
        for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
            x = torch.tanh(stage(x.detach() if self.detach and k == 1 else x))
            outputs.append(head(x))
        return outputs


def test_a_step_run_inside_the_caller_s_save_on_cpu_is_still_checked():
    """A model with a real stop-gradient (a detach between its stages), its step run inside the caller's
    save_on_cpu(): the check's gap was put down to saved-tensor hooks (the caller's, which it could not tell from
    the model's), the check turned off, and every step taken (helper-185). The caller's own hooks are not asked
    about: refused as without them, changing nothing."""
    for outer in (contextlib.nullcontext, torch.autograd.graph.save_on_cpu):
        torch.manual_seed(0)
        model = _TwoExits(detach=True)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                  backend="higher")
        kept = copy.deepcopy(model.state_dict())
        with outer(), pytest.raises(ValueError, match="differs"):
            w.step((torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,))))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items()) and w.num_meta_steps == 0


def test_a_gap_found_inside_the_caller_s_saved_tensor_hooks_says_so():
    """The caller's own saved-tensor hooks packing activations to float16 (PyTorch's tutorial's compression) around
    the step of a plain model: the check's gap was refused as a stop-gradient or a cast in the model, which
    registers no hooks, without a word of the caller's (helper-187). The refusal now says that the step ran inside
    the caller's hooks and what a lossy pack does; nothing is changed."""
    def pack(t):
        return (t.dtype, t.to(torch.float16)) if t.is_floating_point() else (None, t)

    def unpack(packed):
        return packed[1].to(packed[0]) if packed[0] is not None else packed[1]

    for options in ({"mode": "fast"}, {"backend": "higher"}):
        torch.manual_seed(0)
        model = _TwoExits()
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                  **options)
        kept = copy.deepcopy(model.state_dict())
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), \
                pytest.raises(ValueError, match=r"differs.*saved-tensor hooks of the caller's.*float16"):
            w.step((torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,))))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items()) and w.num_meta_steps == 0
        w.step((torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,))))
        assert w.num_meta_steps == 1  # (outside the hooks: checked, and learns)


@pytest.mark.parametrize("backend", ["jvp", "finite_difference"])
def test_the_directional_backends_refuse_the_caller_s_saved_tensor_hooks_as_the_caller_s(backend):
    """A plain model (no checkpointing, no hooks of its own) stepped inside the caller's save_on_cpu(): the jvp and
    finite-difference backends refused it as a model using activation checkpointing, and advised turning off
    checkpointing it does not have, with check_gradients=False too (helper-188). Now refused as the caller's hooks,
    saying what to do; nothing is changed, and outside them the step runs."""
    def data():
        return (torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,)))

    for check in (True, False):
        torch.manual_seed(0)
        model = _TwoExits()
        criterion = mw.DenseDistillLoss(2)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, backend=backend,
                                  check_gradients=check)
        kept = copy.deepcopy(model.state_dict())
        with torch.autograd.graph.save_on_cpu(), \
                pytest.raises(ValueError, match=r"inside hooks of the caller's") as refused:
            w.step(*data())
        assert "checkpointing off" not in str(refused.value)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items()) and w.num_meta_steps == 0
        # refused before the gradient check, which would run for nothing (and was marked done; helper-189)
        assert not (check and w._gradients_checked)
        w.step(*data())
        assert w.num_meta_steps == 1


def test_a_model_s_own_gap_inside_the_caller_s_lossless_hooks_gets_no_note_of_them():
    """A model with a real detach stepped inside the caller's save_on_cpu() (lossless): the refusal of its
    stop-gradient ended with the note of c9ec79c that the caller's hooks may make such a gap, and pointed to
    check_gradients=False (helper-188). The check run with the caller's hooks set aside finds the same gap: the note
    is left out; with lossy hooks (float16) it finds none, and the note is said."""
    torch.manual_seed(0)
    model = _TwoExits(detach=True)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                              backend="higher")
    with torch.autograd.graph.save_on_cpu(), pytest.raises(ValueError, match="differs") as refused:
        w.step((torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,))))
    assert "hooks of the caller's" not in str(refused.value)


def _float16_pack(t):
    return (t.dtype, t.to(torch.float16)) if t.is_floating_point() else (None, t)


def _float16_unpack(packed):
    return packed[1].to(packed[0]) if packed[0] is not None else packed[1]


def test_a_model_s_own_gap_inside_the_caller_s_lossy_hooks_is_said_as_found_without_them():
    """A model with a real detach stepped inside the caller's hooks packing to float16: the refusal named the gap the
    hooks made (of the training terms, with advice that led to a backend refusing the hooks), not the model's own
    (of the validation losses), and said nothing of the hooks (helper-189). It is now the refusal the model gets
    without the hooks, found by the check run with them set aside."""
    def refusal(hooks):
        torch.manual_seed(0)
        model = _TwoExits(detach=True)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                  backend="higher")
        torch.manual_seed(1)
        data = (torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,)))
        with hooks, pytest.raises(ValueError, match="differs") as refused:
            w.step(*data)
        return str(refused.value)

    assert refusal(torch.autograd.graph.saved_tensors_hooks(_float16_pack, _float16_unpack)) == \
        refusal(contextlib.nullcontext())


def test_an_inconclusive_check_inside_the_caller_s_lossless_hooks_gets_no_note_of_them():
    """A model whose output moves with a counter it keeps (the check's forwards disagree: inconclusive) stepped inside
    the caller's save_on_cpu(): the warning that the check could not conclude gained the note blaming the caller's
    hooks, though the check is as inconclusive without them (helper-190). It is said as without the hooks."""
    import warnings

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(8, 5)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = torch.tanh(self.trunk(x)) * (1 + 1e-3 * self.calls)
            return [self.a(h), self.b(h)]

    def said(hooks, **options):
        torch.manual_seed(0)
        model = Counting()
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                  **options)
        torch.manual_seed(1)
        data = (torch.randn(16, 6), torch.randint(0, 5, (16,))), (torch.randn(16, 6), torch.randint(0, 5, (16,)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with hooks:
                w.step(*data)
        return [str(m.message) for m in caught if "check" in str(m.message)]

    for options in ({"backend": "higher"}, {"mode": "fast"}):
        without = said(contextlib.nullcontext(), **options)
        assert without and said(torch.autograd.graph.save_on_cpu(), **options) == without, options
