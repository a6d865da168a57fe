"""One walk of the model per step: the walk against torch's own named_* methods, and the walks a step takes."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight as mw
import metaweight._walk as walk_module
from conftest import batch, tiny_net
from metaweight._walk import ModelWalk, current_walk, tree_changed, walk, walked, watched_forward

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


def test_a_walk_is_kept_in_its_block_and_walked_again_after_a_registration():
    model = tiny_net(2)
    assert walk(model) is not walk(model)  # (outside a block: a new walk each time)
    with walked(model) as one:
        assert walk(model) is one and current_walk(model) is one
        with walked(model) as inner:
            assert inner is one
        model.stages[0][0].register_buffer("mask", torch.zeros(2))  # (as a forward or a callback may: seen)
        again = current_walk(model)
        assert again is not one and "stages.0.0.mask" in dict(again.buffers) and current_walk(model) is again
        assert walk(model) is again
        tree_changed()  # (the library's own writes to the modules' dicts)
        assert current_walk(model) is not again
    assert walk_module._scopes.walks == {} and walk_module._scopes.hooks == []
    model.stages[0][0].register_buffer("other", torch.zeros(2))  # (outside a step: no hook left behind)


class Builds(nn.Module):
    """A layer whose forward does one of the things that change the tree (or none)."""

    def __init__(self, change):
        super().__init__()
        self.change = change
        self.register_buffer("mask", torch.zeros(3))
        self.register_buffer("slot", None)
        self.inner = nn.Identity()

    def forward(self, h):
        if self.change == "register":
            self.register_buffer("extra", torch.ones(3))
        elif self.change == "fill":
            self.slot = torch.ones(3)  # (an empty slot filled by assignment)
        elif self.change == "reassign":
            self.mask = torch.ones(3)
        elif self.change == "submodule":
            self.norm = nn.BatchNorm1d(3)
        elif self.change == "parameter":
            self.scale = nn.Parameter(torch.ones(3))
        elif self.change == "delete":
            del self.mask
        elif self.change == "direct":
            self._buffers["extra"] = torch.ones(3)
        elif self.change == "direct replace":  # (same name, same count: another tensor)
            self._buffers["mask"] = torch.ones(3)
        elif self.change == "module swapped":
            self._modules["inner"] = nn.Identity()
        elif self.change == "thread":  # (an assignment the hooks of this thread do not see)
            import threading
            t = threading.Thread(target=lambda: setattr(self, "mask", torch.ones(3)))
            t.start()
            t.join()
        elif self.change == "in place":
            self.mask.add_(1.0)
            self.mask.data = torch.zeros(5)  # (the same buffer object, another size)
        return h


@pytest.mark.parametrize("change", ["register", "fill", "reassign", "submodule", "parameter", "delete", "direct",
                                    "direct replace", "module swapped", "thread", "in place", "none"])
def test_a_forward_that_changes_the_tree_makes_the_walk_stale_and_one_that_does_not_keeps_it(change):
    """The step re-walks only after a forward that registered a buffer, parameter or submodule (through
    register_buffer, assignment, add_module: torch's registration hooks) or changed a module's count of them
    (del, a write to _buffers); and the walk it then takes is the tree as torch sees it. In-place changes and
    the same objects keep the walk (its tensors are the model's)."""
    model = nn.Sequential(nn.Linear(3, 3), Builds(change))
    with walked(model) as one:
        with watched_forward():
            model(torch.ones(2, 3))
        stale = change not in ("in place", "none")
        assert one.current is not stale
        now = current_walk(model)
        assert (now is one) is not stale
        assert [(n, id(b)) for n, b in now.buffers] == [(n, id(b)) for n, b in model.named_buffers()]
        assert [(n, id(p)) for n, p in now.parameters] == [(n, id(p)) for n, p in model.named_parameters()]
        assert [n for n, _ in now.modules] == [n for n, _ in model.named_modules()]
    # functional_call's swaps (writes to the dicts, under the same names) keep it
    with walked(model) as one:
        state = {n: t.clone() for n, t in one.parameters + one.buffers}
        from metaweight._hypergradient import call_with
        model[1].change = "none"
        call_with(model, {n: state[n] for n, _ in one.parameters}, {n: state[n] for n, _ in one.buffers},
                  torch.ones(2, 3))
        assert current_walk(model) is one
        model[1].change = "register"
        call_with(model, {n: state[n] for n, _ in one.parameters}, {n: state[n] for n, _ in one.buffers},
                  torch.ones(2, 3))
        assert current_walk(model) is not one


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
    made = [(f"hdkd {o}", 1, lambda m, opt, o=o: mw.HarmonizedWeighter(m, opt, mw.DenseDistillLoss(3), **o))
            for o in ({}, {"backend": "finite_difference"}, {"mode": "fast"}, {"learn": False})]
    made += [(name, 1, lambda m, opt, name=name: mw.WEIGHTINGS[name](m, opt, mw.DenseDistillLoss(3),
                                                                      **options(name, m)))
             for name in mw.WEIGHTINGS]
    return made


@pytest.mark.parametrize("name, most, make", steps(), ids=[n for n, _, _ in steps()])
def test_a_step_walks_the_model_once(name, most, make, monkeypatch):
    """Every step form walks the tree once, at its start, when no forward changes it (the walks were 25 for the
    exact step, 28 with finite_difference, 18 for the fast one, 3 with nothing to learn, 5 for each loss
    weighting, 9 for FAMO), and not at all at a later step when the tree is as the last one left it: it takes
    that step's walk again (test_a_walk_kept_between_steps_is_taken_again_only_if_it_still_describes_the_model)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    w = make(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    w.step(batch(8), batch(8))  # (the first step's checks walk more)
    count = counting_walks(monkeypatch, model)
    for _ in range(3):
        assert not w.step(batch(8), batch(8)).model_step_skipped
    assert count[0] == 0, (name, count[0] / 3)
    model.heads[0].register_buffer("scale", torch.ones(()))  # (a forward-free change: the next step walks anew)
    for _ in range(3):
        assert not w.step(batch(8), batch(8)).model_step_skipped
    assert count[0] == most, (name, count[0])


def _changes():
    """What a user may do to the model's tree between two steps, each a change a walk of it must see."""
    def register(m):
        m.stages[2][1].register_buffer("added", torch.zeros(3))

    def replace_head(m):
        m.heads[2] = nn.Linear(10, 5)

    def write_buffers(m):
        m.stages[1][1]._buffers["extra"] = torch.zeros(3)

    def rename(m):
        bn = m.stages[1][1]
        bn._buffers = {("renamed" if k == "extra" else k): v for k, v in bn._buffers.items()}

    def delete(m):
        del m.stages[1][1].extra

    def empty_slot(m):
        m.stages[1][1]._buffers["extra"] = None

    def swap_heads(m):
        heads = m.heads._modules
        heads["0"], heads["1"] = heads["1"], heads["0"]

    def new_parameter(m):  # (the optimizer then does not hold it: the step refuses it, by the walk's names)
        m.heads[0].weight = nn.Parameter(m.heads[0].weight.detach().clone())

    def generator(m):
        m.stages[0].g = torch.Generator().manual_seed(3)

    def own_listing(m):  # (no identity changes: the class now lists the parameters itself, the step reads its list)
        def named_parameters(self, *args, **kwargs):
            return reversed(list(nn.Module.named_parameters(self, *args, **kwargs)))
        m.__class__ = type("Listing", (type(m),), {"named_parameters": named_parameters})

    return [register, replace_head, write_buffers, rename, delete, empty_slot, swap_heads, new_parameter, generator,
            own_listing]


@pytest.mark.parametrize("change", _changes(), ids=[c.__name__ for c in _changes()])
def test_a_walk_kept_between_steps_is_taken_again_only_if_it_still_describes_the_model(change):
    """A weighter keeps its last step's walk and takes it again at the next step only where every module holds
    the same objects under the same names: each change a user may make between steps (a buffer registered,
    written straight to ``_buffers``, renamed, deleted or emptied, a submodule replaced or two swapped, a parameter
    replaced) is walked anew, and the walk the step leaves describes the model as a new walk does (torch's named_*
    methods, the generators: a generator attribute set between steps is no change of the tree, and the walk taken
    again looks its generators up anew)."""
    from metaweight._randomness import _generators_of

    def described(one):
        return ([(n, id(m)) for n, m in one.modules], [(n, id(p)) for n, p in one.parameters],
                [(n, id(b)) for n, b in one.buffers], sorted(one.empty), one.aliases,
                [(n, id(g)) for n, g in one.generators(_generators_of)])

    torch.manual_seed(0)
    model = tiny_net(3)
    model.stages[1][1].register_buffer("extra", torch.ones(3))  # (a buffer the forward does not read)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), learn=False)
    seen = []  # at each forward of a step, before it runs: the step's walk against a new one
    model.register_forward_pre_hook(lambda *_: seen.append(described(walk(model)) == described(ModelWalk(model))))
    w.step(batch(8))
    before = w._kept_walk
    w.step(batch(8))
    assert w._kept_walk is before  # unchanged: taken again
    assert described(before) == described(ModelWalk(model))
    change(model)
    refused = change.__name__ in ("new_parameter", "replace_head")
    try:
        w.step(batch(8))
    except ValueError as error:  # a parameter replaced (the optimizer holds the old tensor), seen by the new walk
        assert refused and "the model holds another now" in str(error), error
    else:
        assert not refused
    assert seen and all(seen)  # what the step read, from its start
    if refused:  # a call that raised leaves the walk kept before it: the next call refuses again
        assert w._kept_walk is before
        with pytest.raises(ValueError, match="the model holds another now"):
            w.step(batch(8))
        assert w._kept_walk is before
        return
    assert (w._kept_walk is before) == (change.__name__ == "generator")
    assert described(w._kept_walk) == described(ModelWalk(model))
    assert [n for n, _ in w._kept_walk.parameters] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in w._kept_walk.buffers] == [n for n, _ in model.named_buffers()]
    assert [n for n, _ in w._kept_walk.modules] == [n for n, _ in model.named_modules()]


def test_a_walk_from_the_model_s_own_listing_is_not_taken_again_once_the_class_lists_no_more():
    """A model whose class listed its parameters itself at a step (its walk's lists came from that method), then
    no more (``__class__`` assigned back between steps): no identity changed, and the next step walks anew, its
    parameters torch's listing."""
    def named_parameters(self, *args, **kwargs):
        return reversed(list(nn.Module.named_parameters(self, *args, **kwargs)))

    torch.manual_seed(0)
    model = tiny_net(3)
    plain = type(model)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.05), mw.DenseDistillLoss(3),
                              learn=False)
    w.step(batch(8))
    model.__class__ = type("Listing", (plain,), {"named_parameters": named_parameters})
    w.step(batch(8))
    assert [n for n, _ in w._kept_walk.parameters] == [n for n, _ in model.named_parameters()]
    model.__class__ = plain
    w.step(batch(8))
    assert [n for n, _ in w._kept_walk.parameters] == [n for n, _ in model.named_parameters()]


def test_a_torchscript_submodule_is_walked_and_its_walk_taken_again():
    """A scripted submodule's ``_parameters``, ``_buffers`` and ``_modules`` are TorchScript's wrappers, which are
    no dicts (iterating one reads it by index and fails): the identities read their keys, and a weighter of a model
    with a scripted head steps (with ``learn=False``, as before the walk was kept) and takes its walk again."""
    torch.manual_seed(0)
    model = tiny_net(3)
    model.heads[2] = torch.jit.script(model.heads[2])
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.05), mw.DenseDistillLoss(3),
                              learn=False)
    assert not w.step(batch(8)).model_step_skipped
    before = w._kept_walk
    assert not w.step(batch(8)).model_step_skipped
    assert w._kept_walk is before
    assert [n for n, _ in before.parameters] == [n for n, _ in model.named_parameters()]
    model.heads[2].weight.data.zero_()  # (the same objects: still taken again)
    w.step(batch(8))
    assert w._kept_walk is before


def test_a_copy_of_a_weighter_does_not_carry_its_kept_walk():
    """The kept walk refers to the model's modules: a pickled or copied weighter (and loss weighting) leaves it
    out, and the copy walks its own model."""
    import copy
    import pickle
    model = tiny_net(3)
    for w in (mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.05), mw.DenseDistillLoss(3)),
              mw.WEIGHTINGS["uw"](model, torch.optim.SGD(model.parameters(), lr=0.05), mw.DenseDistillLoss(3))):
        w.step(batch(8), batch(8))
        assert w._kept_walk is not None
        assert "_kept_walk" not in w.__getstate__()
        twin = copy.deepcopy(w)
        assert getattr(twin, "_kept_walk", None) is None
        twin.step(batch(8), batch(8))
        assert twin._kept_walk.modules[0][1] is twin.module is not model
        assert getattr(pickle.loads(pickle.dumps(w)), "_kept_walk", None) is None


def test_a_parameter_also_held_as_a_buffer_is_refused_by_name():
    """One tensor held as a parameter and, elsewhere, as a buffer: the walk gives no untied map (the untied map had
    given the buffer a copy where the parameter got theta': a meta-gradient without that path, silently; found by
    helper-90), and the weighter refuses the model by name (torch's functional_call had refused it: "got multiple
    values for keys ..., which are tied"); tests/test_unusual_models.py checks the refusals of each path."""
    model = tiny_net(3)
    model.heads[0].register_buffer("shadow", model.heads[1].weight)
    one = ModelWalk(model)
    assert one.mixed == [("heads.1.weight", "heads.0.shadow")]
    assert one.untied({n: t for n, t in one.parameters}) is None
    with pytest.raises(ValueError, match=r"parameter `heads.1.weight` is buffer `heads.0.shadow`"):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3))
    assert not ModelWalk(tiny_net(3)).mixed


def test_a_model_s_own_named_parameters_is_the_parameters_the_step_reads():
    """A model overriding named_parameters (to hide a teacher from its optimizer): the walk reads the parameters
    through it, as the step did before the walk, and each loss weighting's step runs (it refused 'the optimizer does
    not hold the model's trainable parameters ['teacher.weight', ...]'; found by helper-90)."""
    class WithTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = tiny_net(3)
            self.teacher = nn.Linear(6, 5)

        def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
            return ((n, p) for n, p in super().named_parameters(prefix, recurse, remove_duplicate)
                    if not n.startswith("teacher."))

        def forward(self, x):
            return self.student(x)

    model = WithTeacher()
    assert [n for n, _ in ModelWalk(model).parameters] == [n for n, _ in model.named_parameters()]
    for name in mw.WEIGHTINGS:
        from test_weightings import options
        w = mw.WEIGHTINGS[name](model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                                **options(name, model.student))
        assert not w.step(batch(8)).model_step_skipped, name
        first = w._kept_walk
        assert not w.step(batch(8)).model_step_skipped, name
        assert w._kept_walk is not first, name  # (its own listing, which no identity shows: walked at every step)


def test_a_buffer_a_forward_writes_straight_to_buffers_is_checked_and_read_as_the_forward_left_it():
    """A statistic a forward writes straight to ``module._buffers`` under its name (same count of buffers): a NaN
    there refuses the step, and FAMO's forward after the step reads the buffer as the forward left it. The walk
    had missed it (kept as current): every step trained with the NaN kept, FAMO's gamma off by 6e-5 against the
    commit before the walk (found by helper-91)."""
    class Monitor(nn.Module):
        def __init__(self, poison_from):
            super().__init__()
            self.register_buffer("stat", torch.zeros(10))
            self.calls, self.poison_from = 0, poison_from

        def forward(self, h):
            if self.training:
                self.calls += 1
                bad = float("nan") if self.calls >= self.poison_from else 1.0
                self._buffers["stat"] = 0.5 * self.stat + 0.5 * h.detach().mean(0) * bad
            return h + self.stat

    torch.manual_seed(0)
    model = tiny_net(3)
    model.stages[0].append(Monitor(poison_from=2))
    w = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.05), mw.DenseDistillLoss(3))
    w.step(batch(8))
    before = model.stages[0][3].stat.clone()
    with pytest.raises(ValueError, match="not finite"):
        w.step(batch(8))
    assert torch.equal(model.stages[0][3].stat, before)
    # FAMO against the same loop with named_buffers() read afresh (the walk's cache off)
    gammas = []
    for cached in (True, False):
        torch.manual_seed(0)
        model = tiny_net(3)
        model.stages[0].append(Monitor(poison_from=10 ** 9))
        w = mw.FAMO(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), mw.DenseDistillLoss(3))
        torch.manual_seed(1)
        with pytest.MonkeyPatch.context() as patch:
            if not cached:
                patch.setattr(walk_module, "current_walk", lambda m: ModelWalk(m))
                import metaweight._famo as famo_module
                patch.setattr(famo_module, "current_walk", lambda m: ModelWalk(m))
            for _ in range(3):
                w.step(batch(8))
        gammas.append(w.gamma.clone())
    assert torch.equal(gammas[0], gammas[1])


@pytest.mark.parametrize("kind", ["tied", "msdnet", "scripted head"])
def test_call_with_runs_the_model_on_the_given_tensors_as_functional_call_does_and_puts_its_own_back(kind,
                                                                                                   monkeypatch):
    """The look-ahead's forward writes the given tensors into the modules' slots itself (no functional_call on
    its path): the outputs and the buffers it updates are torch.func.functional_call's with tie_weights=True
    (every slot of a tied weight, a block used twice, a buffer held twice), and afterwards the model holds its
    own parameter and buffer objects, their values untouched."""
    import metaweight._hypergradient as hypergradient

    torch.manual_seed(0)
    if kind == "tied":
        model, x = Tied().train(), torch.tensor([[1, 2, 3], [4, 5, 6]]).reshape(-1)
    elif kind == "msdnet":
        model, x = msdnet_cifar(10, 3, step=1, base=1, channels=4, growth_rate=2).train(), torch.randn(3, 3, 32, 32)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), torch.jit.script(nn.Linear(4, 2))).train()
        x = torch.randn(5, 3)
    one = ModelWalk(model)
    own = {n: (t, t.detach().clone()) for n, t in one.parameters + one.buffers}
    params = {n: (p.detach() * 1.5 + 0.25).requires_grad_() for n, p in one.parameters}
    buffers = {n: b.detach().clone() + (1 if b.is_floating_point() else 0) for n, b in one.buffers}
    expected_buffers = {n: b.clone() for n, b in buffers.items()}
    # (on a copy: functional_call leaves a module used twice holding the substitutes)
    expected = torch.func.functional_call(copy.deepcopy(model), {**params, **expected_buffers}, (x,),
                                          tie_weights=True)
    calls = []
    monkeypatch.setattr(hypergradient, "functional_call", lambda *a, **k: calls.append(a))
    with walked(model):
        got = hypergradient.call_with(model, params, buffers, x)
    assert not calls
    got, expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    for n in buffers:  # the forward's updates (BatchNorm's statistics) went into the given buffers
        torch.testing.assert_close(buffers[n], expected_buffers[n], rtol=0, atol=0)
    grads = torch.autograd.grad(sum(g.sum() for g in got), list(params.values()), allow_unused=True)
    assert any(g is not None for g in grads)  # (the forward ran on the given parameters, with their graph)
    now = dict(ModelWalk(model).parameters + ModelWalk(model).buffers)
    assert now.keys() == own.keys()
    for n, (t, value) in own.items():
        assert now[n] is t
        torch.testing.assert_close(t.detach(), value, rtol=0, atol=0)
    if kind == "tied":
        assert model.out.weight is model.embed.weight and model.block[1].scale_too is model.scale
