"""Batches whose inputs are dicts: passed as keyword arguments where the model's forward takes them
(Hugging Face style), as one argument otherwise, everywhere a model is called."""

import copy

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net
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


def _numpy_places(x, y):
    """The batch pairs holding a NumPy array where a tensor belongs: inputs, labels, a leaf of a dict."""
    return {"inputs": (x.numpy(), y), "labels": (x, y.numpy()), "nested": ({"a": x, "b": x.numpy()}, y)}


@pytest.mark.parametrize("entry", ["exact", "fast", *sorted(mw.WEIGHTINGS)])
@pytest.mark.parametrize("call", ["step", "meta_step"])
def test_numpy_batches_are_refused_before_anything_changes(entry, call):
    """Every entry that takes a batch refuses a NumPy array in it with the fix (torch.as_tensor), with the
    model, its buffers, the optimizer's state and the weights as they were (the fast mode's meta_step had
    recursed without end comparing a tensor's labels with an array's; the others reached torch's own error
    from inside the model, after the step had begun)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = mw.DenseDistillLoss(3)
    if entry in ("exact", "fast"):
        w = mw.HarmonizedWeighter(model, optimizer, criterion, mw.BalancedValidation(3), mode=entry)
    else:
        options = {"dwa": {"window": 2}, "sdn": {"epochs": 2, "steps_per_epoch": 2},
                   "gradnorm": {"shared_parameters": list(model.stages[0].parameters())}}.get(entry, {})
        w = mw.WEIGHTINGS[entry](model, optimizer, criterion, **options)
    x, y = batch()
    w.step((x, y), (x, y))  # a momentum buffer and a learned state to keep
    if call == "meta_step":  # a real iteration before it, as the two calls have it
        loss = w.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if entry != "exact":
            optimizer.step()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
              copy.deepcopy(w.state_dict()), [p.grad.clone() for p in model.parameters()])
    for place, bad in _numpy_places(x, y).items():
        with pytest.raises(TypeError, match=rf"(?s)a NumPy array in its {'labels' if place == 'labels' else 'inputs'}"
                                            rf".*torch\.as_tensor.*Nothing was changed"):
            getattr(w, call)(bad, (x, y))
        after = (model.state_dict(), optimizer.state_dict(), w.state_dict(), [p.grad for p in model.parameters()])
        for old, new in zip(torch.utils._pytree.tree_leaves(before), torch.utils._pytree.tree_leaves(after)):
            assert (torch.equal(old, new) if isinstance(old, torch.Tensor) else old == new), place
    getattr(w, call)((x, y), (x, y))  # and the tensors' batch goes on


def test_a_loader_of_numpy_batches_is_refused_by_collect_logits():
    x, y = batch()
    with pytest.raises(TypeError, match=r"loader's batch 1 holds a NumPy array in its labels.*torch\.as_tensor"):
        mw.collect_logits(tiny_net(3), [(x, y), (x, y.numpy())])
    with pytest.raises(ValueError, match=r"Found `ndarray`: pass torch\.as_tensor\(target\)"):
        mw.DenseDistillLoss(3)(tiny_net(3)(x), y.numpy())


def test_numpy_scalars_and_strings_in_a_batch_are_not_arrays():
    """Only arrays are refused: a NumPy scalar option (np.float32, np.bool_) or names read through NumPy (np.str_)
    in a batch were refused as 'a NumPy array' (helper-109's report); arrays, masked arrays included, still are."""
    import numpy as np

    from metaweight._checks import refuse_arrays
    x, y = batch()
    for fine in ({"x": x, "scale": np.float32(0.5), "flag": np.bool_(True)}, [x, [np.str_("a")]], (x, np.int64(3))):
        refuse_arrays((fine, y), "The batch")
    class MyArray(np.ndarray):  # (a subclass of one's own, outside NumPy's modules: helper-112)
        pass

    for bad in ({"x": x, "mask": np.ones(2)}, (x, np.ma.masked_array([1.0, 2.0])), np.array(1.0),
                [x, np.ones(2).view(MyArray)]):
        with pytest.raises(TypeError, match="a NumPy array in its inputs"):
            refuse_arrays((bad, y), "The batch")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_labels_out_of_range_name_the_batch_they_came_with(mode):
    """helper-151: with mode='exact' the validation batch's labels out of range were refused as "`target` has
    labels in ...", as the training batch's are, so the message did not tell which batch to fix; the fast mode
    said 'The validation target'. Both modes, both calls, now name the validation batch's."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())],
                       [nn.Linear(8, 3), nn.Linear(8, 3)])
    w = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2), mode=mode)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = [w.step] + ([w.meta_step] if mode == "exact" else [])
    for call in calls:
        with pytest.raises(ValueError, match=r"^The validation target has labels in \[10, 12\]"):
            call((x, y), (x.clone(), y + 10))
        with pytest.raises(ValueError, match=r"^`target` has labels in \[10, 12\]"):
            call((x, y + 10), (x.clone(), y))
