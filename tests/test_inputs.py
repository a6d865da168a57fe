"""Batches whose inputs are dicts: passed as keyword arguments where the model's forward takes them
(Hugging Face style), as one argument otherwise, everywhere a model is called."""

import copy

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import tiny_net
from metaweight._protocols import model_arguments
from test_weighter import rel_err


class KeywordModel(nn.Module):
    """A Hugging Face-style forward: named tensors, one of them optional."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(3).double()

    def forward(self, input_ids, attention_mask=None):
        x = input_ids if attention_mask is None else input_ids * attention_mask
        return self.net(x)


class DictModel(nn.Module):
    """A forward that takes the dict itself."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(3).double()

    def forward(self, inputs):
        return self.net(inputs["a"] + inputs["b"])


def test_model_arguments_follows_the_forward_signature():
    assert model_arguments(KeywordModel(), {"input_ids": 1, "attention_mask": 2}) == ((), {"input_ids": 1,
                                                                                          "attention_mask": 2})
    assert model_arguments(KeywordModel(), {"input_ids": 1}) == ((), {"input_ids": 1})
    batch = {"a": 1, "b": 2}
    assert model_arguments(DictModel(), batch) == ((batch,), {})
    assert model_arguments(KeywordModel(), {"pixels": 1}) == (({"pixels": 1},), {})  # required input_ids missing
    assert model_arguments(tiny_net(2), torch.ones(1)) == ((torch.ones(1),), {})


def kw_batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, 6, generator=g) > 0.2).double()
    return {"input_ids": x, "attention_mask": mask}, torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("backend", ["jvp", "finite_difference", "higher"])
def test_keyword_batches_train_like_positional_ones(backend):
    """The same network fed keyword batches or the equivalent tensor: identical meta-gradients and steps."""
    torch.manual_seed(0)
    kw = KeywordModel()
    plain = copy.deepcopy(kw.net)
    w_kw = mw.HarmonizedWeighter(kw, torch.optim.SGD(kw.parameters(), lr=0.1, momentum=0.9), mw.DenseDistillLoss(3),
                                 backend=backend)
    w_plain = mw.HarmonizedWeighter(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
                                    mw.DenseDistillLoss(3), backend=backend)
    for s in range(3):
        (inputs, y), (val_inputs, yv) = kw_batch(s), kw_batch(10 + s, n=12)
        a = w_kw.step((inputs, y), (val_inputs, yv))
        b = w_plain.step((inputs["input_ids"] * inputs["attention_mask"], y),
                         (val_inputs["input_ids"] * val_inputs["attention_mask"], yv))
        assert rel_err(a.gamma_grad, b.gamma_grad) < 1e-10
    for p, q in zip(kw.net.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    logits, labels = mw.collect_logits(kw, [kw_batch(20)])
    assert logits.shape == (3, 16, 5)
    costs = mw.exit_costs(kw, {"input_ids": torch.randn(1, 6, dtype=torch.float64)})
    assert costs.macs == mw.exit_costs(plain, torch.randn(1, 6, dtype=torch.float64)).macs


@pytest.mark.parametrize("backend", ["jvp", "higher"])
def test_a_forward_taking_the_dict_itself_gets_it_whole(backend):
    torch.manual_seed(0)
    model = DictModel()
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                              backend=backend)
    g = torch.Generator().manual_seed(0)
    batch = ({"a": torch.randn(8, 6, generator=g, dtype=torch.float64),
              "b": torch.randn(8, 6, generator=g, dtype=torch.float64)}, torch.randint(0, 5, (8,), generator=g))
    record = w.step(batch, batch)
    assert record.ran and torch.isfinite(record.gamma_grad).all()
