"""capturable=True (metaweight._capturable): the fast mode's step with its decisions on the device, checked
on the CPU by the rules a CUDA graph capture needs (no read back to the host, the same operations whatever
the data) and against the eager step it stands for (the same numbers, bit for bit, refused steps included)."""

import contextlib
import copy
import math

import pytest
import torch
from torch.profiler import profile

import metaweight as mw
from conftest import batch, quiet, tiny_net
from metaweight._transaction import HOST_READ


def fused_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True)


# the model's optimizers a capturable step takes: fused, as only fused kernels read found_inf
MODEL_OPTIMIZERS = {
    "sgd": fused_sgd,
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True, weight_decay=1e-3, fused=True),
    "adamw": lambda m: torch.optim.AdamW([{"params": list(m.stages.parameters()), "lr": 0.02},
                                          {"params": list(m.heads.parameters())}], lr=0.01, weight_decay=0.05,
                                         fused=True),
}


def pair(gamma_optimizer="adam", model_optimizer="sgd", **options):
    """The same model twice: an eager fast-mode weighter and a capturable one, alike in everything else."""
    torch.manual_seed(0)
    model = tiny_net(3)
    twin = copy.deepcopy(model)
    build = MODEL_OPTIMIZERS[model_optimizer]
    eager_gamma = (lambda p: torch.optim.Adam(p, lr=0.01, fused=True)) if gamma_optimizer == "adam" else "sgd"
    eager = mw.HarmonizedWeighter(model, build(model), mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                                  gamma_optimizer=eager_gamma, **options)
    capturable = mw.HarmonizedWeighter(twin, build(twin), mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                                       gamma_optimizer=gamma_optimizer, capturable=True, **options)
    return eager, capturable


def batches(seed=1):
    """Training and validation batches: clean ones, then a training input NaN (the model's step refused),
    a validation input NaN (the meta step skipped, the model's step stands), and clean ones again."""
    torch.manual_seed(seed)
    out = []
    for kind in ("clean", "clean", "clean", "nan train", "clean", "nan val", "clean", "clean"):
        (x, y), (xv, yv) = batch(), batch(12)
        if kind == "nan train":
            x[2, 1] = float("nan")
        if kind == "nan val":
            xv[0, 0] = float("nan")
        out.append(((x, y), (xv, yv)))
    return out


def state(w):
    opt = {k: v.clone() for s in w.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v)}
    gamma_opt = [v.clone() for s in w.gamma_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return (copy.deepcopy(w.model.state_dict()), list(opt.values()), w.gamma.clone(), gamma_opt,
            [b.clone() for b in w.validation.buffers()])


def alike(a, b):
    """Equal, NaN equal to NaN (the numbers of a refused step)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(alike(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def same(a, b):
    if torch.is_tensor(a):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("model_optimizer", list(MODEL_OPTIMIZERS))
@pytest.mark.parametrize("gamma_optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_capturable_step_gives_the_eager_step_s_numbers_bit_for_bit_refusals_included(gamma_optimizer, clip,
                                                                                          model_optimizer):
    eager, capturable = pair(gamma_optimizer, model_optimizer, clip_grad_norm=clip)
    for i, (train, val) in enumerate(batches()):
        with quiet():
            expected = eager.step(*copy.deepcopy((train, val)))
            got = capturable.step(*copy.deepcopy((train, val)))
        assert same(state(eager), state(capturable)), i
        for field in ("iteration", "ran", "skipped", "meta_step", "model_step_skipped", "loss", "terms", "gamma"):
            assert alike(getattr(got, field), getattr(expected, field)), (i, field, getattr(got, field),
                                                                     getattr(expected, field))
        if expected.ran and not expected.skipped:  # (a skipped one: what was computed, or nothing)
            assert alike(got.val_objective, expected.val_objective), i
            assert alike(got.val_exit_losses, expected.val_exit_losses), i
            assert torch.equal(got.gamma_grad, expected.gamma_grad), i
    assert expected.model_step_skipped is False and capturable.num_skipped == eager.num_skipped == 2
    assert (capturable.num_calls, capturable.num_meta_steps) == (eager.num_calls, eager.num_meta_steps) == (7, 6)


def _inside_fused_kernel(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::_fused_"):
        parent = parent.cpu_parent
    return parent is not None


def _reads_outside_fused_kernels(prof):
    """Reads back to the host, less those inside torch's fused optimizer kernels on the CPU (which read
    their step count there; their CUDA kernels read it on the device)."""
    return sum(e.name in ("aten::_local_scalar_dense", HOST_READ) and not _inside_fused_kernel(e)
               for e in prof.events())


def _ops_outside_fused_kernels(prof):
    """The ops in their order, less those a fused optimizer's CPU kernel calls inside itself (Adam's reads its
    step counts there, and returns before reading them where ``found_inf`` is set; its CUDA kernel is one
    launch whatever the flag)."""
    return [e.name for e in prof.events() if not _inside_fused_kernel(e)]


@pytest.mark.parametrize("model_optimizer", list(MODEL_OPTIMIZERS))
@pytest.mark.parametrize("gamma_optimizer", ["adam", "sgd"])
def test_the_capturable_step_reads_nothing_back_and_runs_the_same_ops_whatever_the_data(gamma_optimizer,
                                                                                       model_optimizer):
    """After the warm-up, device_step makes no read back to the host, and a clean step, a refused model
    step and a skipped meta step run the very same ATen ops in the same order (allocations included,
    once the first device step has allocated its storage): nothing a CUDA graph could not replay."""
    _, w = pair(gamma_optimizer, model_optimizer)
    data = batches()
    w.step(*data[0])  # the warm-up: eager
    w.device_step(*data[2])  # the first device step allocates the storage the next ones reuse
    sequences = {}
    for i in (1, 3, 5):  # clean, NaN training input, NaN validation input
        with profile() as prof:
            record = w.device_step(*data[i])
        assert _reads_outside_fused_kernels(prof) == 0, i
        sequences[i] = _ops_outside_fused_kernels(prof)
        assert isinstance(record.loss, torch.Tensor) and record.counts.dtype == torch.int64
    assert sequences[1] == sequences[3] == sequences[5]
    w.sync_counts()
    assert (w.num_calls, w.num_meta_steps, w.num_skipped) == (4, 3, 2)


def test_what_a_capturable_step_cannot_do_is_refused_at_construction_leaving_model_and_optimizer_alone():
    def build(model, optimizer=None, **options):
        optimizer = optimizer or fused_sgd(model)
        settings = {"mode": "fast", "nonfinite": "skip", "capturable": True, **options}
        return mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), **settings)

    cases = [
        ({"mode": "exact"}, None, "mode='fast'"),
        ({"learn": False}, None, "learn=True"),
        ({"meta_every": 2}, None, "meta_every=1"),
        ({"nonfinite": "raise"}, None, "nonfinite='skip'"),
        ({}, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "without fused=True"),
        ({}, lambda m: torch.optim.Adam(m.parameters(), lr=0.1), "got Adam without fused=True"),
        ({}, lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, foreach=True), "got AdamW without fused=True"),
        ({"gamma_optimizer": lambda p: torch.optim.Adam(p, lr=0.01)}, None, "fused=True \\(or capturable=True"),
    ]
    for options, optimizer, message in cases:
        model = tiny_net(3)
        opt = optimizer(model) if optimizer else fused_sgd(model)
        with pytest.raises(ValueError, match=message):
            build(model, opt, **options)
        assert not model._forward_hooks and not model._forward_pre_hooks and not opt._optimizer_step_pre_hooks


def test_a_forward_that_draws_random_numbers_is_refused_at_the_first_call_changing_nothing():
    torch.manual_seed(0)
    model = tiny_net(3)
    model.stages[1].append(torch.nn.Dropout(0.2))
    w = mw.HarmonizedWeighter(model, fused_sgd(model), mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                              capturable=True)
    before = copy.deepcopy(model.state_dict())
    train, val = batch(), batch(12)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="draws random numbers.*capturable=False.*Nothing was changed"):
        w.step(train, val)
    assert same(before, model.state_dict()) and torch.equal(rng, torch.get_rng_state())
    assert w.num_calls == 0 and not w.optimizer.state


def test_the_two_call_form_and_device_step_of_a_plain_weighter_are_refused_by_name():
    _, w = pair()
    with pytest.raises(ValueError, match="capturable=True.*meta_step is not capturable"):
        w.meta_step(batch(), batch(12))
    model = tiny_net(3)
    plain = mw.HarmonizedWeighter(model, fused_sgd(model), mw.DenseDistillLoss(3), mode="fast")
    with pytest.raises(ValueError, match="device_step\\(\\) is the step of a weighter built with capturable=True"):
        plain.device_step(batch(), batch(12))


def test_counts_hooks_and_checkpoints_of_a_capturable_weighter():
    """The counts kept on the device come to the host with sync_counts() and state_dict(); a checkpoint
    loads into a fresh capturable weighter, which goes on counting from it; step() reports to the hooks
    the meta steps that stand."""
    _, w = pair()
    heard = []
    w.register_meta_step_hook(lambda r: heard.append(r.meta_step))
    for train, val in batches()[:6]:
        with quiet():
            w.step(train, val)
    saved = w.state_dict()
    assert (saved["num_calls"], saved["num_meta_steps"], saved["num_skipped"]) == (5, 4, 2)
    assert heard == [1, 2, 3, 4]
    _, fresh = pair()
    fresh.step(*batches()[0])  # (warmed up, then the checkpoint)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.gamma, w.gamma)
    record = fresh.device_step(*batches(2)[0]).read()
    assert (record.iteration, record.meta_step) == (6, 5)


def test_an_error_in_the_device_step_s_forward_changes_nothing():
    """A forward that raises part-way (BatchNorm statistics already updated) leaves the parameters, buffers,
    optimizer state, gamma and the counts as they were."""
    _, w = pair()
    data = batches()
    w.step(*data[0])
    w.device_step(*data[1])
    before = state(w)
    counts = w._capturable.counts.clone()

    def fail(module, args, output):
        raise RuntimeError("a layer failed")
    handle = w.model.stages[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="a layer failed"):
        w.device_step(*data[2])
    handle.remove()
    assert same(before, state(w)) and torch.equal(counts, w._capturable.counts)
    assert not w.device_step(*data[2]).read().model_step_skipped


def test_padded_labels_are_refused_at_the_warm_up_changing_nothing():
    _, w = pair()
    (x, y), val = batch(), batch(12)
    y[3] = -100
    before = state(w)
    with pytest.raises(ValueError, match="train_batch \\(ignore_index=-100\\) hold padding.*capturable=False"):
        w.step((x, y), val)
    assert same(before, state(w)) and w.num_calls == 0


def test_the_gradient_check_runs_before_the_device_step_even_when_the_first_call_is_refused():
    """A first call refused for its data leaves the warm-up (and its gradient check) to the next call: a
    model with a stop-gradient on the path to an exit is refused there, as the eager step refuses it."""
    torch.manual_seed(0)
    model = tiny_net(3)
    model.heads[1].register_forward_pre_hook(lambda m, args: (args[0].detach(),))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # (momentum=0: no state to wait for)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                              gamma_optimizer="sgd", capturable=True)
    (x, y), val = batch(), batch(12)
    x[0, 0] = float("nan")
    with quiet():
        w.step((x, y), val)
    with pytest.raises(ValueError):
        w.step(batch(), batch(12))


def test_what_changed_since_the_warm_up_is_refused_by_the_device_step_changing_nothing():
    """An optimizer option set since (fused=False; foreach or differentiable=True), a weighter option set since
    (learn, mode, meta_every, nonfinite; gamma's Adam no longer fused), a step pre-hook on the optimizer, and a
    buffer the forward resizes in place: each refused with a ValueError by step() and device_step(), the model,
    optimizer and gamma as they were."""
    weighter_options = {"learn": (False, "learn=False"), "mode": ("exact", "mode='exact'"),
                        "meta_every": (2, "meta_every=2"), "nonfinite": ("raise", "nonfinite='skip'")}
    for change in ("unfused", "foreach", "differentiable", "gamma unfused", "hook", "resize", *weighter_options):
        _, w = pair()
        data = batches()
        w.step(*data[0])
        w.device_step(*data[1])
        before = state(w)
        undo = None
        if change == "unfused":
            w.optimizer.param_groups[0]["fused"] = False
            match = "without fused=True"
        elif change in ("foreach", "differentiable"):
            w.optimizer.param_groups[0][change] = True
            match = f"fused=True and {change}=True"
        elif change == "gamma unfused":
            w.gamma_optimizer.param_groups[0]["fused"] = False
            match = "gamma on the device.*Adam without them"
        elif change in weighter_options:
            value, match = weighter_options[change]
            setattr(w, change, value)
        elif change == "hook":
            undo = w.optimizer.register_step_pre_hook(lambda opt, args, kwargs: None)
            match = "hook"
        else:
            bn = w.model.stages[0][1]
            undo = bn.register_forward_hook(lambda m, a, o: setattr(m.running_mean, "data", torch.zeros(11)))
            match = "registered, replaced, removed or resized a buffer"
        for call in (w.device_step, w.step):
            expected = match + ".*(Nothing was changed|unchanged)" if change != "resize" else match
            with pytest.raises(ValueError, match=expected):
                call(*data[2])
        if undo is not None:
            undo.remove()
        assert same(before, state(w)), change


def unfreezing_pair():
    """An eager and a capturable weighter whose optimizers hold heads[2] in a parameter group of its own, frozen."""
    def build(model):
        head = list(model.heads[2].parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in head)]
        return torch.optim.SGD([{"params": rest}, {"params": head}], lr=0.1, momentum=0.9, fused=True)

    torch.manual_seed(0)
    model = tiny_net(3)
    twin = copy.deepcopy(model)
    weighters = [mw.HarmonizedWeighter(m, build(m), mw.DenseDistillLoss(3), mode="fast", nonfinite="skip",
                                       gamma_optimizer=g, capturable=c)
                 for m, g, c in ((model, lambda p: torch.optim.Adam(p, lr=0.01, fused=True), False),
                                 (twin, "adam", True))]
    for m in (model, twin):
        m.heads[2].requires_grad_(False)
    return weighters


def test_a_parameter_group_s_first_momentum_step_runs_eagerly_so_a_refused_one_leaves_no_garbage():
    """Progressive unfreezing: a head trained from the fifth call on, in a parameter group of its own. Its first
    momentum step (torch's fused SGD makes the buffers with empty_like and fills them in the kernel, which a
    refused step leaves unwritten) runs as the eager step: a refused one leaves no buffer, as the eager weighter
    leaves none, and every call gives the eager numbers bit for bit. A group mixing started and new
    parameters, which torch's fused SGD cannot step, is refused by name, changing nothing."""
    weighters = unfreezing_pair()
    data = batches()  # the fifth call's training input holds a NaN: the head's first step is refused
    with quiet():
        for i, (train, val) in enumerate(data):
            if i == 3:
                for w in weighters:
                    w.model.heads[2].requires_grad_(True)
            records = [w.step(*copy.deepcopy((train, val))) for w in weighters]
            assert alike(records[0].gamma, records[1].gamma) and same(state(weighters[0]), state(weighters[1])), i
            if i == 3:
                assert records[1].model_step_skipped and weighters[1]._capturable.eager
                assert all(p not in w.optimizer.state for w in weighters for p in w.model.heads[2].parameters())
    assert not weighters[1]._capturable.eager and weighters[1].num_meta_steps == weighters[0].num_meta_steps == 6
    _, w = pair()  # one parameter group: the head unfrozen later shares it with started parameters
    w.model.heads[2].requires_grad_(False)
    w.step(*data[0])
    w.device_step(*data[1])
    w.model.heads[2].requires_grad_(True)
    before = state(w)
    with pytest.raises(ValueError, match="group 0 of the fused SGD holds parameters with momentum buffers and 2 "
                                         "that get their first gradient.*add_param_group.*Nothing was changed"):
        w.device_step(*data[2])
    assert same(before, state(w))


def test_step_warns_of_refused_steps_and_puts_back_a_meta_step_whose_hook_raised_as_the_eager_step():
    """step() of a capturable weighter after its warm-up: a refused model step and a skipped meta step warn as
    the eager step's do; a hook that raises leaves the model's step counted and gamma, its optimizer and the
    validation average as before, as the eager step leaves them; the hooks hear the same records."""
    eager, capturable = pair()
    heard = {id(eager): [], id(capturable): []}
    for w in (eager, capturable):
        def hook(record, w=w):
            heard[id(w)].append(record)
            if len(heard[id(w)]) == 2:
                raise RuntimeError("a user's hook failed")
        w.register_meta_step_hook(hook)
    for i, (train, val) in enumerate(batches()):
        said = []
        for w in (eager, capturable):
            with pytest.warns() if i in (3, 5) else contextlib.nullcontext() as caught:
                if i == 1:
                    with pytest.raises(RuntimeError, match="hook failed"):
                        w.step(*copy.deepcopy((train, val)))
                else:
                    w.step(*copy.deepcopy((train, val)))
            said.append([str(c.message).split(":")[0] for c in caught] if caught is not None else [])
        assert said[0] == said[1], (i, said)
        assert i not in (3, 5) or said[0] == ["Skipped a model step (1 skipped so far)" if i == 3 else
                                              "Skipped a meta step (2 so far)"]
        assert same(state(eager), state(capturable)), i
        assert (eager.num_calls, eager.num_meta_steps, eager.num_skipped) == \
            (capturable.num_calls, capturable.num_meta_steps, capturable.num_skipped), i
    assert [r.meta_step for r in heard[id(eager)]] == [r.meta_step for r in heard[id(capturable)]]
    assert alike(eager.last_meta.gamma, capturable.last_meta.gamma)
    # (the record step() returns, its loss too, as the eager step's: the hooks get it since helper-136's review)
    assert capturable.last_meta.loss == pytest.approx(eager.last_meta.loss, rel=1e-5)
    assert capturable.last_meta.model_step_skipped is False and eager.last_meta.model_step_skipped is False


def test_a_checkpoint_of_an_eager_weighter_keeps_the_capturable_gamma_optimizer_fused():
    """torch's load_state_dict takes a group's options from the state it loads: a checkpoint of a weighter
    whose gamma's Adam is not fused (the user's own) would un-fuse a capturable weighter's gamma optimizer, which its device
    step then refuses. The weighter keeps its own implementation options; gamma and its moments load."""
    torch.manual_seed(0)
    model = tiny_net(3)
    plain = mw.HarmonizedWeighter(model, fused_sgd(model), mw.DenseDistillLoss(3), mode="fast",
                                  gamma_optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    plain.step(*batches()[0])
    assert not plain.gamma_optimizer.param_groups[0].get("fused")
    saved = plain.state_dict()
    _, w = pair()
    w.step(*batches()[1])
    w.load_state_dict(saved)
    assert w.gamma_optimizer.param_groups[0]["fused"] and torch.equal(w.gamma, plain.gamma)
    moments = plain.gamma_optimizer.state[plain.gamma]
    assert torch.equal(w.gamma_optimizer.state[w.gamma]["exp_avg"], moments["exp_avg"])
    assert not w.device_step(*batches()[2]).read().model_step_skipped


def test_the_eager_call_of_a_device_step_loop_counts_on_from_the_device_s_counts():
    """device_step() reads nothing back, so the host's counts lag; the eager call a first momentum step makes
    starts from the device's, and the device's take its count even when a hook raised after its model step."""
    weighters = unfreezing_pair()
    failing = []

    def hook(record):
        if failing:
            raise RuntimeError("a user's hook failed")
    for w in weighters:
        w.step(*batches()[0])  # (the warm-up)
        w.register_meta_step_hook(hook)
    for i, (train, val) in enumerate(batches(3)):
        failing[:] = [True] if i == 4 else []
        if i == 4:
            for w in weighters:
                w.model.heads[2].requires_grad_(True)
        for w, call in zip(weighters, (weighters[0].step, weighters[1].device_step)):
            with pytest.raises(RuntimeError, match="hook failed") if i == 4 else contextlib.nullcontext():
                with quiet():
                    call(*copy.deepcopy((train, val)))
        weighters[1].sync_counts()
        assert [(w.num_calls, w.num_meta_steps, w.num_skipped) for w in weighters[:1]] == \
            [(weighters[1].num_calls, weighters[1].num_meta_steps, weighters[1].num_skipped)], i
        assert same(state(weighters[0]), state(weighters[1])), i


def test_a_plain_callable_objective_has_no_per_exit_losses_in_its_records_or_logs(tmp_path):
    """A validation objective that is a plain callable (a multi-task model's own loss) gave its one value as the
    record's val_exit_losses, which the loggers wrote as a column val_ce[1], read as a cross-entropy and a copy of
    val_objective (helper-174). Its records, eager and from the device, have none, and the log no val_ce column;
    BalancedValidation's per-exit losses are logged as before."""
    import csv
    import torch.nn.functional as F

    def last_exit(outputs, target):
        return F.cross_entropy(outputs[-1], target)

    for validation, columns in ((last_exit, []), (mw.BalancedValidation(3), ["val_ce[1]", "val_ce[2]", "val_ce[3]"])):
        eager, capturable = pair(validation=validation)
        logged = mw.CSVLogger(tmp_path / f"{len(columns)}.csv")
        eager.register_meta_step_hook(logged)
        train, val = batches()[0]
        record = eager.step(train, val)
        device = capturable.device_step(train, val).read()
        logged.close()
        with open(tmp_path / f"{len(columns)}.csv") as f:
            header = next(csv.reader(f))
        assert [c for c in header if c.startswith("val_ce")] == columns and "val_objective" in header
        for r in (record, device):
            assert r.ran and (r.val_exit_losses is None) == (not columns) and math.isfinite(r.val_objective)
            assert r.val_exit_losses is None or len(r.val_exit_losses) == 3
