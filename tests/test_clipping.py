"""Clipping by norm (metaweight._clipping) and the generators a model holds (metaweight._randomness):
the closed-form Jacobian against autograd through torch's own formula, the declaration's checks."""

import math
import warnings

import pytest
import torch
from torch import nn

import metaweight as mw
from metaweight._clipping import clip_transpose
from metaweight._randomness import model_generators, replay_randomness

F64 = torch.float64


def torch_clip(u: torch.Tensor, max_norm: float, norm_type: float) -> torch.Tensor:
    """clip_grad_norm_'s map written from its documentation, for autograd to differentiate."""
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(u, norm_type) + 1e-6), max=1.0)
    return coef * u


@pytest.mark.parametrize("norm_type", [1.0, 1.5, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipping, and not
def test_clip_transpose_is_the_transposed_jacobian_of_torch_s_clipping(norm_type, max_norm):
    g = torch.Generator().manual_seed(0)
    u = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    w = {"a": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(5, generator=g, dtype=F64)}
    flat = torch.cat([t.reshape(-1) for t in u])
    jacobian = torch.autograd.functional.jacobian(lambda v: torch_clip(v, max_norm, norm_type), flat)
    ref = jacobian.T @ torch.cat([t.reshape(-1) for t in w.values()])
    # with clip_grad_norm_'s result: its coefficient, and rho from the norm it returned
    params = [nn.Parameter(t.clone()) for t in u]
    for p, t in zip(params, u):
        p.grad = t.clone()
    norm = mw.ClipGradNorm(max_norm, norm_type)(params).double()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    rho = torch.where(coef < 1, norm / (norm + 1e-6), torch.zeros_like(norm))
    for seen in (u, [p.grad for p in params]):  # before or after clipping: any positive multiple of u
        out = clip_transpose(w, ["a", "b"], seen, coef, rho, norm_type)
        got = torch.cat([out["a"].reshape(-1), out["b"].reshape(-1)])
        assert float((got - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("max_norm, norm_type, match", [
    (0.0, 2.0, "max_norm"), (-1.0, 2.0, "max_norm"), (float("nan"), 2.0, "max_norm"), (True, 2.0, "max_norm"),
    ("5", 2.0, "max_norm"), (1.0, 0.5, "norm_type"), (1.0, 0, "norm_type"), (1.0, "two", "norm_type"),
    (1.0, float("nan"), "norm_type"), (1.0, True, "norm_type"),
])
def test_clip_grad_norm_refuses_what_it_cannot_differentiate(max_norm, norm_type, match):
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        mw.ClipGradNorm(max_norm, norm_type)


def test_clip_grad_norm_takes_pytorch_s_spellings():
    assert mw.ClipGradNorm(1, "inf").norm_type == math.inf
    assert mw.ClipGradNorm(1).norm_type == 2.0 and isinstance(mw.ClipGradNorm(1).max_norm, float)


def tiny(dtype=F64):
    return mw.MultiExit([nn.Linear(6, 8), nn.Linear(8, 8)], [nn.Linear(8, 4), nn.Linear(8, 4)]).to(dtype)


def test_the_weighter_takes_the_declaration_for_the_fast_mode_only():
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = mw.DenseDistillLoss(2)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, mode="fast", clip_grad_norm=0.5)
    assert w.clip_grad_norm == mw.ClipGradNorm(0.5, 2.0) and "ClipGradNorm" in repr(w)
    with pytest.raises(TypeError, match="clip_grad_norm.*ClipGradNorm"):
        mw.HarmonizedWeighter(model, optimizer, criterion, mode="fast", clip_grad_norm="0.5")
    with pytest.raises(ValueError, match="clip_grad_norm is for mode='fast'.*Use mode='fast'"):
        mw.HarmonizedWeighter(model, optimizer, criterion, clip_grad_norm=0.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e-46, 1e39, -0.0, 0.0, -1.0])
def test_a_bad_clip_grad_norm_number_is_named_as_the_user_passed_it(value):
    """``clip_grad_norm=nan`` said "Invalid max_norm: nan": the name of ClipGradNorm's field, which the
    user never passed. Every refusal of the number names ``clip_grad_norm`` (the float32 range check
    too); ``ClipGradNorm(max_norm=...)`` itself still says ``max_norm``."""
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), mode="fast", clip_grad_norm=value)
    assert str(info.value).startswith(f"Invalid clip_grad_norm: {value!r}.") and "max_norm" not in str(info.value)
    with pytest.raises(ValueError, match=r"^Invalid max_norm: "):
        mw.ClipGradNorm(value)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_step_clips_the_model_s_step_as_declared_bit_for_bit(norm_type):
    """learn=False: step() is a plain step of the weighted loss, clipped by torch's clip_grad_norm_."""
    torch.manual_seed(0)
    model = tiny()
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    optimizer, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin))
    criterion = mw.DenseDistillLoss(2)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, learn=False, clip_grad_norm=mw.ClipGradNorm(0.01, norm_type))
    x, y = torch.randn(16, 6, dtype=F64), torch.randint(0, 4, (16,))
    w.step((x, y), (x, y))
    twin_opt.zero_grad()
    (w.gamma.to(F64) * criterion(twin(x), y)).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01, norm_type) > 0.01  # it clips
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode, learn, capturable", [("fast", True, False), ("fast", True, True), ("fast", False, False),
                                                     ("exact", False, False)])
def test_step_clips_over_fresh_gradients_with_a_trainable_parameter_outside_the_optimizer(mode, learn, capturable):
    """A trainable head the optimizer does not hold (held fixed): step() cleared only the optimizer's gradients,
    so the head's gradient carried over from call to call into step()'s own clip_grad_norm norm, and the model's
    steps drifted from the clipped steps of the batch's own gradients (found by helper-138). step() now refuses
    such an optimizer (helper-177), changing nothing; frozen with requires_grad_(False), the head is held fixed and
    each step is a plain step clipped over every trainable parameter's gradient of that batch, as torch's
    clip_grad_norm_ over model.parameters() after model.zero_grad() gives."""
    torch.manual_seed(0)
    model, twin = tiny(), tiny()
    twin.load_state_dict(model.state_dict())
    held = lambda m: [p for n, p in m.named_parameters() if not n.startswith("heads.1")]  # noqa: E731
    optimizer, twin_opt = (torch.optim.SGD(held(m), lr=0.3, momentum=0.9, fused=capturable) for m in (model, twin))
    criterion = mw.DenseDistillLoss(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the head left out of the optimizer is warned of)
        w = mw.HarmonizedWeighter(model, optimizer, criterion, mode=mode, learn=learn, gamma_optimizer="sgd",
                                  gamma_lr=0.0, clip_grad_norm=0.05,
                                  **({"capturable": True, "nonfinite": "skip"} if capturable else {}))
    g = torch.Generator().manual_seed(3)
    kept = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"does not hold the model's trainable parameters \['heads\.1\.weight'"):
        w.step(*[(torch.randn(16, 6, dtype=F64), torch.randint(0, 4, (16,)))] * 2)
    assert all(torch.equal(a, b) for a, b in zip(kept, model.parameters()))
    for m in (model, twin):
        m.heads[1].requires_grad_(False)
    for _ in range(4):
        x, y = torch.randn(16, 6, dtype=F64, generator=g), torch.randint(0, 4, (16,), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.step((x, y), (x, y))
        twin.zero_grad(set_to_none=True)
        (w.gamma.to(F64) * criterion(twin(x), y)).sum().backward()
        assert torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05) > 0.05  # it clips
        twin_opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class Holder(nn.Module):
    """Generators held directly, in a list and in a dict; one of them twice."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(1)
        self.pair = [torch.Generator().manual_seed(2), self.g]
        self.named = {"h": torch.Generator().manual_seed(3)}
        self.inner = nn.Sequential(nn.Linear(2, 2))
        self.inner[0].k = torch.Generator().manual_seed(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = sum(torch.rand(x.shape, generator=g) for g in (self.g, self.pair[0], self.named["h"], self.inner[0].k))
        return self.inner(x) + noise


def test_the_generators_a_model_holds_are_found_and_replayed():
    model = Holder()
    found = model_generators(model)
    assert len(found) == 4 and {id(g) for g in found} == {id(model.g), id(model.pair[0]), id(model.named["h"]),
                                                          id(model.inner[0].k)}
    x = torch.randn(3, 2)
    with replay_randomness(torch.device("cpu"), found) as replay:
        first = model(x)
        after = [g.get_state() for g in found]
        with replay():
            again = model(x)
        assert all(torch.equal(a, g.get_state()) for a, g in zip(after, found))  # put back where they were
    assert torch.equal(first, again)
