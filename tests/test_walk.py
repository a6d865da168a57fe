"""One walk of the model per step: the walk against torch's own named_* methods, and the walks a step takes."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight as mw
import metaweight._walk as walk_module
from conftest import batch, tiny_net
from metaweight._walk import ModelWalk, buffers_walk, forward_ran, walk, walked

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


class Tied(nn.Module):
    """Tied weights (an embedding and its output layer), one block used twice (under two names), a buffer
    slot registered empty, a buffer held twice, and a module without parameters in between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.BatchNorm1d(4))
        self.again = self.block
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("empty", None)
        self.register_buffer("scale", torch.ones(4))
        self.block[1].register_buffer("scale_too", self.scale)

    def forward(self, x):
        return self.out(self.again(self.block(self.embed(x))) * self.scale)


def models():
    return {"msdnet": msdnet_cifar(10, 3, step=1, base=1, channels=4, growth_rate=2),
            "branchynet": branchynet(10, 3, num_exits=3, width=8),
            "tied": Tied(),
            "tiny": tiny_net(3)}


@pytest.mark.parametrize("name", list(models()))
def test_the_walk_gives_torchs_named_modules_parameters_and_buffers_their_aliases_and_empty_slots(name):
    model = models()[name]
    one = ModelWalk(model)
    assert [(n, id(m)) for n, m in one.modules] == [(n, id(m)) for n, m in model.named_modules()]
    assert [(n, id(p)) for n, p in one.parameters] == [(n, id(p)) for n, p in model.named_parameters()]
    assert [(n, id(b)) for n, b in one.buffers] == [(n, id(b)) for n, b in model.named_buffers()]
    # aliases: every slot (module, attribute) holding the tensor, each once (a module used twice is one
    # module: its slots are set through either name)
    def slot(name):
        owner, _, leaf = name.rpartition(".")
        return id(model.get_submodule(owner)), leaf

    every = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    held = {n: t for n, t in one.parameters + one.buffers}
    assert set(one.aliases) == set(held)
    for name, names in one.aliases.items():
        assert names[0] == name and len({slot(n) for n in names}) == len(names)
        assert {slot(n) for n in names} == {slot(n) for n, t in every if t is held[name]}
    assert one.empty == {(id(m), leaf) for _, m in model.named_modules() for leaf, b in m._buffers.items()
                         if b is None}
    if name == "tied":
        assert one.aliases["embed.weight"] == ["embed.weight", "out.weight"]
        assert one.aliases["block.0.bias"] == ["block.0.bias"]
        assert one.aliases["scale"] == ["scale", "block.1.scale_too"]
        assert one.empty == {(id(model), "empty")}
        # the untied map, given to functional_call(tie_weights=False), computes what its tie_weights=True does
        state = {n: t.detach() * 2 for n, t in one.parameters + one.buffers}
        x = torch.tensor([1, 2, 3])
        model.eval()
        tied = torch.func.functional_call(model, state, (x,))
        assert torch.equal(torch.func.functional_call(model, one.untied(state), (x,), tie_weights=False), tied)
        assert one.untied({"no.such.name": x}) is None


def test_a_walk_is_kept_in_its_block_and_the_buffers_are_walked_again_after_a_forward():
    model = tiny_net(2)
    assert walk(model) is not walk(model)  # (outside a block: a new walk each time)
    with walked(model) as one:
        assert walk(model) is one and buffers_walk(model) is one
        with walked(model) as inner:
            assert inner is one
        model.stages[0][0].register_buffer("mask", torch.zeros(2))  # (as a forward may)
        assert "stages.0.0.mask" not in dict(buffers_walk(model).buffers)  # (no forward was noted yet)
        forward_ran()
        again = buffers_walk(model)
        assert again is not one and "stages.0.0.mask" in dict(again.buffers) and buffers_walk(model) is again
        assert walk(model) is again
    assert walk_module._scopes.walks == {}


def counting_walks(monkeypatch, model):
    """Count the walks of ``model``'s tree: our walks and every named_modules() call on the model itself (what
    named_parameters(), parameters(), named_buffers(), modules() and torch.func.functional_call start from)."""
    count = [0]
    named_modules, init = nn.Module.named_modules, ModelWalk.__init__

    def named_modules_counted(self, memo=None, prefix="", remove_duplicate=True):
        count[0] += self is model and memo is None
        return named_modules(self, memo, prefix, remove_duplicate)

    def init_counted(self, walked_model):
        count[0] += walked_model is model
        init(self, walked_model)

    monkeypatch.setattr(nn.Module, "named_modules", named_modules_counted)
    monkeypatch.setattr(ModelWalk, "__init__", init_counted)
    return count


def steps():
    from test_weightings import options
    made = [(f"hdkd {o}", 3 if o.get("learn", True) else 2,
             lambda m, opt, o=o: mw.HarmonizedWeighter(m, opt, mw.DenseDistillLoss(3), **o))
            for o in ({}, {"mode": "fast"}, {"learn": False})]
    made += [(name, 2, lambda m, opt, name=name: mw.WEIGHTINGS[name](m, opt, mw.DenseDistillLoss(3),
                                                                      **options(name, m)))
             for name in mw.WEIGHTINGS]
    return made


@pytest.mark.parametrize("name, most, make", steps(), ids=[n for n, _, _ in steps()])
def test_a_step_walks_the_model_at_most_three_times(name, most, make, monkeypatch):
    """The exact and fast meta steps walk the tree three times (the step's walk, the buffers again after the
    training forward, and after the look-ahead's forwards); a step with nothing to learn and each loss
    weighting twice (FAMO's forward after the step reads the buffers of the second walk). It was 25 for
    the exact step, 18 for the fast one, 6 for FAMO."""
    torch.manual_seed(0)
    model = tiny_net(3)
    w = make(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    w.step(batch(8), batch(8))
    count = counting_walks(monkeypatch, model)
    for _ in range(3):
        assert not w.step(batch(8), batch(8)).model_step_skipped
    assert count[0] == 3 * most, (name, count[0] / 3)
