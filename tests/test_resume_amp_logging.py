"""Checkpoint/resume bit for bit; bf16 autocast against fp32; logging callbacks."""

import csv
import os

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import fast_two_calls


STEPS, SPLIT = 6, 3


def build(seed, mode="exact"):
    torch.manual_seed(seed)
    model = mw.MultiExit([nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Dropout(0.2), nn.Tanh()),
                          nn.Sequential(nn.Linear(12, 12), nn.BatchNorm1d(12), nn.Dropout(0.2), nn.Tanh())],
                         [nn.Linear(12, 5), nn.Linear(12, 5)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), mw.BalancedValidation(2),
                                     gamma_optimizer=lambda p: torch.optim.Adam(p, lr=0.05), meta_every=2,
                                     mode="fast" if mode.startswith("fast") else "exact")
    return model, optimizer, scheduler, weighter


def iteration(form, model, optimizer, weighter, train, val):
    if form == "fast, two calls":
        fast_two_calls(weighter, model, optimizer, train, val)
    else:
        weighter.step(train, val)


def data():
    g = torch.Generator().manual_seed(7)
    return [((torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g)),
             (torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g))) for _ in range(STEPS)]


@pytest.mark.parametrize("form", ["exact", "fast", "fast, two calls"])
def test_resume_from_a_checkpoint_is_bit_for_bit(form, tmp_path):
    batches = data()
    model, optimizer, scheduler, weighter = build(0, form)
    torch.manual_seed(123)
    for train, val in batches:
        iteration(form, model, optimizer, weighter, train, val)
        scheduler.step()
    uninterrupted = (model.state_dict(), weighter.gamma.clone(), weighter.validation.expected.clone())
    assert not torch.equal(uninterrupted[1], torch.ones(3))  # gamma moved

    model, optimizer, scheduler, weighter = build(0, form)
    torch.manual_seed(123)
    for train, val in batches[:SPLIT]:
        iteration(form, model, optimizer, weighter, train, val)
        scheduler.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "weighter": weighter.state_dict(),
                "rng": torch.get_rng_state()}, tmp_path / "ckpt.pt")

    model, optimizer, scheduler, weighter = build(99, form)  # another initialisation, overwritten by the load
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    weighter.load_state_dict(ckpt["weighter"])
    torch.set_rng_state(ckpt["rng"])
    for train, val in batches[SPLIT:]:
        iteration(form, model, optimizer, weighter, train, val)
        scheduler.step()
    for name, tensor in uninterrupted[0].items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert torch.equal(uninterrupted[1], weighter.gamma)
    assert torch.equal(uninterrupted[2], weighter.validation.expected)
    assert weighter.num_meta_steps == 3 and weighter.num_calls == STEPS


def conv_net():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)) for _ in range(2)]
    return mw.MultiExit(stages, heads)


# bf16 keeps 8 bits of mantissa; measured here: jvp 8.2e-3, finite_difference 4.6e-3, higher 5.4e-3
BF16_TOLERANCE = 5e-2


@pytest.mark.parametrize("backend", ["jvp", "finite_difference", "higher"])
def test_bf16_autocast_meta_gradient_is_close_to_fp32(backend):
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g))
    val = (torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g))
    grads = {}
    for precision in ("fp32", "bf16"):
        model = conv_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            grads[precision] = w.meta_step(train, val)["gamma_grad"]
            loss = w.loss(model(train[0]), train[1])
        assert w.gamma.dtype == torch.float32 and loss.dtype == torch.float32
    err = float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert err < BF16_TOLERANCE, err


def test_csv_logger_and_custom_callback_get_every_meta_step(tmp_path):
    records = []
    model = conv_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), meta_every=2,
                              callbacks=[records.append, mw.CSVLogger(tmp_path / "log.csv")])
    x = torch.randn(8, 3, 8, 8)
    for _ in range(5):
        w.step((x, torch.randint(0, 5, (8,))), (x, torch.randint(0, 5, (8,))))
    assert [r["iteration"] for r in records] == [1, 3, 5]
    assert set(records[-1]["gamma"]) == set(w.term_names) and records[-1]["gamma"] == w.gamma_dict()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 3 and float(rows[-1]["gamma/ce[1]"]) == pytest.approx(w.gamma_dict()["ce[1]"])
    assert float(rows[0]["val_objective"]) == pytest.approx(records[0]["val_objective"])


def test_tensorboard_logger_writes_every_scalar():
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    writer = Writer()
    model = conv_net()
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                              callbacks=[mw.TensorBoardLogger(writer)])
    x = torch.randn(8, 3, 8, 8)
    w.meta_step((x, torch.randint(0, 5, (8,))), (x, torch.randint(0, 5, (8,))))
    tags = {t for t, _, _ in writer.scalars}
    assert "metaweight/gamma/kd[2->1]" in tags and "metaweight/val_objective" in tags
    assert {s for _, _, s in writer.scalars} == {1}


def test_tensorboard_logger_with_real_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    logger = mw.TensorBoardLogger(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # nothing written before the first record
    logger({"iteration": 1, "meta_step": 1, "val_objective": 1.0, "val_exit_losses": [1.0],
            "gamma": {"ce[1]": 1.0}, "terms": {"ce[1]": 2.0}})
    logger.writer.flush()
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not os.access("/proc", os.W_OK),
                    reason="a /proc whose permission bits grant writes (Linux, as root)")
def test_a_log_where_no_file_can_be_created_is_refused_when_the_logger_is_made(tmp_path):
    """/proc grants root every permission bit but takes no new file: the loggers accepted such a path and every
    row was lost at its write (helper-149). A file is created in the folder and removed at once, when the logger is
    made; a folder that takes files keeps nothing of it."""
    for make, path in ((mw.CSVLogger, "/proc/metaweight-log.csv"), (mw.TensorBoardLogger, "/proc/metaweight-tb"),
                       (mw.TensorBoardLogger, "/proc")):
        with pytest.raises(ValueError, match=f"{path} cannot be written: no file can be created in /proc"):
            make(path)
    mw.CSVLogger(tmp_path / "log.csv")
    mw.TensorBoardLogger(tmp_path / "tb")
    assert list(tmp_path.iterdir()) == []
