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
