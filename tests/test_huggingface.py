"""A real Hugging Face model (BERT-style, built from a small config with random weights, nothing
downloaded): exits attached after encoder layers, dict batches as keyword arguments, HDKD's
meta-gradient against real optimizer steps, training, evaluation and early exit."""

import warnings

import pytest
import torch
from torch import nn

import metaweight as mw
from test_weighter import F64, finite_difference_gamma_grad, rel_err

transformers = pytest.importorskip("transformers")

LAYERS = ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]


class FirstToken(nn.Module):
    """An exit head on a layer's hidden states: the first ([CLS]) token, then a linear layer."""

    def __init__(self, hidden, classes):
        super().__init__()
        self.linear = nn.Linear(hidden, classes)

    def forward(self, hidden_states):
        return self.linear(hidden_states[:, 0])


def bert(attn="eager", dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    config._attn_implementation = attn
    model = transformers.BertForSequenceClassification(config).to(dtype)
    example = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    return mw.attach_exits(model, LAYERS, lambda name, f: FirstToken(f.shape[-1], 3).to(dtype), example_input=example)


def task(n, seed):
    """Label: the token at position 1, modulo 3 (the [CLS] position must attend to it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[: n // 4, 6:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}, ids[:, 1] % 3


@pytest.mark.parametrize("backend", ["jvp", "higher"])
def test_meta_gradient_through_a_transformers_model_matches_real_optimizer_steps(backend):
    model = bert(dtype=F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    criterion, validation = mw.DenseDistillLoss(4, temperature=2.0), mw.BalancedValidation(4)
    validation.update(torch.tensor([1.2, 1.15, 1.1, 1.1], dtype=F64))
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, backend=backend)
    train, val = task(8, 1), task(8, 2)
    ref = finite_difference_gamma_grad(model, optimizer, criterion, validation, w.gamma.detach().clone(), train, val)
    out = w.meta_step(train, val)
    assert ref.norm() > 0 and rel_err(out["gamma_grad"], ref) < 1e-6


def test_fused_attention_without_forward_ad_falls_back_to_finite_differences():
    grads = {}
    for name, attn, backend in (("sdpa-jvp", "sdpa", "jvp"), ("sdpa-fd", "sdpa", "finite_difference")):
        model = bert(attn, dropout=0.1, dtype=F64)
        w = mw.preset("hdkd", 4).weighter(model, torch.optim.SGD(model.parameters(), lr=0.5), backend=backend)
        torch.manual_seed(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads[name] = w.meta_step(task(8, 1), task(8, 2)).gamma_grad
        fell_back = [c for c in caught if "continuing with backend='finite_difference'" in str(c.message)]
        assert len(fell_back) == (1 if backend == "jvp" else 0)
        assert all(c.filename == __file__ for c in fell_back)  # the caller's line, not ours
    assert torch.equal(grads["sdpa-jvp"], grads["sdpa-fd"])  # the same masks, the same difference


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_hdkd_trains_a_transformers_classifier_and_evaluates_it():
    model = bert(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    w = mw.preset("hdkd", 4).weighter(model, optimizer)
    val = task(32, 99)
    for step in range(60):
        w.step(task(32, step), val)
    test_batches = [task(64, 1000), task(64, 1001)]
    result = mw.anytime_accuracy(model, test_batches, topk=(1,))
    assert result.num_exits == 4 and max(result.accuracy[1]) > 50.0  # chance: 33%
    costs = mw.exit_costs(model, {"input_ids": torch.ones(1, 8, dtype=torch.long),
                                  "attention_mask": torch.ones(1, 8, dtype=torch.long)})
    assert costs.macs == sorted(costs.macs) and costs.macs[0] < costs.macs[-1]
    model.eval()
    inputs, _ = test_batches[0]
    with torch.no_grad():
        logits = torch.stack(model(inputs))
    thresholds = torch.tensor([0.8, 0.7, 0.6, -1.0])
    predictions, exits = mw.EarlyExit(model, thresholds)(inputs)
    expected_exits, expected = mw.exit_assignment(logits, thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
