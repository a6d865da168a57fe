"""DenseDistillLoss against a per-sample float64 NumPy reference written from the paper's formulas."""

import math

import numpy as np
import pytest
import torch

import metaweight as mw


def reference_terms(logits: list[np.ndarray], y: np.ndarray, T: float) -> dict[str, float]:
    """CE per exit and T^2 * KL(teacher || student) per pair, by explicit loops over samples."""
    K = len(logits)
    out = {}

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    for k in range(K):
        out[f"ce[{k + 1}]"] = np.mean([-math.log(softmax(z)[c]) for z, c in zip(logits[k], y)])
    for i in range(1, K):
        for j in range(i):
            vals = []
            for zi, zj in zip(logits[i], logits[j]):
                p, q = softmax(zi / T), softmax(zj / T)
                vals.append(T * T * sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q)))
            out[f"kd[{i + 1}->{j + 1}]"] = np.mean(vals)
    return out


def test_term_names_follow_eq5_order():
    names = mw.DenseDistillLoss(4).term_names
    assert names == ["ce[1]", "ce[2]", "ce[3]", "ce[4]", "kd[2->1]", "kd[3->1]", "kd[3->2]",
                     "kd[4->1]", "kd[4->2]", "kd[4->3]"]
    assert len(names) == 4 + 4 * 3 // 2


@pytest.mark.parametrize("K,T", [(1, 1.0), (3, 3.0), (5, 2.0)])
def test_values_match_reference(K, T):
    logits = [torch.randn(7, 4, dtype=torch.float64) * 3 for _ in range(K)]
    y = torch.randint(0, 4, (7,))
    got = mw.DenseDistillLoss(K, temperature=T)(logits, y)
    ref = reference_terms([z.numpy() for z in logits], y.numpy(), T)
    names = mw.DenseDistillLoss(K).term_names
    np.testing.assert_allclose(got.numpy(), [ref[n] for n in names], rtol=1e-10, atol=1e-12)


def test_teacher_is_detached_student_gets_the_gradient():
    crit = mw.DenseDistillLoss(3, temperature=2.0)
    logits = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 6, (5,))
    kd = crit(logits, y)[crit.index("kd[3->1]")]
    grads = torch.autograd.grad(kd, logits, allow_unused=True)
    assert grads[1] is None or torch.count_nonzero(grads[1]) == 0
    assert grads[2] is None or torch.count_nonzero(grads[2]) == 0  # the teacher
    # the student's gradient, by central differences on the reference formula
    z = [t.detach().numpy().copy() for t in logits]
    h, i0, c0 = 1e-6, 2, 3
    zp = [a.copy() for a in z]; zp[0][i0, c0] += h
    zm = [a.copy() for a in z]; zm[0][i0, c0] -= h
    fd = (reference_terms(zp, y.numpy(), 2.0)["kd[3->1]"] - reference_terms(zm, y.numpy(), 2.0)["kd[3->1]"]) / (2 * h)
    assert grads[0][i0, c0].item() == pytest.approx(fd, rel=1e-6)


def test_last_and_none_teachers_mask_terms_exactly():
    logits = [torch.randn(6, 3) for _ in range(4)]
    y = torch.randint(0, 3, (6,))
    dense = mw.DenseDistillLoss(4)(logits, y)
    last = mw.DenseDistillLoss(4, teachers="last")
    none = mw.DenseDistillLoss(4, teachers="none")
    got_last, got_none = last(logits, y), none(logits, y)
    for k, name in enumerate(last.term_names):
        if name.startswith("ce") or name.startswith("kd[4->"):
            assert last.active[k] and torch.equal(got_last[k], dense[k])
        else:
            assert not last.active[k] and got_last[k] == 0
        assert bool(none.active[k]) == name.startswith("ce")
        assert got_none[k] == (dense[k] if name.startswith("ce") else 0)


def test_kd_is_zero_for_identical_exits_and_nonnegative():
    z = torch.randn(8, 5)
    terms = mw.DenseDistillLoss(3)([z, z.clone(), z.clone()], torch.randint(0, 5, (8,)))
    assert torch.allclose(terms[3:], torch.zeros(3), atol=1e-6)
    terms = mw.DenseDistillLoss(3)([torch.randn(8, 5) for _ in range(3)], torch.randint(0, 5, (8,)))
    assert (terms[3:] >= 0).all()


def test_half_precision_logits_give_float32_terms():
    logits = [torch.randn(4, 3).bfloat16() for _ in range(2)]
    terms = mw.DenseDistillLoss(2)(logits, torch.tensor([0, 1, 2, 0]))
    ref = mw.DenseDistillLoss(2)([z.float() for z in logits], torch.tensor([0, 1, 2, 0]))
    assert terms.dtype == torch.float32 and torch.allclose(terms, ref)


def test_label_smoothing_matches_torch():
    logits = [torch.randn(6, 4) for _ in range(2)]
    y = torch.randint(0, 4, (6,))
    terms = mw.DenseDistillLoss(2, label_smoothing=0.1)(logits, y)
    assert torch.allclose(terms[0], torch.nn.functional.cross_entropy(logits[0], y, label_smoothing=0.1))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_exits": 0}, "num_exits"),
    ({"num_exits": 3, "temperature": 0}, "temperature"),
    ({"num_exits": 3, "teachers": "all"}, "teachers"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mw.DenseDistillLoss(**kwargs)


def test_label_smoothing_with_a_masked_class_is_infinite_as_documented():
    """Smoothing puts target mass on every class, a -inf class included: CE is inf, as F.cross_entropy's."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    logits[:, 1] = -float("inf")
    labels = torch.tensor([0, 2, 3, 4])
    terms = mw.DenseDistillLoss(2, label_smoothing=0.1)([logits, logits], labels)
    assert torch.isinf(terms[:2]).all() and torch.isinf(F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.isfinite(mw.DenseDistillLoss(2)([logits, logits], labels)[:2]).all()
