"""Lightning, Accelerate and the transformer example: a few real steps each."""

import math
import sys
from pathlib import Path

import pytest
import torch

import metaweight as mw

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from transformer import counting_task, transformer_multi_exit  # noqa: E402


def test_counting_task_labels_are_the_most_frequent_token():
    ids, labels = counting_task(50, num_classes=4, seed=3)
    for seq, label in zip(ids, labels):
        counts = [(seq == c + 1).sum().item() for c in range(4)]
        assert label.item() == counts.index(max(counts))


def test_transformer_jvp_meta_gradient_agrees_with_higher():
    grads = {}
    ids, labels = counting_task(8, seq_len=12)
    val = counting_task(8, seq_len=12, seed=1)
    for backend in ("higher", "jvp"):
        torch.manual_seed(0)
        net = transformer_multi_exit(16, 4, num_layers=3, d_model=16, nhead=2, dim_feedforward=32).double()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        w = mw.preset("hdkd", 3).weighter(net, opt, backend=backend)
        torch.manual_seed(1)  # the same dropout masks for both
        grads[backend] = w.meta_step((ids, labels), val)["gamma_grad"].double()
    err = float((grads["jvp"] - grads["higher"]).norm() / grads["higher"].norm())
    assert err < 1e-4, err


def test_accelerate_example_runs_a_few_steps():
    pytest.importorskip("accelerate")
    import accelerate_train

    out = accelerate_train.main(["--max-steps", "3", "--cpu", "--layers", "2", "--batch-size", "16"])
    assert out["steps"] == 3 and len(out["test"]["top1"]) == 2
    assert set(out["gamma"]) == set(mw.DenseDistillLoss(2).term_names)
    # accelerator.accumulate and clip_grad_norm_, a loop's own: the fast mode scores each step as taken (every one
    # clipped at this max norm), one meta step per optimizer step on its micro-batches; exact takes no accumulation
    out = accelerate_train.main(["--max-steps", "3", "--cpu", "--layers", "2", "--batch-size", "16", "--mode", "fast",
                                 "--accumulate", "2", "--max-grad-norm", "1e-3"])
    assert out["steps"] == out["meta_steps"] == 3
    with pytest.raises(SystemExit):
        accelerate_train.main(["--accumulate", "2", "--cpu"])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_lightning_callback_trains_and_checkpoints(mode, tmp_path):
    pytest.importorskip("lightning")
    import lightning_train

    out = lightning_train.main(["--max-steps", "3", "--mode", mode])
    assert out["steps"] == 3 and len(out["test"]["top1"]) == 3
    assert out["gamma"] != {n: 1.0 for n in out["gamma"]}  # the meta steps ran and moved gamma
    out = lightning_train.main(["--max-steps", "3", "--mode", mode, "--accumulate-grad-batches", "2",
                                "--gradient-clip-val", "1e-3"])  # (every step clipped: declared with mode='fast')
    assert out["steps"] == 3 and out["gamma"] != {n: 1.0 for n in out["gamma"]}

    from metaweight.lightning import HarmonizedCallback

    cb = HarmonizedCallback(mw.DenseDistillLoss(3), [])
    assert cb.state_dict() == {}
    with pytest.warns(UserWarning, match="no position in the validation dataloader"):  # (an older checkpoint)
        cb.load_state_dict({"gamma": torch.ones(6)})  # kept until the weighter exists
    assert cb._pending_state is not None


@pytest.mark.parametrize("method,start", [("famo", 1 / 6), ("gradnorm", 1.0)])
def test_lightning_weighting_callback_trains(method, start):
    pytest.importorskip("lightning")
    import lightning_train

    out = lightning_train.main(["--max-steps", "3", "--method", method])
    assert out["steps"] == 3 and len(out["test"]["top1"]) == 3
    assert any(abs(v - start) > 1e-6 for v in out["gamma"].values())  # the updates ran and moved the weights

    from metaweight.lightning import WeightingCallback

    with pytest.raises(TypeError, match="callable"):
        WeightingCallback("famo")


def _two_exit_net():
    """Two stages of 16 units, an exit after each (4 classes), seeded."""
    torch.manual_seed(0)
    return mw.MultiExit([torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh()),
                         torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())],
                        [torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)])


@pytest.mark.parametrize("kind", ["famo", "dwa", "hdkd exact", "hdkd fast"])
def test_lightning_callbacks_take_one_meta_step_per_optimizer_step_under_gradient_accumulation(kind):
    """accumulate_grad_batches=2: one meta step per optimizer step, as the two calls give it in a loop of one's
    own: the weightings and the fast mode after the step on the two batches concatenated (the step's whole
    batch), the exact mode before the first of the two. Before, every batch took one (FAMO scoring a step not
    taken, the fast mode refusing every step)."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule
    from metaweight.lightning import HarmonizedCallback, WeightingCallback

    g = torch.Generator().manual_seed(5)
    train = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(6)]
    val = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    criterion = mw.DenseDistillLoss(2)
    method, _, mode = kind.partition(" ")

    def build(model, optimizer):
        if method == "hdkd":
            return mw.HarmonizedWeighter(model, optimizer, criterion, mode=mode, gamma_lr=0.05)
        return mw.WEIGHTINGS[method](model, optimizer, criterion, **({"window": 1} if method == "dwa" else {}))

    module = MultiExitModule(_two_exit_net(), lr=0.1)
    callback = (HarmonizedCallback(criterion, val, mode=mode, gamma_lr=0.05) if method == "hdkd" else
                WeightingCallback(build))
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                accumulate_grad_batches=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in train]),
                                                                        torch.cat([y for _, y in train])), batch_size=8)
    trainer.fit(module, loader)
    assert trainer.global_step == 3

    model = _two_exit_net()  # the same steps in a loop of one's own
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    w = build(model, optimizer)
    for step in range(3):
        parts, v = train[2 * step:2 * step + 2], val[step]
        if mode == "exact":
            w.meta_step(parts[0], v)
        optimizer.zero_grad()
        for x, y in parts:
            (w.loss(model(x), y) / 2).backward()
        optimizer.step()
        whole = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        if mode != "exact":
            w.meta_step(whole, v)
    assert w.num_meta_steps == module.weighter.num_meta_steps == 3
    got, expected = module.weighter.gamma_dict(), w.gamma_dict()
    assert all(abs(got[k] - expected[k]) <= 1e-5 * max(1.0, abs(expected[k])) for k in got), (got, expected)


def _skip_data(n):
    """n training samples (6 features, 4 classes) and n // 8 validation batches of 8, of one seed."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    return x, y, [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n // 8)]


def _fit_skipping(lightning, kind, module, x, y, val, **trainer):
    """One epoch of Lightning over (x, y) in batches of 8, with the callback of kind ("uw", ..., "hdkd fast")."""
    from metaweight.lightning import HarmonizedCallback, WeightingCallback

    criterion = mw.DenseDistillLoss(2)
    method, _, mode = kind.partition(" ")

    def build(model, optimizer):
        return mw.WEIGHTINGS[method](model, optimizer, criterion,
                                     **({"epochs": 3, "steps_per_epoch": 2} if method == "sdn" else {}))

    callback = HarmonizedCallback(criterion, val, mode=mode, gamma_lr=0.05) if method == "hdkd" else \
        WeightingCallback(build)
    lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                      **trainer).fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                                         batch_size=8))
    return module.weighter


@pytest.mark.parametrize("calls_loss", [False, True], ids=["", "loss() called first"])
@pytest.mark.parametrize("accumulate, skipped", [(1, {1}), (2, {2, 3})], ids=["one batch", "an accumulated step"])
@pytest.mark.parametrize("kind", ["uw", "famo", "sdn", "hdkd fast"])
def test_lightning_callbacks_leave_out_a_batch_training_step_skipped(kind, accumulate, skipped, calls_loss):
    """training_step returning None, Lightning's way to skip a batch (it then steps the optimizer on no gradient):
    the callbacks called meta_step for it, which refused it (no loss() call, or the NaN terms of one the step
    checked and skipped) and stopped the fit (helper-172). The meta step leaves such a batch out, and makes none
    for an optimizer step whose every batch was skipped: the fit equals one without those batches."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule

    x, y, val = _skip_data(48)

    class Skipping(MultiExitModule):
        def training_step(self, batch, batch_idx):
            if batch_idx not in skipped:
                return super().training_step(batch, batch_idx)
            if calls_loss:  # (the loss found not finite, as a loop checking torch.isfinite(loss) would)
                loss = self.weighter.loss([o * math.nan for o in self(batch[0])], batch[1])
                assert not torch.isfinite(loss)
            return None

    def fit(module, keep):
        return _fit_skipping(lightning, kind, module, x[keep], y[keep], val, accumulate_grad_batches=accumulate)

    got = fit(Skipping(_two_exit_net(), lr=0.1), list(range(48)))
    expected = fit(MultiExitModule(_two_exit_net(), lr=0.1), [i for i in range(48) if i // 8 not in skipped])
    assert got.num_meta_steps == expected.num_meta_steps == 6 // accumulate - len(skipped) // accumulate
    assert torch.equal(got.gamma, expected.gamma)
    assert all(torch.equal(a, b) for a, b in zip(got.module.parameters(), expected.module.parameters()))


@pytest.mark.parametrize("kind", ["uw", "famo", "hdkd fast"])
def test_lightning_manual_optimization_may_skip_a_batch_before_its_loss(kind):
    """Manual optimization, a training_step that returns early for a batch (before its loss() call, with no step):
    the callbacks' meta_step refused it ("reads the terms of this iteration", "needs the training loss") and
    stopped the fit (helper-173). A meta_step with no loss() call and no optimizer step since the last one is
    skipped: the fit equals one without that batch."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule

    x, y, val = _skip_data(32)

    class Manual(MultiExitModule):
        def __init__(self, *args, skipped=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False
            self.skipped = skipped

        def training_step(self, batch, batch_idx):
            if batch_idx in self.skipped:
                return None
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(self.weighter.loss(self(batch[0]), batch[1]))
            optimizer.step()

    def fit(module, keep):
        return _fit_skipping(lightning, kind, module, x[keep], y[keep], val)

    got = fit(Manual(_two_exit_net(), lr=0.1, skipped={1}), list(range(32)))
    expected = fit(Manual(_two_exit_net(), lr=0.1), [i for i in range(32) if i // 8 != 1])
    assert got.num_meta_steps == expected.num_meta_steps == 3
    assert torch.equal(got.gamma, expected.gamma)
    assert all(torch.equal(a, b) for a, b in zip(got.module.parameters(), expected.module.parameters()))


def test_lightning_weighting_callback_takes_batches_of_any_structure_for_methods_that_read_none():
    """A dict batch (or (x, y, index)): the weightings but FAMO read no batch in meta_step, so none is handed
    to them (before, every method refused it after the first step: "train_batch should be a pair")."""
    lightning = pytest.importorskip("lightning")
    from metaweight.lightning import WeightingCallback

    class DictModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = mw.MultiExit([torch.nn.Linear(6, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 3)] * 2)

        def training_step(self, batch, batch_idx):
            return self.weighter.loss(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = [{"x": torch.randn(8, 6), "y": torch.randint(0, 3, (8,))} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    module = DictModule()
    callback = WeightingCallback(lambda model, opt: mw.UW(model, opt, mw.DenseDistillLoss(2)))
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                accumulate_grad_batches=2)
    trainer.fit(module, loader)
    assert module.weighter.num_meta_steps == trainer.global_step == 2


class _Logged:
    """Held-out batches (a list) that record the index of every batch read, in order."""

    def __init__(self, batches):
        self.batches, self.reads = batches, []

    def __iter__(self):
        for i, b in enumerate(self.batches):
            self.reads.append(i)
            yield b


def _fit_for_resume(lightning, callback, epochs, *, ckpt_dir=None, ckpt_path=None, shuffle=False):
    """4 training batches an epoch, no shuffling of the training data, deterministic."""
    from lightning_train import MultiExitModule

    module = MultiExitModule(_two_exit_net(), lr=0.1)
    callbacks = [callback]
    if ckpt_dir is not None:
        callbacks.append(lightning.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1,
                                                                     every_n_epochs=1, filename="{epoch}"))
    g = torch.Generator().manual_seed(7)
    train = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                                enable_checkpointing=ckpt_dir is not None, enable_model_summary=False,
                                enable_progress_bar=False, deterministic=True)
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=8), ckpt_path=ckpt_path)
    return module


def _held_out(n=3):
    g = torch.Generator().manual_seed(8)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_lightning_callback_resumed_from_a_checkpoint_equals_the_uninterrupted_run(mode, tmp_path):
    """3 held-out batches a pass, 4 meta steps an epoch: the epoch-0 checkpoint falls one batch into a pass.
    Resumed from it, the run is bit for bit the uninterrupted one (gamma, parameters), reading the held-out
    batches it would have. Before, the held-out loader started again at its first batch on resume: here gamma
    1.4e-2 apart after 2 epochs in either mode (1.2e-1 after 3 in the tester's run)."""
    lightning = pytest.importorskip("lightning")
    from metaweight.lightning import HarmonizedCallback

    def callback(val):
        return HarmonizedCallback(mw.DenseDistillLoss(2), val, gamma_lr=0.05, mode=mode)

    straight_val, resumed_val = _Logged(_held_out()), _Logged(_held_out())
    straight = _fit_for_resume(lightning, callback(straight_val), 2, ckpt_dir=tmp_path)
    assert torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["callbacks"]  # the callback saved its state
    resumed = _fit_for_resume(lightning, callback(resumed_val), 2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))

    assert resumed.weighter.num_meta_steps == straight.weighter.num_meta_steps == 8
    gamma, expected = resumed.weighter.gamma, straight.weighter.gamma
    assert torch.equal(gamma, expected), gamma - expected
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))
    assert straight_val.reads == [0, 1, 2, 0, 1, 2, 0, 1]
    assert resumed_val.reads == [0] + straight_val.reads[4:]  # the one batch taken before the checkpoint, dropped


@pytest.mark.parametrize("kind", ["exact", "fast", "uw"])
def test_a_second_fit_with_the_same_callback_goes_on_from_the_first(kind):
    """Two fits of one epoch each with the same callback and module (a new Trainer each) equal one fit of two
    epochs bit for bit: gamma, its state, the counts and the held-out position go on (the model's optimizer is
    plain SGD, which configure_optimizers building it anew does not reset). Before, the second fit built the
    weighter from scratch: gamma started again from its initial values and the held-out batches from the first."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule

    from metaweight.lightning import HarmonizedCallback, WeightingCallback

    class Plain(MultiExitModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def run(epochs_per_fit):
        module = Plain(_two_exit_net(), lr=0.1)
        val = _Logged(_held_out())
        callback = WeightingCallback(lambda model, opt: mw.UW(model, opt, mw.DenseDistillLoss(2))) \
            if kind == "uw" else HarmonizedCallback(mw.DenseDistillLoss(2), val, gamma_lr=0.05, mode=kind)
        g = torch.Generator().manual_seed(7)
        train = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g),
                                               torch.randint(0, 4, (32,), generator=g))
        for epochs in epochs_per_fit:
            trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                        callbacks=[callback], enable_checkpointing=False, enable_model_summary=False,
                                        enable_progress_bar=False, deterministic=True)
            trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=8))
        return module, val

    (straight, straight_val), (staged, staged_val) = run([2]), run([1, 1])
    assert staged.weighter.num_meta_steps == straight.weighter.num_meta_steps == 8
    assert torch.equal(staged.weighter.gamma, straight.weighter.gamma), staged.weighter.gamma - straight.weighter.gamma
    assert all(torch.equal(a, b) for a, b in zip(staged.parameters(), straight.parameters()))
    assert staged_val.reads == straight_val.reads


def test_lightning_callback_loads_a_checkpoint_without_the_held_out_position_as_before(tmp_path):
    """A checkpoint saved before the position was kept still loads; it warns that the held-out batches start
    again at the first one, and they do. A shuffled held-out loader resumes too, taking the batches left in
    its pass (the pass boundaries stay where they were)."""
    lightning = pytest.importorskip("lightning")
    from metaweight.lightning import HarmonizedCallback

    _fit_for_resume(lightning, HarmonizedCallback(mw.DenseDistillLoss(2), _held_out(), gamma_lr=0.05), 1,
                    ckpt_dir=tmp_path)
    checkpoint = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("HarmonizedCallback")]
    assert state.pop("val_batches_taken") == 1
    torch.save(checkpoint, tmp_path / "old.ckpt")

    val = _Logged(_held_out())
    with pytest.warns(UserWarning, match="no position in the validation dataloader"):
        old = _fit_for_resume(lightning, HarmonizedCallback(mw.DenseDistillLoss(2), val, gamma_lr=0.05), 2,
                              ckpt_path=str(tmp_path / "old.ckpt"))
    assert val.reads == [0, 1, 2, 0] and old.weighter.num_meta_steps == 8

    sampler_seen = []

    class CountingSampler(torch.utils.data.RandomSampler):
        def __iter__(self):
            for i in super().__iter__():
                sampler_seen.append(i)
                yield i

    data = _held_out()
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=CountingSampler(data))
    shuffled = _fit_for_resume(lightning, HarmonizedCallback(mw.DenseDistillLoss(2), loader, gamma_lr=0.05), 2,
                               ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert shuffled.weighter.num_meta_steps == 8
    assert len(sampler_seen) == 5 and sorted(sampler_seen[:3]) == [0, 1, 2]  # 1 dropped, 2 left, a new pass's 2


def test_lightning_callback_refuses_a_bad_held_out_position_and_warns_when_the_loader_is_shorter():
    pytest.importorskip("lightning")
    from metaweight import lightning as mwl

    callback = mwl.HarmonizedCallback(mw.DenseDistillLoss(2), _held_out())
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="val_batches_taken"):
            callback.load_state_dict({"gamma": torch.ones(3), "val_batches_taken": bad})
        assert callback._pending_state is None and callback._resume_at is None  # nothing changed

    batches = _held_out(2)
    held_out = mwl._HeldOut(batches, skip=2)  # the position at the end of a pass: the next pass starts
    assert held_out.position == 2  # (a checkpoint before the first meta step of a resumed run keeps it)
    assert next(held_out) is batches[0] and held_out.taken == held_out.position == 1
    held_out = mwl._HeldOut(batches, skip=5)
    with pytest.warns(UserWarning, match="past its end"):
        assert next(held_out) is batches[0]
    assert [next(held_out) for _ in range(3)] == [batches[1], batches[0], batches[1]] and held_out.taken == 2
    with pytest.raises(ValueError, match="yielded no batch"):
        next(mwl._HeldOut([], skip=3))


def test_lightning_fast_callback_declares_the_trainer_s_norm_clipping_and_refuses_value_clipping():
    """Trainer(gradient_clip_val=c) with HarmonizedCallback(mode='fast'): the weighter is told of the clipping (its
    look-ahead is the clipped step), so the fit equals a loop of one's own with clip_grad_norm_(c) and the declared
    weighter, gamma to 1e-5 (helper-149: the clipping was not declared, and the first clipped step was refused
    after Lightning had taken it). Clipping by value, and a clip_grad_norm option other than the Trainer's, are
    refused when the fit starts, before any step."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule
    from metaweight.lightning import HarmonizedCallback

    g = torch.Generator().manual_seed(5)
    train = [(3 * torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    val = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    criterion = mw.DenseDistillLoss(2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in train]),
                                                                        torch.cat([y for _, y in train])), batch_size=8)

    def fit(algorithm="norm", **options):
        module = MultiExitModule(_two_exit_net(), lr=0.1)
        trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                    callbacks=[HarmonizedCallback(criterion, val, mode="fast", gamma_lr=0.05, **options)],
                                    enable_checkpointing=False, enable_model_summary=False,
                                    gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
        before = [p.detach().clone() for p in module.parameters()]
        try:
            trainer.fit(module, loader)
        except ValueError:
            assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # (refused before a step)
            raise
        return module, trainer

    module, trainer = fit()
    assert trainer.global_step == 4 and module.weighter.clip_grad_norm == mw.ClipGradNorm(0.5)
    model = _two_exit_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, mode="fast", gamma_lr=0.05, clip_grad_norm=0.5)
    clipped = 0
    for (x, y), v in zip(train, val):
        optimizer.zero_grad()
        w.loss(model(x), y).backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)) > 0.5
        optimizer.step()
        w.meta_step((x, y), v)
    assert clipped == 4  # (every step clipped: the clipping is what is tested)
    got, expected = module.weighter.gamma_dict(), w.gamma_dict()
    assert all(abs(got[k] - expected[k]) <= 1e-5 * max(1.0, abs(expected[k])) for k in got), (got, expected)

    with pytest.raises(ValueError, match="clips each gradient by value.*gradient_clip_algorithm='norm'"):
        fit("value")
    with pytest.raises(ValueError, match="clip_grad_norm=1.0, but the Trainer clips with gradient_clip_val=0.5"):
        fit(clip_grad_norm=1.0)
    assert fit(clip_grad_norm=mw.ClipGradNorm(0.5))[1].global_step == 4
    for bad in ("abc", True):  # the weighter's own refusal, before any step (helper-150: a raw float() error; True
        with pytest.raises(TypeError, match="`clip_grad_norm` should be"):  # taken as 1.0)
            fit(clip_grad_norm=bad)



@pytest.mark.parametrize("case", ["declared, not clipped", "clipped, undeclared"])
def test_lightning_fast_callback_s_clipping_refusals_name_what_to_change_in_lightning(case):
    """A LightningModule whose configure_gradient_clipping does not clip as the Trainer's gradient_clip_val says (or
    clips with no gradient_clip_val): the refusal names the Trainer's gradient_clip_val, configure_gradient_clipping
    and HarmonizedCallback's clip_grad_norm, where a loop of one's own is told to build the weighter otherwise (which
    the callback builds: the hint named a constructor the user never calls)."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule
    from metaweight.lightning import HarmonizedCallback

    class OwnClipping(MultiExitModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            if case == "clipped, undeclared":
                torch.nn.utils.clip_grad_norm_(self.parameters(), 0.01)

    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(3 * torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
    val = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))]
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                callbacks=[HarmonizedCallback(mw.DenseDistillLoss(2), val, mode="fast")],
                                enable_checkpointing=False, enable_model_summary=False,
                                gradient_clip_val=0.01 if case == "declared, not clipped" else None)
    with pytest.raises(ValueError) as info:
        trainer.fit(OwnClipping(_two_exit_net()), torch.utils.data.DataLoader(data, batch_size=8))
    said = str(info.value)
    assert "build the weighter" not in said.lower(), said
    assert "Trainer(gradient_clip_val=max_norm)" in said and "HarmonizedCallback(" in said and \
        "clip_grad_norm=mw.ClipGradNorm(max_norm, norm_type)" in said, said
    if case == "declared, not clipped":
        assert "were not clipped" in said and "configure_gradient_clipping" in said and \
            "gradient_clip_val=0.01" in said, said
    else:
        assert "the weighter was told of no clipping" in said, said


def test_lightning_clipping_declared_in_float32_or_as_no_number_is_judged_as_the_weighter_judges_it():
    """helper-151: clip_grad_norm=np.float32(0.05) (or a float32 tensor) beside Trainer(gradient_clip_val=0.05) was
    refused as another clipping (0.05 in float32 is not the float 0.05), and a NaN, 0 or negative one was refused
    as an 'Invalid max_norm' where, without the Trainer's clipping, the weighter says 'Invalid clip_grad_norm'."""
    pytest.importorskip("lightning")
    import types

    import numpy as np
    from metaweight.lightning import _with_trainer_clipping

    trainer = types.SimpleNamespace(gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    for agreeing in (np.float32(0.05), torch.tensor(0.05), 0.05, mw.ClipGradNorm(0.05)):
        assert _with_trainer_clipping(trainer, {"mode": "fast", "clip_grad_norm": agreeing})["clip_grad_norm"] == \
            mw.ClipGradNorm(0.05)
    with pytest.raises(ValueError, match="but the Trainer clips with gradient_clip_val=0.05"):
        _with_trainer_clipping(trainer, {"mode": "fast", "clip_grad_norm": np.float32(0.0501)})
    net = _two_exit_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        options = _with_trainer_clipping(trainer, {"mode": "fast", "clip_grad_norm": bad})
        with pytest.raises(ValueError, match="Invalid clip_grad_norm"):  # (the weighter's own refusal, unchanged)
            mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), **options)


def test_lightning_fast_callback_declaring_a_clipping_nothing_takes_is_refused_before_the_first_step():
    """HarmonizedCallback(mode='fast', clip_grad_norm=0.5) with no Trainer gradient_clip_val and a LightningModule
    that keeps Lightning's configure_gradient_clipping: nothing clips, so the declared clipping is never the step
    Lightning takes. It was refused only at the first step, after Lightning had taken it (left by helper-151); it
    is refused when the fit starts, the model unchanged. A module of one's own that clips is let through."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule
    from metaweight.lightning import HarmonizedCallback

    class OwnClipping(MultiExitModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            torch.nn.utils.clip_grad_norm_(self.parameters(), 0.5)

    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(3 * torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
    val = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g))]

    def fit(module):
        trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                    callbacks=[HarmonizedCallback(mw.DenseDistillLoss(2), val, mode="fast",
                                                                  clip_grad_norm=0.5)],
                                    enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        return trainer

    module = MultiExitModule(_two_exit_net(), lr=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="nothing in this fit clips.*Trainer\\(gradient_clip_val=max_norm\\)"):
        fit(module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert fit(OwnClipping(_two_exit_net(), lr=0.1)).global_step == 2


def test_metaweight_lightning_without_lightning_says_what_to_install(monkeypatch):
    """Without the ``lightning`` package, ``import metaweight.lightning`` raised a bare ModuleNotFoundError; a project
    with only ``pytorch_lightning`` got no hint (helper-166). It names the extra to install."""
    monkeypatch.setitem(sys.modules, "lightning", None)  # (import lightning then fails, as where it is not installed)
    monkeypatch.delitem(sys.modules, "metaweight.lightning", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'metaweight\[lightning\]'.*pytorch_lightning"):
        import metaweight.lightning  # noqa: F401
