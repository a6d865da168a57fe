"""mode="fast": the model's step with the gamma it had is the look-ahead. Its meta-gradient against an
independent brute force of its own definition; the model after a fast step against a plain step."""

import copy
import gc

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import metaweight as mw
from conftest import batch, fast_two_calls, tiny_net
from test_weighter import F64, OPTIMIZERS, rel_err


def setup(opt_name, mode, **options):
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
                              gamma_lr=0.05, init=torch.tensor([1.0, 0.7, 1.3, 0.5, 0.9, 1.1]), **options)
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


def brute_force_parts(model, optimizer, criterion, validation, gamma, train, val, before_step=lambda net, opt: None):
    """The pieces of fast mode's definition, computed independently: the per-term gradients at theta, and
    v = grad L_val(theta') with theta' a twin's real step on the gamma-weighted loss (``before_step`` runs
    between its backward and its step, e.g. clipping; what it returns is handed back)."""
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    terms = criterion(functional_call(model, (params, buffers), (train[0],)), train[1])
    per_term = [torch.autograd.grad(terms[k], list(params.values()), retain_graph=True) for k in range(len(terms))]
    twin, twin_opt = copy.deepcopy((model, optimizer))
    twin_opt.zero_grad()
    (gamma * criterion(twin(train[0]), train[1])).sum().backward()
    extra = before_step(twin, twin_opt)
    twin_opt.step()
    tparams = dict(twin.named_parameters())
    objective = validation(functional_call(twin, (tparams, {k: v.clone() for k, v in model.named_buffers()}),
                                           (val[0],)), val[1])
    v = torch.autograd.grad(objective, list(tparams.values()))
    return per_term, v, twin, extra


def test_fast_meta_gradient_equals_a_brute_force_of_its_definition():
    """theta' = a real SGD step with the old gamma; v = grad L_val(theta'); D = lr (1 + mu) for Nesterov
    (lr * c by hand); the derivative at theta from per-term gradients: -<D v, grad L_k(theta)>."""
    model, optimizer, criterion, validation, w = setup("nesterov_wd", "fast")
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = w.gamma.detach().clone().to(F64)
    per_term, v, _, _ = brute_force_parts(model, optimizer, criterion, validation, gamma, train, val)
    group = optimizer.param_groups[0]
    c = group["lr"] * (1 + group["momentum"])  # Nesterov, dampening 0, after the first step
    ref = torch.stack([-c * sum((vi * gi).sum() for vi, gi in zip(v, per_term[k])) for k in range(6)])
    record = w.step(train, val)
    assert ref.norm() > 0
    # one-sided difference with h = 64 sqrt(eps) x RMS(theta) / |w|: O(h) error, ~1e-7 relative in float64
    assert rel_err(record.gamma_grad, ref) < 1e-5


def test_fast_mode_refuses_what_it_cannot_replay_and_a_two_call_form_out_of_order():
    model, optimizer, _, _, w = setup("sgd", "fast")
    optimizer.step()  # (a step on no gradient: with no step since it was built, a meta_step is skipped, helper-173)
    with pytest.raises(ValueError, match="after the model's step.*weighter.loss"):
        w.meta_step(batch(dtype=F64), batch(dtype=F64))  # no loss() before it
    train = batch(dtype=F64)
    w.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    other = batch(dtype=F64)
    with pytest.raises(ValueError, match="another training batch"):
        w.meta_step(other, batch(dtype=F64))
    assert w.num_calls == 0 and w.num_meta_steps == 0
    assert w.meta_step(train, batch(dtype=F64)).ran  # the right batch still works
    with pytest.raises(ValueError, match="closed form"):
        mw.HarmonizedWeighter(model, torch.optim.Adagrad(model.parameters()), mw.DenseDistillLoss(3), mode="fast")
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


def test_two_call_fast_form_with_clipping_gives_the_meta_gradient_of_the_clipped_step():
    """The user's own loop: loss, backward, clip_grad_norm_ (active, declared), Adam's step, then meta_step:
    the meta-gradient of that clipped step (issue 21, item 3). Reference: central differences in gamma of the
    validation objective after a twin's real clipped step; and it differs from the unclipped step's."""
    model, optimizer, criterion, validation, w = setup("adam", "fast", clip_grad_norm=mw.ClipGradNorm(0.05))
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = w.gamma.detach().clone().to(F64)

    def after_step(g, clip):
        twin, twin_opt = copy.deepcopy((model, optimizer))
        twin_opt.zero_grad()
        (g * criterion(twin(train[0]), train[1])).sum().backward()
        if clip:
            assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05) > 0.05  # clipping is active
        twin_opt.step()
        with torch.no_grad():
            return float(copy.deepcopy(validation)(twin(val[0]), val[1]))

    def central(clip):
        e = 1e-5 * torch.eye(6, dtype=F64)
        return torch.stack([torch.tensor((after_step(gamma + e[k], clip) - after_step(gamma - e[k], clip)) / 2e-5)
                            for k in range(6)])

    ref, unclipped = central(True), central(False)
    optimizer.zero_grad()
    w.loss(model(train[0]), train[1]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    optimizer.step()
    record = w.meta_step(train, val)
    assert record.ran and ref.norm() > 0 and rel_err(unclipped, ref) > 0.5
    assert rel_err(record.gamma_grad, ref) < 1e-4


def test_two_call_fast_form_with_dropout_uses_the_training_forward_s_masks():
    """With dropout the difference recomputes its base point: both forwards draw the masks of the
    training forward (read from the generator's state before it), as the reference does by rewinding
    to it; the validation forward draws from where meta_step starts."""
    torch.manual_seed(0)
    model = mw.MultiExit([torch.nn.Sequential(torch.nn.Linear(6 if k == 0 else 10, 10), torch.nn.Tanh(),
                                              torch.nn.Dropout(0.3)) for k in range(3)],
                         [torch.nn.Linear(10, 5) for _ in range(3)]).to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion, validation = mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3)
    validation.update(torch.tensor([1.7, 1.6, 1.5], dtype=F64))
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode="fast", gamma_optimizer="sgd")
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    train_rng = torch.get_rng_state()
    w.loss(model(train[0]), train[1]).backward()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    rng = torch.get_rng_state()
    validation = copy.deepcopy(validation)  # its average as the meta step finds it
    record = w.meta_step(train, val)

    here = dict(model.named_parameters())
    torch.set_rng_state(rng)
    objective = validation(functional_call(model, here, (val[0],)), val[1])
    v = torch.autograd.grad(objective, list(here.values()))
    at = {n: t.requires_grad_(True) for n, t in theta.items()}
    torch.set_rng_state(train_rng)  # the masks of the training forward, whose step this is
    outputs = functional_call(model, at, (train[0],))
    teachers = [o.detach() for o in outputs]
    terms = criterion(outputs, train[1], teacher_outputs=teachers)
    per_term = [torch.autograd.grad(terms[k], list(at.values()), retain_graph=True) for k in range(6)]
    ref = torch.stack([-0.1 * sum((vi * gi).sum() for vi, gi in zip(v, per_term[k])) for k in range(6)])
    assert record.ran and ref.norm() > 0
    assert rel_err(record.gamma_grad, ref) < 1e-5


def test_two_call_fast_form_with_a_grad_scaler_sees_unscaled_gradients_and_skips_with_it():
    torch.manual_seed(0)
    model = tiny_net(3)
    twin = copy.deepcopy(model)
    results = []
    for net, scaled in ((model, False), (twin, True)):
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        w = mw.HarmonizedWeighter(net, optimizer, mw.DenseDistillLoss(3), mode="fast", gamma_optimizer="sgd")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        torch.manual_seed(1)
        for _ in range(3):
            (x, y), val = batch(), batch()
            optimizer.zero_grad()
            scaler.scale(w.loss(net(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
            record = w.meta_step((x, y), val)
        results.append((record.gamma_grad, w.gamma.clone()))
        if scaled:  # a NaN batch: the scaler skips the optimizer's step, and meta_step skips gamma's
            (x, y), val = batch(), batch()
            x[0, 0] = float("nan")
            before = (w.gamma.clone(), [p.detach().clone() for p in net.parameters()])
            optimizer.zero_grad()
            scaler.scale(w.loss(net(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # (a GradScaler's skip: no warning of a wrong order)
                record = w.meta_step((x, y), val)
            assert record.skipped and not record.ran and "did not step" in record.message
            assert "GradScaler found inf/NaN" in record.message
            assert torch.equal(before[0], w.gamma)
            # the same with finite gradients and no step: meta_step came before optimizer.step(), and says so
            optimizer.zero_grad()
            w.loss(net(batch()[0]), y).backward()
            with pytest.warns(RuntimeWarning, match="gradients are finite.*called before optimizer.step"):
                record = w.meta_step((x, y), val)
            assert record.skipped and "Call weighter.meta_step" in record.message and torch.equal(before[0], w.gamma)
            assert all(torch.equal(a, b) for a, b in zip(before[1], net.parameters()))
    # powers of two scale and unscale exactly: the same look-ahead, to the difference's rounding
    assert rel_err(results[1][0], results[0][0]) < 1e-4
    assert torch.allclose(results[1][1], results[0][1], atol=1e-6)


@pytest.mark.parametrize("then", ["a step the scaler skips", "a step taken"])
@pytest.mark.parametrize("earlier", ["meta_step raised", "meta_step not called"])
def test_two_call_fast_form_after_an_iteration_without_its_meta_step_scores_the_next_iteration(earlier, then):
    """An iteration whose meta_step raised (NaN validation inputs, caught by the loop) or was not called, then the
    next iteration: its meta_step scores that iteration, a skipped record where a GradScaler skipped its step (it
    refused the right batch as "another training batch than the weighter.loss call before it", comparing it with
    the earlier step's, at every skipped step until one was taken: found by helper-143), and the iterations after
    it as a twin's that never called that meta_step, bit for bit (the refusal changed nothing)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    twin = copy.deepcopy(model)
    data = [(batch(), batch()) for _ in range(4)]
    data[1][1][0][0, 0] = float("nan")
    records = []
    for net, mine in ((model, True), (twin, False)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        w = mw.HarmonizedWeighter(net, optimizer, mw.DenseDistillLoss(3), mode="fast")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for it, ((x, y), val) in enumerate(data):
            if it == 2 and then == "a step the scaler skips":
                scaler.update(2.0 ** 127)  # (the scaled gradients overflow: the scaler skips the step)
            if it == 3:
                scaler.update(2.0 ** 10)  # (and takes the next one)
            optimizer.zero_grad()
            scaler.scale(w.loss(net(x), y)).backward()
            scaler.step(optimizer)
            scaler.update()
            if it == 1:
                if mine and earlier == "meta_step raised":
                    with pytest.raises(ValueError, match="inputs hold inf or NaN"):
                        w.meta_step((x, y), val)
                continue
            records.append(w.meta_step((x, y), val))
        records.append([p.detach().clone() for p in net.parameters()] + [w.gamma.detach().clone()])
    mine, twins = records[:4], records[4:]
    if then == "a step the scaler skips":
        assert mine[1].skipped and not mine[1].ran and "GradScaler found inf/NaN" in mine[1].message
    else:
        assert mine[1].ran and not mine[1].skipped
    assert mine[2].ran and not mine[2].skipped
    for a, b in zip(mine[1:3], twins[1:3]):
        assert (a.ran, a.skipped) == (b.ran, b.skipped) and a.gamma == b.gamma
        assert (a.gamma_grad is None and b.gamma_grad is None) or torch.equal(a.gamma_grad, b.gamma_grad)
    assert all(torch.equal(a, b) for a, b in zip(mine[3], twins[3]))


@pytest.mark.parametrize("optimizer, clip", [("sgd", None), ("sgd", 0.05), ("fused adam", None)],
                         ids=["sgd", "sgd, declared clipping", "fused adam"])
def test_two_call_fast_form_with_a_grad_scaler_of_any_power_of_two_scale_scores_the_same_step(optimizer, clip):
    """PyTorch's AMP recipe (scale, backward, unscale_, clip_grad_norm_, step, update) with float32 parameters:
    a power-of-two scale changes nothing in the step taken, so nothing in its meta-gradient, up to the largest
    scales a GradScaler reaches (its scale is float32; it doubles every 2000 steps without an overflow, past
    2**64 after 100k steps under bf16 autocast; it halves at each overflow), and down to tiny ones. A fused
    optimizer's own unscaling too (without clipping, which needs unscale_ first). The reference: the same loop
    without a scaler. (It drifted from about 2**60 and was 0 at 2**70 and 2**-70, the direction carrying 1/scale
    and its float32 squares under- or overflowing; a declared clipping was refused there, its norm inf or 0.)"""
    results = {}
    for log2 in (None, 0, 40, 64, 80, 120, -70):
        torch.manual_seed(0)
        net = tiny_net(3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1) if optimizer == "sgd" else \
            torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
        w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(3), mode="fast", check_gradients=False,
                                  clip_grad_norm=mw.ClipGradNorm(clip) if clip else None)  # (no check: fast)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (log2 or 0), enabled=log2 is not None)
        torch.manual_seed(1)
        grads = []
        for _ in range(2):
            (x, y), val = batch(), batch()
            opt.zero_grad()
            scaler.scale(w.loss(net(x), y)).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            scaler.step(opt)
            scaler.update()
            record = w.meta_step((x, y), val)
            assert record.ran and not record.skipped, (log2, record.message)
            grads.append(record.gamma_grad)
        assert scaler.get_scale() == (2.0 ** log2 if log2 is not None else 1.0)  # (no overflow: the scale held)
        results[log2] = torch.stack(grads), torch.cat([p.detach().flatten() for p in net.parameters()])
    reference, params = results.pop(None)
    assert reference.norm() > 0
    for log2, (got, at) in results.items():
        assert torch.equal(at, params), log2  # the same steps, bitwise
        assert rel_err(got, reference) < 1e-6, (log2, got, reference)


def test_two_call_fast_form_tells_a_zero_grad_from_a_rescale_between_micro_batches_at_a_tiny_scale():
    """Whether the gradients were zeroed between two backwards is read from their values: at a GradScaler's tiny
    scale (2**-100, the scaled gradients about 1e-31) their 2-norm's float32 squares underflowed to 0, so a
    rescale of each micro-batch's gradients read as a zero_grad, the first micro-batch silently left out of the
    step scored (with the step's whole batch: 'another training batch'). Refused at every scale alike."""
    for log2 in (None, -100):
        torch.manual_seed(0)
        net = tiny_net(3)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(3), mode="fast", check_gradients=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (log2 or 0), enabled=log2 is not None)
        (x1, y1), (x2, y2), val = batch(), batch(), batch()
        opt.zero_grad()
        scaler.scale(w.loss(net(x1), y1)).backward()
        torch._foreach_mul_([p.grad for p in net.parameters()], 0.5)  # (clipping each micro-batch, say)
        scaler.scale(w.loss(net(x2), y2)).backward()
        scaler.step(opt)
        scaler.update()
        with pytest.raises(ValueError, match="changed between two backwards .* other than zero_grad"):
            w.meta_step((torch.cat([x1, x2]), torch.cat([y1, y2])), val)


@pytest.mark.parametrize("form", ["one call", "two calls"])
def test_fast_form_under_bf16_autocast_stays_close_to_float32(form):
    """Half-precision terms would drown a one-sided difference (bf16 rounding / h): the base point is
    recomputed in float32. Reference: the same step without autocast."""
    grads = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = tiny_net(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast", gamma_optimizer="sgd")
        train, val = batch(n=64), batch(n=64)
        # one autocast region throughout: its cache of half-precision weights goes stale at the step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if form == "one call":
                record = w.step(train, val)
            else:
                w.loss(model(train[0]), train[1]).backward()
                optimizer.step()
                record = w.meta_step(train, val)
        grads.append(record.gamma_grad)
    assert grads[0].norm() > 0
    assert rel_err(grads[1], grads[0]) < 0.05  # 2.5% measured; 14% with stale weights, 28x off in bf16 terms


def test_two_call_fast_form_with_meta_every_matches_the_one_call_form():
    """Without dropout or autocast the two forms compute the same thing (the one-call form is checked
    against a brute force above): gamma and the parameters agree after 5 iterations, 3 meta steps."""
    results = []
    for form in ("one call", "two calls"):
        torch.manual_seed(0)
        model = tiny_net(3, dtype=F64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast", meta_every=2,
                                  gamma_lr=0.1)
        torch.manual_seed(1)
        for _ in range(5):
            train, val = batch(dtype=F64), batch(dtype=F64)
            if form == "one call":
                w.step(train, val)
            else:
                fast_two_calls(w, model, optimizer, train, val)
        assert w.num_meta_steps == 3 and w.num_calls == 5
        results.append((w.gamma.clone(), [p.detach().clone() for p in model.parameters()]))
    assert not torch.equal(results[0][0], torch.ones(6))
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_two_call_fast_form_with_a_closure_captures_after_the_closure():
    """optimizer.step(closure) (as Lightning steps) runs the forward and backward inside the step, after
    the step pre-hooks: the capture waits for the closure. Same result as the plain two-call loop."""
    grads = []
    for with_closure in (False, True):
        torch.manual_seed(0)
        model = tiny_net(3, dtype=F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
        torch.manual_seed(1)
        for _ in range(2):
            train, val = batch(dtype=F64), batch(dtype=F64)

            def closure():
                optimizer.zero_grad()
                loss = w.loss(model(train[0]), train[1])
                loss.backward()
                return loss

            if with_closure:
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            record = w.meta_step(train, val)
            assert record.ran
        grads.append((record.gamma_grad, w.gamma.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_fast_step_refuses_a_bad_validation_batch_before_the_model_steps():
    """The fast step scores its validation batch after the model's step; what can be judged before
    (labels per input as the training batch has them, integer labels, in the outputs' classes, not all padding,
    not empty) is refused before, nothing changed;
    a hook that raises after the step leaves the step counted and gamma as it was."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())],
                       [nn.Linear(8, 3), nn.Linear(8, 3)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    seen = []

    def hook(record):
        seen.append(record)
        if len(seen) == 2:
            raise RuntimeError("a user's hook failed")

    w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), mode="fast", callbacks=[hook])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w.step((x, y), (x, y))
    state, momentum, gamma = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), w.gamma.clone()
    for bad, match in (((x, y[:7]), r"inputs of shape \(8, 4\) but 7 labels, where 8 would"),
                       ((x, y.float()), "integer class indices"),
                       ((x, y + 3), r"labels in \[3, 5\].*3 classes"),
                       ((x, torch.full_like(y, -100)), "Every label given with the validation batch is ignore_index"),
                       ((x[:0], y[:0]), r"validation batch is empty \(labels of shape \(0,\)\)")):
        with pytest.raises(ValueError, match=match):
            w.step((x, y), bad)
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
        assert str(opt.state_dict()) == str(momentum) and torch.equal(w.gamma, gamma) and w.num_calls == 1
    with pytest.raises(RuntimeError, match="hook failed"):
        w.step((x, y), (x, y))
    assert w.num_calls == 2 and w.num_meta_steps == 1 and torch.equal(w.gamma, gamma)
    assert not all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # the step stands, counted


def test_fast_two_calls_refuse_transformed_outputs_and_relabelled_batches():
    """The look-ahead recomputes the forward's own outputs on the labels loss() got: outputs changed
    before the loss (a temperature, exits reordered) and labels changed in place after it are
    refused, nothing changed; a copy of the outputs is accepted; both calls run under no_grad."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())],
                       [nn.Linear(8, 3), nn.Linear(8, 3)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), mode="fast")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for change in (lambda outs: [z / 2 for z in outs], lambda outs: outs[::-1]):
        outs = net(x)
        with pytest.raises(ValueError, match="outputs as they are, in the model's order"):
            w.loss(change(outs), y).backward()
            opt.step()
            w.meta_step((x, y), (x, y))
        assert w.num_meta_steps == 0 and torch.equal(w.gamma, torch.ones_like(w.gamma))
        opt.zero_grad()
    labels = y.clone()
    w.loss(net(x), labels).backward()
    opt.step()
    labels.copy_((labels + 1) % 3)
    with pytest.raises(ValueError, match="changed in place"):
        w.meta_step((x, labels), (x, y))
    assert w.num_meta_steps == 0
    opt.zero_grad()
    outs = net(x)
    w.loss([z.clone() for z in outs], y).backward()  # a copy of the outputs (kept): the same values
    opt.step()
    with torch.no_grad():
        record = w.meta_step((x, y), (x, y))
        assert not record["skipped"] and w.num_meta_steps == 1
        w.step((x, y), (x, y))
    assert w.num_meta_steps == 2


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_optimizer_step_hooks_are_refused_in_every_mode(mode):
    """A step hook (per optimizer or global, pre or post) can change the gradients a step uses or the
    parameters it leaves; no look-ahead replays it: refused at the meta step, nothing changed."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())],
                       [nn.Linear(8, 3), nn.Linear(8, 3)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), mode=mode)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w.step((x, y), (x, y))  # the weighter's own step hook (fast mode) is passed over
    state = copy.deepcopy(net.state_dict())

    def halve(optimizer, args, kwargs):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    for register in (opt.register_step_pre_hook, register_optimizer_step_post_hook):
        handle = register(halve if register is opt.register_step_pre_hook else lambda *a: None)
        try:
            with pytest.raises(ValueError, match="step hooks"):
                w.step((x, y), (x, y))
        finally:
            handle.remove()
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()) and w.num_calls == 1
    w.step((x, y), (x, y))
    assert w.num_calls == 2


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("case", ["nan input", "inf parameter", "nan in one accumulated micro-batch"])
def test_two_call_fast_form_refuses_or_skips_a_non_finite_step_as_such(case, nonfinite):
    """A non-finite loss or gradient in the user's own step is a non-finite meta step (raised, or skipped with
    ``nonfinite="skip"``): not a false "other inputs" (NaN != NaN) or "not one common rescale" (NaN
    gradients). gamma and the validation average are unchanged; the next clean iteration trains."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast", nonfinite=nonfinite)
    fast_two_calls(w, model, optimizer, batch(), batch())
    gamma, average = w.gamma.detach().clone(), w.validation.state_dict()
    x, y = batch()
    if case == "nan input":
        x[0, 0] = float("nan")
    elif case == "inf parameter":
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("inf")
    optimizer.zero_grad()
    if case.startswith("nan in one"):
        x[5, 0] = float("nan")
        for part in (slice(0, 8), slice(8, 16)):
            (w.loss(model(x[part]), y[part]) / 2).backward()
    else:
        w.loss(model(x), y).backward()
    optimizer.step()
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="were not finite: the step taken has no meta-gradient"):
            w.meta_step((x, y), batch())
        assert w.num_skipped == 0
    else:
        with pytest.warns(RuntimeWarning, match="Skipped a meta step .*were not finite"):
            record = w.meta_step((x, y), batch())
        assert record.skipped and record.ran and w.num_skipped == 1 and w.num_meta_steps == 1
        assert "ce[1]" in record.message and not all(v == v for v in record.terms.values())
    assert torch.equal(w.gamma, gamma) and str(w.validation.state_dict()) == str(average)
    torch.manual_seed(1)
    model2 = tiny_net(3)
    with torch.no_grad():  # the next clean iteration, from finite parameters, trains
        for p, q in zip(model.parameters(), model2.parameters()):
            p.copy_(q)
    optimizer.state.clear()
    assert fast_two_calls(w, model, optimizer, batch(), batch()).ran and w.num_meta_steps == 2


def test_the_two_call_form_takes_labels_made_under_inference_mode():
    """Labels from a loader run under torch.inference_mode() keep no version counter: loss() crashed reading it
    ('Inference tensors do not track version counter'). The same steps as with ordinary labels, gamma bit for bit."""
    gammas = []
    for inference in (False, True):
        torch.manual_seed(0)
        net = mw.MultiExit([nn.Linear(4, 8), nn.Linear(8, 8)], [nn.Linear(8, 3), nn.Linear(8, 3)])
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), mode="fast")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, xv = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
            y, yv = torch.randint(0, 3, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)
            if inference:
                with torch.inference_mode():
                    y, yv = y.clone(), yv.clone()
            opt.zero_grad()
            w.loss(net(x), y).backward()
            opt.step()
            w.meta_step((x, y), (xv, yv))
        gammas.append(w.gamma.clone())
    assert torch.equal(*gammas)


@pytest.mark.parametrize("mode, backend", [("fast", "jvp"), ("exact", "finite_difference")])
def test_differences_along_adam_s_direction_ignore_weights_no_term_reaches(mode, backend):
    """A feature that is 0 in every training batch (and not in the validation batch): the first layer's
    weights for it get no training gradient, so at Adam's first step D = lr/eps there, some 1e6 times the
    rest, and the direction D * grad L_val points almost only along weights the training terms do not
    depend on. The differences must not be sized by those (they came out exactly 0 in the fast mode,
    40 % off with central differences). Reference: central differences in gamma of L_val after real
    Adam steps of a copy, in float64."""
    torch.manual_seed(0)
    model = tiny_net(3, dtype=F64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # no state yet: v = 0 where g = 0
    criterion, validation = mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3)
    validation.update(torch.tensor([1.7, 1.6, 1.5], dtype=F64))
    init = torch.tensor([1.0, 0.7, 1.3, 0.5, 0.9, 1.1])
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    train[0][:, 0] = 0.0

    def objective_after_step(gamma):
        twin, twin_opt = copy.deepcopy((model, optimizer))
        twin_opt.zero_grad()
        (gamma * criterion(twin(train[0]), train[1])).sum().backward()
        twin_opt.step()
        return validation(twin(val[0]), val[1])

    h, gamma = 1e-6, init.to(F64)
    ref = torch.stack([(objective_after_step(gamma + h * e) - objective_after_step(gamma - h * e)) / (2 * h)
                       for e in torch.eye(6, dtype=F64)])
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode=mode, backend=backend,
                              gamma_optimizer="sgd", gamma_lr=0.0, init=init)
    record = w.step(train, val)
    assert ref.norm() > 0
    assert rel_err(record.gamma_grad, ref) < 1e-3  # fast: one-sided, O(h); before the fix 1.0 (all zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_default_step_length_gives_gamma_s_gradient_in_the_model_s_dtype(dtype):
    """The fast mode's one-sided difference against jvp on a float64 copy at the same point. 64 sqrt(eps) x RMS is
    the float32 length; in bfloat16 it was a step of 5.7 x RMS, here a median error of 1.7 (4 sqrt(eps): 0.17;
    float32: 0.006)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(10, 24), nn.Tanh())] + [nn.Sequential(nn.Linear(24, 24), nn.Tanh())
                                                             for _ in range(2)]
    model = mw.MultiExit(stages, [nn.Linear(24, 4) for _ in range(3)]).to(dtype)
    make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    optimizer = make(model.parameters())
    generator = torch.Generator().manual_seed(1)
    data = lambda: (torch.randn(32, 10, generator=generator).to(dtype), torch.randint(0, 4, (32,), generator=generator))  # noqa: E731
    objective = lambda outputs, y: sum(F.cross_entropy(o, y) for o in outputs)  # noqa: E731
    options = dict(gamma_optimizer="sgd", gamma_lr=0.0, check_gradients=False)
    for _ in range(3):
        optimizer.zero_grad()
        objective(model(data()[0]), data()[1]).backward()
        optimizer.step()
    errors = []
    for _ in range(3):
        train, val = data(), data()
        twin = copy.deepcopy(model).double()
        twin_optimizer = make(twin.parameters())
        twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        reference = mw.HarmonizedWeighter(twin, twin_optimizer, mw.DenseDistillLoss(3), objective, **options).meta_step(
            (train[0].double(), train[1]), (val[0].double(), val[1])).gamma_grad.double()
        copied = copy.deepcopy(model)
        copied_optimizer = make(copied.parameters())
        copied_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        w = mw.HarmonizedWeighter(copied, copied_optimizer, mw.DenseDistillLoss(3), objective, mode="fast", **options)
        copied_optimizer.zero_grad()
        w.loss(copied(train[0]), train[1]).backward()
        copied_optimizer.step()
        errors.append(rel_err(w.meta_step(train, val).gamma_grad.double(), reference))
        optimizer.zero_grad()
        objective(model(train[0]), train[1]).backward()
        optimizer.step()
    assert sorted(errors)[1] < (0.5 if dtype == torch.bfloat16 else 0.02), errors


def test_the_step_length_is_its_formula_from_the_norms_in_float64():
    """``step_length``: h = factor eps^(1/(order+1)) RMS(theta) / ||w||, against the norms taken per tensor in
    float64; float16 vectors whose squares overflow float16 (entries of 300) and a mixed float32/float64 list."""
    from metaweight._hypergradient import LENGTH_FACTOR, LENGTH_FACTOR_16BIT, step_length
    g = torch.Generator().manual_seed(0)
    for dtypes in ([torch.float32] * 3, [torch.float16] * 3, [torch.float32, torch.float64, torch.float32]):
        shapes = [(40, 30), (7,), (3, 3, 2)]
        base = {f"p{i}": torch.randn(s, generator=g).to(d) for i, (s, d) in enumerate(zip(shapes, dtypes))}
        direction = {n: (300 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}
        norm = sum(t.double().square().sum() for t in direction.values()).sqrt()
        rms = (sum(t.double().square().sum() for t in base.values()) / sum(t.numel() for t in base.values())).sqrt()
        info = torch.finfo(dtypes[0])
        for order in (1, 2):
            factor = (LENGTH_FACTOR_16BIT if info.bits == 16 else LENGTH_FACTOR)[order]
            expected = factor * info.eps ** (1 / (order + 1)) * rms / norm
            h = step_length(base, direction, None, order)
            assert h.dtype == torch.float64 and h.shape == ()
            assert abs(h.item() / expected.item() - 1) < 1e-5, (dtypes, order)
        assert abs(step_length(base, direction, 0.5, 1).item() * norm.item() - 0.5) < 1e-6
    zero = {n: torch.zeros_like(t) for n, t in base.items()}
    assert step_length(base, zero, None, 1).item() == 0.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_fast_weighter_trains_on_in_the_two_calls_as_the_original(how):
    """The copy's model and optimizer carry the weighter's hooks inert (a copy of the model alone must not
    feed the weighter): a copied or unpickled fast weighter raised AttributeError ('ForwardWatch' object has
    no attribute 'records') at its first loss(); nor was the copy (either mode) watched for other optimizers."""
    import pickle

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), mode="fast",
                              gamma_lr=0.1)
    data = [(batch(), batch()) for _ in range(5)]
    for train, val in data[:2]:
        fast_two_calls(w, model, optimizer, train, val)
    copied = copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))
    assert copied.model is not model and copied.optimizer is not optimizer
    for train, val in data[2:]:
        fast_two_calls(w, model, optimizer, train, val)  # the original, uninterrupted: the reference
        fast_two_calls(copied, copied.model, copied.optimizer, train, val)
    assert copied.num_meta_steps == w.num_meta_steps == 5
    assert torch.equal(copied.gamma, w.gamma) and not torch.equal(w.gamma, torch.ones(6))
    for a, b in zip(model.parameters(), copied.model.parameters()):
        assert torch.equal(a, b)
    other = torch.optim.SGD(copied.model.parameters(), lr=0.1)  # another optimizer steps the copy's model
    other.step()
    with pytest.raises(ValueError, match="Another optimizer"):
        fast_two_calls(copied, copied.model, copied.optimizer, *data[0])


def test_a_shallow_copy_of_a_fast_weighter_leaves_the_original_s_hooks_in_place():
    """copy.copy shares the model, the optimizer and the live hooks: they stay the original's (re-hooking them
    for the copy, as a deep copy is, took them from the original: it kept 1 meta step of 3)."""
    def fresh():
        torch.manual_seed(0)
        model = tiny_net(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3),
                                                       mw.BalancedValidation(3), mode="fast", gamma_lr=0.1)

    data = [(batch(), batch()) for _ in range(3)]
    model, optimizer, w = fresh()
    twin_model, twin_optimizer, twin = fresh()
    for i, (train, val) in enumerate(data):
        if i == 1:
            copy.copy(w)
        fast_two_calls(w, model, optimizer, train, val)
        fast_two_calls(twin, twin_model, twin_optimizer, train, val)
    assert w.num_meta_steps == twin.num_meta_steps == 3
    assert torch.equal(w.gamma, twin.gamma)


def test_a_later_fast_weighter_on_the_same_model_removes_the_hooks_a_dropped_one_left():
    """Each fast weighter built on a model left its two forward hooks there for good, inert once it was dropped
    (Lightning's next fit with the same callback, a notebook cell run again): they piled up, two a weighter,
    called at every forward. The next weighter removes them; a live weighter's stay."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def build():
        return mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), mode="fast")

    def counts():
        return (len(model._forward_pre_hooks), len(model._forward_hooks), len(model._forward_pre_hooks_with_kwargs),
                len(model._forward_hooks_with_kwargs), len(optimizer._optimizer_step_pre_hooks),
                len(optimizer._optimizer_step_post_hooks))

    w = build()
    fast_two_calls(w, model, optimizer, batch(), batch())
    one = counts()
    assert one == (1, 1, 1, 1, 1, 1)
    for _ in range(3):
        del w
        gc.collect()
        w = build()
        fast_two_calls(w, model, optimizer, batch(), batch())
        assert counts() == one
    live = w
    other = build()  # two live weighters on one model: both keep their hooks
    assert counts() == (2, 2, 2, 2, 2, 2)
    del other
    gc.collect()
    fast_two_calls(live, model, optimizer, batch(), batch())
    assert live.num_meta_steps == 2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_between_loss_and_meta_step_says_so_where_meta_step_finds_no_loss(how):
    """The iteration under way stays with the original: the copy's meta_step asked for the loss() the user had
    called before copying, without a word of the copy; a copy made after meta_step says nothing of it (its
    meta_step, with no loss() call and no step since, is skipped)."""
    import pickle

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), mode="fast")
    train, val = batch(), batch()

    def copied():
        return copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))

    fast_two_calls(w, model, optimizer, train, val)
    skipped = copied().meta_step(train, val)  # (no loss() call and no step since its last meta step: nothing to score)
    assert skipped.skipped and "copy" not in skipped.message
    optimizer.zero_grad()
    w.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    during = copied()
    with pytest.raises(ValueError, match=r"It is a copy \(copy.deepcopy, pickle\) made since its last loss\(\) call"):
        during.meta_step(train, val)
    w.meta_step(train, val)  # the original's iteration goes on
    fast_two_calls(during, during.model, during.optimizer, train, val)  # and the copy's next one
    assert w.num_meta_steps == during.num_meta_steps == 2
