"""Every preset: which terms are active, which gamma entries are learned, which are zero."""

import pytest
import torch

import metaweight as mw
from conftest import batch, tiny_net

K = 4
CE = [f"ce[{k}]" for k in range(1, K + 1)]
LAST_KD = [f"kd[{K}->{j}]" for j in range(1, K)]
ALL_KD = [f"kd[{i}->{j}]" for i in range(2, K + 1) for j in range(1, i)]

EXPECTED = {  # method: (active terms, learned)
    "msdnet": (CE, False),
    "dbt": (CE + LAST_KD, False),
    "naive_dkd": (CE + ALL_KD, False),
    "hmsdnet": (CE, True),
    "hdbt": (CE + LAST_KD, True),
    "hdkd": (CE + ALL_KD, True),
}


def test_presets_cover_the_papers_methods():
    assert set(mw.METHODS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_active_terms_and_learned_gamma(name):
    active_names, learned = EXPECTED[name]
    p = mw.preset(name, num_exits=K, temperature=2.0)
    assert p.criterion.temperature == 2.0
    assert [n for n, a in zip(p.criterion.term_names, p.criterion.active) if a] == sorted(
        active_names, key=p.criterion.term_names.index)
    model = tiny_net(K)
    weighter = p.weighter(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), gamma_lr=1.0)
    assert weighter.learn is learned
    gamma0 = weighter.gamma.detach().clone()
    assert gamma0.tolist() == [1.0 if n in active_names else 0.0 for n in p.criterion.term_names]
    for _ in range(3):
        weighter.step(batch(), batch())
    gamma = weighter.gamma_dict()
    for n in p.criterion.term_names:
        if n not in active_names:
            assert gamma[n] == 0.0, n
    changed = any(gamma[n] != 1.0 for n in active_names)
    assert changed is learned


def test_dbt_gives_exactly_the_last_exit_kd_terms():
    logits = [torch.randn(6, 5) for _ in range(K)]
    y = torch.randint(0, 5, (6,))
    dbt = mw.preset("dbt", K).criterion
    dense = mw.DenseDistillLoss(K)
    got, ref = dbt(logits, y), dense(logits, y)
    for n in dbt.term_names:
        i = dbt.index(n)
        assert got[i] == (ref[i] if n in CE + LAST_KD else 0.0), n


def test_last_init_is_dbt_like_under_dense_teachers():
    model = tiny_net(K)
    w = mw.preset("hdkd", K, init="last").weighter(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [n for n, g in w.gamma_dict().items() if g == 1.0] == CE + LAST_KD


def test_preset_refuses_learn_override_and_unknown_names():
    model = tiny_net(K)
    with pytest.raises(ValueError, match="learn"):
        mw.preset("msdnet", K).weighter(model, torch.optim.SGD(model.parameters(), lr=0.1), learn=True)
    with pytest.raises(ValueError, match="hdkd"):
        mw.preset("impr", K)


@pytest.mark.parametrize("name", ["famo", "UW", "sdn"])
def test_a_loss_weighting_s_name_given_to_preset_says_how_to_build_it(name):
    """mw.preset("famo", ...) said only "Unknown method", though the README offers --method famo (found by
    helper-137): the names of mw.WEIGHTINGS are classes, and the refusal names the class to build."""
    with pytest.raises(ValueError, match=rf"is a loss weighting.*mw\.WEIGHTINGS\['{name.lower()}'\]\(model, "
                                         rf"optimizer, criterion\).*mw\.{mw.WEIGHTINGS[name.lower()].__name__}"):
        mw.preset(name, 3)
