"""``python -m metaweight plot``: no run replaced by another with the same label, and every plot judged
(its arguments, its path) before the first figure is written: a usage error (status 2), nothing written."""

import json

import pytest

pytest.importorskip("matplotlib")

from metaweight import __main__ as cli  # noqa: E402


def result(path, method, top1, gamma_history=None, term_names=("ce[1]",)):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": {"method": method}, "test": {"num_samples": 10, "top1": top1}}
    if gamma_history is not None:
        data["gamma_history"], data["term_names"] = gamma_history, list(term_names)
    path.write_text(json.dumps(data))
    return str(path)


def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_labels_that_coincide_once_built_never_drop_a_run(tmp_path, monkeypatch):
    files = [result(tmp_path / "s0" / "r.json", "hdkd", [10.0, 20.0]),
             result(tmp_path / "s1" / "r.json", "hdkd", [30.0, 40.0]),
             result(tmp_path / "x.json", "hdkd (s0)", [50.0, 60.0])]  # reads as the first file's label
    seen = {}
    real = cli.plot_anytime
    monkeypatch.setattr(cli, "plot_anytime", lambda results, path, **k: (seen.update(results),
                                                                          real(results, path, **k))[1])
    cli.main(["plot", *files, "--out", str(tmp_path / "out")])
    assert {n: r.accuracy[1] for n, r in seen.items()} == {
        "hdkd (s0)": [10.0, 20.0], "hdkd (s1)": [30.0, 40.0], "hdkd (s0) #2": [50.0, 60.0]}


def test_runs_of_one_method_in_one_folder_are_labelled_by_their_file_names(tmp_path, monkeypatch):
    """results/cpu/<setting>/hdkd-seed{0,1}.json, the repository's own layout: their folder is one, and the labels
    were the whole paths (a legend running over the curves; helper-147); the file names tell them apart."""
    files = [result(tmp_path / "r" / f"hdkd-seed{s}.json", "hdkd", [10.0 * s, 20.0]) for s in (0, 1)]
    seen = {}
    real = cli.plot_anytime
    monkeypatch.setattr(cli, "plot_anytime", lambda results, path, **k: (seen.update(results),
                                                                          real(results, path, **k))[1])
    cli.main(["plot", *files, "--out", str(tmp_path / "out")])
    assert sorted(seen) == ["hdkd (hdkd-seed0)", "hdkd (hdkd-seed1)"]
    # two settings of two seeds each: folders repeat and so do file names, the two together tell them apart
    # (helper-148: the whole paths again)
    seen.clear()
    files = [result(tmp_path / "results" / setting / f"hdkd-seed{s}.json", "hdkd", [10.0 * s, 20.0])
             for setting in ("adam", "sgd") for s in (0, 1)]
    cli.main(["plot", *files, "--out", str(tmp_path / "out2")])
    assert sorted(seen) == ["hdkd (adam/hdkd-seed0)", "hdkd (adam/hdkd-seed1)", "hdkd (sgd/hdkd-seed0)",
                            "hdkd (sgd/hdkd-seed1)"]


def test_a_folder_where_a_plot_goes_is_named_as_a_problem_of_out(tmp_path, capsys):
    """A folder named anytime.png in --out was reported as result files that 'cannot be plotted together'."""
    a = result(tmp_path / "a.json", "a", [10.0, 20.0])
    (tmp_path / "out" / "anytime.png").mkdir(parents=True)
    err = usage_error(["plot", a, "--out", str(tmp_path / "out"), "--overwrite"], capsys)
    assert "--out" in err and "holds a folder where a plot is to be written" in err and "anytime.png" in err
    assert "cannot be plotted together" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["anytime.png"]


def test_a_snapshot_of_the_wrong_length_stops_before_any_plot_is_written(tmp_path, capsys):
    bad = result(tmp_path / "a.json", "hdkd", [10.0, 20.0], gamma_history=[{"step": 1, "gamma": [0.5, 0.5]}])
    err = usage_error(["plot", bad, "--out", str(tmp_path / "out")], capsys)
    assert "a.json: its 'gamma_history' entry cannot be plotted" in err and "gammas[0]" in err
    assert not (tmp_path / "out").exists()  # anytime.png, drawn first before, is not written either


def test_results_that_cannot_share_a_figure_are_a_usage_error(tmp_path, capsys):
    a = result(tmp_path / "a.json", "a", [10.0, 20.0])
    b = result(tmp_path / "b.json", "b", [10.0, 20.0, 30.0])
    err = usage_error(["plot", a, b, "--out", str(tmp_path / "out")], capsys)
    assert "cannot be plotted together" in err and "different numbers of exits" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_an_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path, capsys, out):
    (tmp_path / "afile").write_text("x")
    a = result(tmp_path / "a.json", "a", [10.0, 20.0])
    err = usage_error(["plot", a, "--out", str(tmp_path / out)], capsys)
    assert "--out" in err and "is a file" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_name_too_long_for_the_file_system_is_refused_before_drawing(tmp_path):
    import metaweight as mw

    result = mw.AnytimeResult({1: [40.0, 50.0]}, 10)
    with pytest.raises(ValueError, match="bytes long.*at most.*shorter file name"):
        mw.plot_anytime({"m": result}, tmp_path / "out" / ("x" * 300 + ".png"))
    assert list(tmp_path.iterdir()) == []


def test_a_long_method_name_is_plotted_under_a_shorter_file_name(tmp_path, capsys):
    a = result(tmp_path / "a.json", "x" * 300, [40.0, 50.0], [{"step": 1, "gamma": [1.0]}])
    cli.main(["plot", a, "--out", str(tmp_path / "out")])
    assert sorted(len(p.name) <= 255 for p in (tmp_path / "out").iterdir()) == [True, True]


def test_plots_of_an_earlier_command_are_replaced_only_with_overwrite(tmp_path, capsys):
    a = result(tmp_path / "a.json", "hdkd", [40.0, 50.0])
    b = result(tmp_path / "b.json", "uw", [10.0, 20.0])
    out = tmp_path / "out"
    cli.main(["plot", a, "--out", str(out)])
    before = (out / "anytime.png").read_bytes()
    err = usage_error(["plot", b, "--out", str(out)], capsys)
    assert "already holds" in err and "--overwrite" in err and (out / "anytime.png").read_bytes() == before
    cli.main(["plot", b, "--out", str(out), "--overwrite"])
    assert (out / "anytime.png").read_bytes() != before


_GAMMA = {"gamma_history": [{"step": 1, "gamma": [0.5, 0.5]}, {"step": 2, "gamma": [0.4, 0.6]}],
          "term_names": ["a", "b"]}


@pytest.mark.parametrize("entries, expected", [
    ({}, r"nothing to plot in .*'budget', 'test', 'gamma_history'"),
    ({"gamma_history": []}, r"nothing to plot"),
    ({"test": {"top1": [50.0, 60.0], "num_samples": 10.7}}, r"'num_samples' should be a positive integer.*10\.7"),
    ({"test": {"top1": [50.0, 60.0], "num_samples": 0}}, r"'num_samples' should be a positive integer.*Found 0"),
    ({"test": {"top1": [50.0, 60.0], "num_samples": True}}, r"'num_samples' should be a positive integer"),
    ({"test": {"top1": [50.0, 60.0], "top0": [1.0, 2.0], "num_samples": 10}}, r"'top0' is not a top-k"),
    ({"test": {"num_samples": 10}}, r"no top-k accuracy"),
    ({"test": {"top1": "abc", "num_samples": 10}}, r"'top1' should be a list of accuracies.*Found 'abc'"),  # ['a', ...]
    ({**_GAMMA, "gamma_history": [_GAMMA["gamma_history"][0]] * 2}, r"`steps` should increase.*1 after 1"),
    ({**_GAMMA, "gamma_history": _GAMMA["gamma_history"][::-1]}, r"`steps` should increase.*1 after 2"),
    ({**_GAMMA, "term_names": ["a", "a"]}, r"`term_names` should name each term once: \['a'\]"),
])
def test_a_result_file_with_nothing_or_something_wrong_to_plot_is_a_usage_error(tmp_path, capsys, entries,
                                                                               expected):
    """Issue 22: nothing to plot exited 0 in silence; 10.7 samples were read as 10, a top-0 accuracy, repeated
    or decreasing steps and repeated term names were plotted as if right. Each stops with status 2, naming
    what is wrong, and nothing is written."""
    import re

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": {"method": "hdkd"}, **entries}))
    out = tmp_path / "out"
    err = usage_error(["plot", str(path), "--out", str(out)], capsys)
    assert re.search(expected, err.replace("\n", " ")), err
    assert not out.exists()
    path.write_text(json.dumps({"config": {"method": "hdkd"}, "test": {"top1": [50.0, 60.0], "num_samples": 10},
                                **_GAMMA}))
    cli.main(["plot", str(path), "--out", str(out)])  # the same file made right: plotted
    assert sorted(p.name for p in out.iterdir()) == ["anytime.png", "gamma-hdkd.png"]


@pytest.mark.parametrize("key", ["budget", "test", "gamma_history"])
@pytest.mark.parametrize("empty", [None, [], {}])
def test_a_null_or_empty_entry_is_absent_under_one_rule(tmp_path, capsys, key, empty):
    """``"budget": null`` stopped the command as malformed while ``"gamma_history": []`` was read as
    absent: one rule now, for every entry the command plots: ``null``, ``[]`` and ``{}`` are absent.
    Beside another entry the file is plotted without it; alone, it is "nothing to plot"."""
    other = {"test": {"num_samples": 10, "top1": [50.0, 60.0]}} if key != "test" else _GAMMA
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": {"method": "hdkd"}, **other, key: empty}))
    out = tmp_path / "out"
    cli.main(["plot", str(path), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == (["anytime.png"] if key != "test" else ["gamma-hdkd.png"])
    path.write_text(json.dumps({"config": {"method": "hdkd"}, key: empty}))
    assert "nothing to plot" in usage_error(["plot", str(path), "--out", str(tmp_path / "out2")], capsys)
    assert not (tmp_path / "out2").exists()


def test_a_tilde_in_the_paths_means_the_home_folder(tmp_path, monkeypatch):
    """``--out=~/plots`` (no shell expands a ``~`` after ``=``) made a folder named ``~``; every path is
    read as a shell reads it: ``~`` is the home folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result(home / "r.json", "hdkd", [10.0, 20.0])
    cli.main(["plot", "~/r.json", "--out=~/plots"])
    assert list((home / "plots").iterdir()) and not (work / "~").exists()
