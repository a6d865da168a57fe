"""The jvp backend's BatchNorm tangent (metaweight._tangents) against ATen's forward-mode formula, in float64."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from metaweight._tangents import ShortTangents, batch_norm_dual


def _dual(t, tangent):
    return t if tangent is None else fwAD.make_dual(t, tangent)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3), (4, 4, 3, 2), (3, 4, 2, 2, 2)])
@pytest.mark.parametrize("which", ["input", "weight", "bias", "all", "no affine"])
def test_batch_norm_tangent_is_atens(shape, which):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    if which == "no affine":
        w = b = wt = bt = None
    tangents = {"input": (xt, None, None), "weight": (None, wt, None), "bias": (None, None, bt),
                "all": (xt, wt, bt), "no affine": (xt, None, None)}[which]
    outs, stats = [], []
    for f in (F.batch_norm, batch_norm_dual):
        rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        with torch.no_grad(), fwAD.dual_level():
            args = [_dual(x, tangents[0]), rm, rv, _dual(w, tangents[1]) if w is not None else None,
                    _dual(b, tangents[2]) if b is not None else None, True, 0.1, 1e-5]
            out = fwAD.unpack_dual(f(*args))
            outs.append((out.primal.clone(), out.tangent.clone()))
        stats.append((rm, rv))
    (p0, t0), (p1, t1) = outs
    assert torch.equal(p0, p1)  # the primal is ATen's own
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=1e-12)
    for s0, s1 in zip(*stats):
        assert torch.equal(s0, s1)  # the running statistics updated alike


def test_eval_mode_and_plain_tensors_are_left_to_aten():
    x = torch.randn(4, 3)
    assert batch_norm_dual(x, torch.zeros(3), torch.ones(3), training=True) is None  # no tangent anywhere
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        assert batch_norm_dual(dual, torch.zeros(3), torch.ones(3), training=False) is None


def test_short_tangents_through_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2),
                          nn.BatchNorm1d(2)).double().train()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    params = dict(model.named_parameters())
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    results = []
    for short in (False, True):
        with torch.no_grad(), fwAD.dual_level():
            dual = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            if short:
                with ShortTangents():
                    out = torch.func.functional_call(model, (dual, buffers), (x,))
            else:
                out = torch.func.functional_call(model, (dual, buffers), (x,))
            unpacked = fwAD.unpack_dual(out)
            results.append((unpacked.primal.clone(), unpacked.tangent.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-10)


def test_autocast_and_mixed_dtypes_are_left_to_aten():
    x, w = torch.randn(4, 3), torch.randn(3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert batch_norm_dual(dual, torch.zeros(3), torch.ones(3), w, None, True) is None
        assert batch_norm_dual(dual, torch.zeros(3), torch.ones(3), w.double(), None, True) is None


def test_channels_last_without_running_statistics():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    xt, w, wt = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64)
    outs = []
    for f in (F.batch_norm, batch_norm_dual):
        with torch.no_grad(), fwAD.dual_level():
            out = fwAD.unpack_dual(f(fwAD.make_dual(x, xt), None, None, fwAD.make_dual(w, wt), None, True, 0.1, 1e-5))
            outs.append((out.primal.clone(), out.tangent.clone()))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-12, atol=1e-12)


def test_short_tangents_reaches_batchnorm_modules_and_functional_calls_and_puts_f_batch_norm_back(monkeypatch):
    """Inside the block a BatchNorm module's forward and a functional ``F.batch_norm`` on dual tensors take the
    short tangent (batch_norm_dual answers both, in fewer ops than ATen's formula), their results ATen's within
    rounding; after it, also after an error, ``F.batch_norm`` is torch's own again."""
    from torch.profiler import profile

    import metaweight._tangents as tangents
    answered = []
    short_tangent = tangents.batch_norm_dual
    monkeypatch.setattr(tangents, "batch_norm_dual", lambda *a, **k: answered.append(short_tangent(*a, **k)) or
                        answered[-1])

    original = F.batch_norm
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    layer = nn.BatchNorm2d(3).double()

    def run(short):
        with torch.no_grad(), fwAD.dual_level(), profile() as prof:
            dual = fwAD.make_dual(x, torch.randn_like(x, generator=torch.Generator().manual_seed(0)))
            with ShortTangents() if short else torch.no_grad():
                outs = [fwAD.unpack_dual(layer(dual)), fwAD.unpack_dual(F.batch_norm(dual, None, None, training=True))]
        names = [e.name for e in prof.events()]
        return [(o.primal.clone(), o.tangent.clone()) for o in outs], names

    (short, short_ops), (aten, aten_ops) = run(True), run(False)
    for (p1, t1), (p0, t0) in zip(short, aten):
        torch.testing.assert_close(p1, p0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(t1, t0, rtol=1e-10, atol=1e-10)
    assert len(answered) == 2 and all(a is not None for a in answered)
    assert len(short_ops) < len(aten_ops), (len(short_ops), len(aten_ops))
    assert F.batch_norm is original
    with pytest.raises(RuntimeError, match="raised inside"):
        with ShortTangents():
            raise RuntimeError("raised inside")
    assert F.batch_norm is original


def test_short_tangents_answers_only_its_own_thread_and_leaves_another_thread_s_patch_alone(monkeypatch):
    """While one thread is inside the block, another thread's ``F.batch_norm`` goes straight to the function
    the block replaced (the short tangent is never tried there: ``torch.func.vmap`` over BatchNorm found no
    batching rule for its ``_unpack_dual``); a patch of ``F.batch_norm`` another thread makes meanwhile stands
    (the block's exit does not undo it), what that patch's exit puts back passes every call on to torch's, and
    the next block leaves torch's own function in place again."""
    import threading

    import metaweight._tangents as tangents
    tried = []
    short_tangent = tangents.batch_norm_dual
    monkeypatch.setattr(tangents, "batch_norm_dual", lambda *a, **k: tried.append(threading.get_ident()) or
                        short_tangent(*a, **k))
    original = F.batch_norm
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = torch.func.vmap(lambda s: original(s, None, None, training=True))(x)
    inside, patched, left = threading.Event(), threading.Event(), threading.Event()
    results, errors = [], []

    def stepping():  # the block's thread: enters, waits for the other thread's patch, leaves
        with ShortTangents():
            with fwAD.dual_level():  # (its own calls do take the short tangent)
                F.batch_norm(fwAD.make_dual(x[0], torch.ones_like(x[0])), None, None, training=True)
            inside.set()
            patched.wait(10)
        left.set()

    def other():
        inside.wait(10)
        try:
            results.append(torch.func.vmap(lambda s: F.batch_norm(s, None, None, training=True))(x))
            stub = lambda *a, **k: "stub"  # noqa: E731
            with monkeypatch.context() as patch:
                patch.setattr(F, "batch_norm", stub)
                patched.set()
                left.wait(10)
                results.append(F.batch_norm(x, None, None))  # (still the stub: the block's exit left it)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)
            patched.set()

    threads = [threading.Thread(target=stepping), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    torch.testing.assert_close(results[0], expected, rtol=0, atol=0)
    assert results[1] == "stub"
    assert tried == [threads[0].ident]  # the block's own call only
    # what the patch's exit put back answers nobody: torch's result, and the next block puts torch's back
    torch.testing.assert_close(F.batch_norm(x, None, None, training=True),
                               original(x, None, None, training=True), rtol=0, atol=0)
    with ShortTangents():
        pass
    assert F.batch_norm is original


@pytest.mark.parametrize("options", ["", "backend='higher'", "mode='fast'"])
def test_a_step_runs_under_warnings_as_errors(options):
    """A user's warnings-as-errors (pytest's filterwarnings = error, python -W error): the jvp step failed with
    torch's DeprecationWarning of torch.jit.script, which its forward-AD decompositions run as they load (found by
    helper-143). In a fresh interpreter, where they load for the first time."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; sys.path.insert(0, 'tests')\n"
              "import torch, metaweight as mw\n"
              "from conftest import tiny_net, batch\n"
              "model = tiny_net(3)\n"
              "w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3), "
              f"{options})\n"
              "assert w.step(batch(), batch(n=12)).ran\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
