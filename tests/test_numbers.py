"""One rule for flags, integers and lists of numbers at every public argument: NumPy's bools,
integers and floats, NumPy arrays and tensors are accepted where Python's are, and refused alike
where they are not numbers (bools for numbers, NaN, strings)."""
import copy
import math
import warnings

import pytest
import torch

import metaweight as mw
from metaweight._checks import integer_value, real_numbers

np = pytest.importorskip("numpy")


def test_integer_value_and_real_numbers():
    assert integer_value(2) == 2 and integer_value(np.int64(2)) == 2 and integer_value(np.uint8(3)) == 3
    assert integer_value(torch.tensor(2)) == 2 and type(integer_value(torch.tensor(2))) is int  # a 0-d integer tensor
    for bad in (True, np.True_, 2.0, np.float32(2), "2", None, torch.tensor(2.0), torch.tensor(True),
                torch.tensor([2]), torch.tensor(2, device="meta")):
        assert integer_value(bad) is None
    assert real_numbers([1, 2.5, np.float32(0.5), np.int64(3), torch.tensor(4.0)]) == [1.0, 2.5, 0.5, 3.0, 4.0]
    assert real_numbers(np.arange(3)) == [0.0, 1.0, 2.0] and real_numbers(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    assert real_numbers(()) == [] and math.isnan(real_numbers([float("nan")])[0])  # finiteness: the caller's
    for bad in ([True, 1.0], [np.True_], "12", {"a": 1.0}, np.ones((1, 2)), torch.ones(1, 2), np.array(["a"]),
                torch.tensor([True]), 3.0, [1j]):
        assert real_numbers(bad) is None


def test_numpy_bools_are_flags_everywhere(tmp_path):
    path = tmp_path / "c.pt"
    mw.save_checkpoint({"a": 1}, path)
    assert mw.load_checkpoint(path, weights_only=np.True_, verify=np.False_) == {"a": 1}
    net = mw.MultiExit([torch.nn.Linear(4, 4)] * 2, [torch.nn.Linear(4, 3)] * 2).eval()
    assert mw.exit_costs(net, torch.randn(3, 4), executed=np.False_).macs == \
        mw.exit_costs(net, torch.randn(3, 4)).macs
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="`weights_only` should be a bool"):
            mw.load_checkpoint(path, weights_only=bad)
        with pytest.raises(TypeError, match="`executed` should be a bool"):
            mw.exit_costs(net, torch.randn(3, 4), executed=bad)


def test_numpy_integers_are_integers_everywhere():
    z, y = torch.randn(2, 50, 4), torch.randint(0, 4, (50,))
    assert mw.fit_temperatures(z, y, iterations=np.int64(20)).shape == (2,)
    assert mw.expected_calibration_error(z, y, bins=np.int32(10)) == mw.expected_calibration_error(z, y, bins=10)
    assert mw.anytime_accuracy_from_logits(z, y, topk=[np.int64(1)]).accuracy[1] == \
        mw.anytime_accuracy_from_logits(z, y, topk=[1]).accuracy[1]
    with pytest.raises(ValueError, match="iterations"):
        mw.fit_temperatures(z, y, iterations=np.float64(20))


def test_plot_gamma_history_takes_numpy_numbers_and_refuses_non_finite_steps(tmp_path):
    pytest.importorskip("matplotlib")
    names = ["ce[1]", "kd[2]"]
    mw.plot_gamma_history(list(np.arange(2)), [list(np.ones(2, np.float32))] * 2, names, tmp_path / "a.png")
    mw.plot_gamma_history(np.arange(2), np.ones((2, 2)), names, tmp_path / "b.png")
    mw.plot_gamma_history(torch.arange(2), torch.ones(2, 2), names, tmp_path / "c.png")
    for steps in ([1, float("inf")], [float("nan")], [True], [], "01"):
        with pytest.raises(ValueError, match="`steps` should be a non-empty list of iterations"):
            mw.plot_gamma_history(steps, [[1.0, 1.0]] * max(len(steps), 1), names, tmp_path / "d.png")
    with pytest.raises(ValueError, match=r"`gammas\[0\]`"):
        mw.plot_gamma_history([0], [[np.nan, 1.0]], names, tmp_path / "e.png")


def test_plot_gamma_history_of_zero_weights_is_not_blank_and_does_not_warn(tmp_path):
    pytest.importorskip("matplotlib")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mw.plot_gamma_history([0, 1], [[0.0]] * 2, ["ce[1]"], tmp_path / "z.png").is_file()


def test_plot_anytime_refuses_accuracies_that_are_not_percentages(tmp_path):
    pytest.importorskip("matplotlib")
    good = mw.AnytimeResult({1: [np.float64(40.0), 100.0]}, 10)
    assert mw.plot_anytime({"a": good}, tmp_path / "ok.png", k=np.int64(1)).is_file()
    for accuracy in ([], [float("nan"), 50.0], [250.0, 50.0], [-3.0, 50.0], ["40", 50.0]):
        with pytest.raises(ValueError, match=r"percentage in \[0, 100\]"):
            mw.plot_anytime({"a": mw.AnytimeResult({1: accuracy}, 10)}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _vector_entries():
    """Every public entry that takes a list of numbers (thresholds, temperatures, costs, a
    distribution, bounds, initial weights): a call taking the list, and a list it takes."""
    net = mw.MultiExit([torch.nn.Linear(4, 4)] * 2, [torch.nn.Linear(4, 3)] * 2).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    z, y = torch.randn(2, 6, 3), torch.arange(6) % 3

    def weighter(cls, **options):
        return lambda v: cls(net, opt, mw.DenseDistillLoss(2), **{next(iter(options)): v})

    return net, opt, [
        ("thresholds", [0.5, 0.0], lambda v: mw.EarlyExit(net, v)),
        ("thresholds", [0.5, 0.0], lambda v: mw.exit_assignment(z, v)),
        ("thresholds", [0.5, 0.0], lambda v: mw.evaluate_thresholds(z, y, v, [1.0, 2.0])),
        ("costs", [1.0, 2.0], lambda v: mw.evaluate_thresholds(z, y, [0.5, 0.0], v)),
        ("costs", [1.0, 2.0], lambda v: mw.thresholds_for_budget(z, y, v, 1.5, iterations=3)),
        ("distribution", [0.5, 0.5], lambda v: mw.find_thresholds(z, v)),
        ("temperatures", [1.5, 2.0], lambda v: mw.EarlyExit(net, [0.5, 0.0], temperatures=v)),
        ("min_losses", [0.5, 0.5, 0.0], weighter(mw.FAMO, min_losses=None)),
        ("init", [0.5, 0.5, 0.0], weighter(mw.HarmonizedWeighter, init=None)),
    ]


def test_lists_of_numbers_are_refused_alike_at_every_entry():
    """EarlyExit read its thresholds with torch.as_tensor: bools taken as 1 and 0, a complex number's
    imaginary part dropped (with torch's warning), where exit_assignment refused them. Every entry
    taking a list of numbers reads it by one rule, and refuses these naming the argument, with no
    torch error or warning, changing nothing."""
    net, opt, entries = _vector_entries()
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for name, good, call in entries:
        call(good)
        n = len(good)
        bad = [[True] * n, torch.ones(n, dtype=torch.bool), np.array([0.5 + 3j] + [0.0] * (n - 1)),
               ["0.5"] * n, torch.tensor(good).to_sparse(), [10**400] + good[1:], np.array(good, dtype=object),
               [torch.tensor([0.5])] * n]
        for value in bad:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises((TypeError, ValueError), match=name) as info:
                    call(value)
            assert type(info.value) in (TypeError, ValueError), (name, value)
    torch.testing.assert_close(copy.deepcopy((net.state_dict(), opt.state_dict())), before, rtol=0, atol=0)
