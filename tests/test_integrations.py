"""Lightning, Accelerate and the transformer example: a few real steps each."""

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


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_lightning_callback_trains_and_checkpoints(mode, tmp_path):
    pytest.importorskip("lightning")
    import lightning_train

    out = lightning_train.main(["--max-steps", "3", "--mode", mode])
    assert out["steps"] == 3 and len(out["test"]["top1"]) == 3
    assert out["gamma"] != {n: 1.0 for n in out["gamma"]}  # the meta steps ran and moved gamma

    from metaweight.lightning import HarmonizedCallback

    cb = HarmonizedCallback(mw.DenseDistillLoss(3), [])
    assert cb.state_dict() == {}
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


@pytest.mark.parametrize("kind", ["famo", "dwa", "hdkd exact", "hdkd fast"])
def test_lightning_callbacks_take_one_meta_step_per_optimizer_step_under_gradient_accumulation(kind):
    """accumulate_grad_batches=2: one meta step per optimizer step, as the two calls give it in a loop of one's
    own: the weightings and the fast mode after the step on the two batches concatenated (the step's whole
    batch), the exact mode before the first of the two. Before, every batch took one (FAMO scoring a step not
    taken, the fast mode refusing every step)."""
    lightning = pytest.importorskip("lightning")
    from lightning_train import MultiExitModule
    from metaweight.lightning import HarmonizedCallback, WeightingCallback

    def net():
        torch.manual_seed(0)
        return mw.MultiExit([torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh()),
                             torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())],
                            [torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)])

    g = torch.Generator().manual_seed(5)
    train = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(6)]
    val = [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    criterion = mw.DenseDistillLoss(2)
    method, _, mode = kind.partition(" ")

    def build(model, optimizer):
        if method == "hdkd":
            return mw.HarmonizedWeighter(model, optimizer, criterion, mode=mode, gamma_lr=0.05)
        return mw.WEIGHTINGS[method](model, optimizer, criterion, **({"window": 1} if method == "dwa" else {}))

    module = MultiExitModule(net(), lr=0.1)
    callback = (HarmonizedCallback(criterion, val, mode=mode, gamma_lr=0.05) if method == "hdkd" else
                WeightingCallback(build))
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                                accumulate_grad_batches=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in train]),
                                                                        torch.cat([y for _, y in train])), batch_size=8)
    trainer.fit(module, loader)
    assert trainer.global_step == 3

    model = net()  # the same steps in a loop of one's own
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
