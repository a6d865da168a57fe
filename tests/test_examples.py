"""The examples: MSDNet/BranchyNet shapes and sizes, and the main job end to end on tiny settings."""

import json
import sys
from pathlib import Path

import pytest
import torch

import metaweight as mw

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar, msdnet_imagenet  # noqa: E402


def test_msdnet_cifar_is_the_8_exit_anytime_model():
    net = msdnet_cifar(100, 8)
    out = net(torch.randn(2, 3, 32, 32))
    assert len(out) == 8 and all(z.shape == (2, 100) for z in out)
    # Huang et al.'s CIFAR MSDNet with 8 blocks (base 4, step 2, growth 6, 16 stem channels): ~3.6 M parameters
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(3.6e6, rel=0.01)


def test_msdnet_imagenet_has_5_exits():
    net = msdnet_imagenet(1000, 5).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert len(out) == 5 and all(z.shape == (1, 1000) for z in out)


def test_iter_exits_computes_the_same_logits_lazily():
    net = msdnet_cifar(10, 4, channels=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = net(x)
        first = next(net.iter_exits(x))
    assert torch.equal(full[0], first)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_branchynet_runs_on_small_and_large_images(shape):
    net = branchynet(10, shape[0], num_exits=3, width=8)
    out = net(torch.randn(2, *shape))
    assert isinstance(net, mw.MultiExit) and len(out) == 3 and out[0].shape == (2, 10)


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_msdnet_meta_step_runs_and_leaves_the_model_unchanged():
    net = msdnet_cifar(10, 3, channels=4, growth_rate=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    w = mw.preset("hdkd", 3).weighter(net, opt, gamma_lr=0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    out = w.meta_step(batch, batch)
    assert out["gamma_grad"].abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("method", ["hdkd", "msdnet", "gradnorm", "sdn"])
def test_train_main_job_smoke(method, tmp_path, capsys):
    import train

    out_file = tmp_path / "result.json"
    train.main(["--method", method, "--epochs", "1", "--max-steps", "3", "--no-progress", "--out", str(out_file)])
    printed = capsys.readouterr().out
    assert "per-exit test accuracy" in printed and "top-1" in printed
    assert f"runs/budget-digits-{method}.png" in printed or "no budget plot" in printed  # runs do not collide
    result = json.loads(out_file.read_text())
    assert result["iterations"] == 3 and result["num_exits"] == 3
    assert len(result["test"]["top1"]) == 3 and result["test"]["num_samples"] == 359
    assert all(0 <= a <= 100 for a in result["test"]["top1"])
    assert len(result["gamma"]) == len(result["term_names"]) == 6


def test_multitask_example_learns_both_tasks_and_turns_down_the_conflicting_term():
    import multitask

    out = multitask.main(["--epochs", "6"])
    assert out["accuracy"] > 80.0 and out["ink_error"] < 0.5  # chance: 10%, and 1.0 for the standardised ink
    assert out["gamma"]["ink_aux"] < 1.0  # the penalty pulling the ink output to 0 works against the ink task


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_hint_terms_example_harmonizes_kd_and_hint_terms():
    import hint_terms

    out = hint_terms.main(["--epochs", "2"])
    assert len(out["top1"]) == 3 and max(out["top1"]) > 30.0
    assert [n for n in out["gamma"] if n.startswith("hint")] == ["hint[3->1]", "hint[3->2]"]
    assert len(set(round(g, 6) for g in out["gamma"].values())) > 1  # the weights moved apart


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_the_loop_to_copy_trains_every_exit():
    import loop

    result = loop.main(epochs=3)
    assert result.num_exits == 3 and min(result.accuracy[1]) > 50.0  # chance: 10%


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_resnet_example_turns_a_plain_resnet_multi_exit_and_trains_it():
    import resnet

    result = resnet.main(["--epochs", "2"])
    assert result.num_exits == 3 and max(result.accuracy[1]) > 30.0  # chance: 10%


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_huggingface_example_trains_a_bert_style_model_with_exits_by_name():
    pytest.importorskip("transformers")
    import huggingface

    result = huggingface.main(["--steps", "40"])
    assert result.num_exits == 4 and max(result.accuracy[1]) > 45.0  # chance: 33%


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_token_level_example_scores_tokens_not_padding():
    import token_exits

    ids, tags = token_exits.tagging_task(8, 0)
    assert (tags[ids == 0] == token_exits.PAD).all() and (tags[ids != 0] >= 0).all()
    result = token_exits.main(["--steps", "100"])
    assert result.num_exits == 4 and max(result.accuracy[1]) > 65.0  # the majority tag alone: 48%


def test_token_level_example_is_deterministic_exact_and_leaves_the_thread_count(recwarn):
    import token_exits

    threads = torch.get_num_threads()
    first = token_exits.main(["--steps", "2"])
    assert torch.get_num_threads() == threads  # one thread inside main only
    second = token_exits.main(["--steps", "2"])
    assert first.accuracy == second.accuracy  # the same numbers at every run
    # the math attention kernel: the exact meta-gradient (backend="jvp"), no fallback to finite differences
    assert not [w for w in recwarn if "forward-mode derivative" in str(w.message)]


def test_train_help_shows_every_option_with_help_and_default(capsys):
    import train

    parser = train.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 30
    assert [a.dest for a in options if not a.help] == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count("(default:") == len(options)  # ArgumentDefaultsHelpFormatter: every default shown


def test_train_help_describes_every_method(capsys):
    import train

    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    described = {line.split()[0] for line in text.split("methods (--method):", 1)[-1].splitlines() if line.strip()}
    assert described == set(mw.METHODS) | set(mw.WEIGHTINGS)
    for name, method in mw.METHODS.items():
        assert method.description in text


def test_train_threads_default_to_one_on_the_small_data_sets():
    import train

    assert train.default_threads("digits") == train.default_threads("fashion-mnist") == 1
    assert train.default_threads("cifar10") >= 1
    with pytest.raises(SystemExit):
        train.parse_args(["--threads", "0"])


def test_train_py_reads_a_tilde_in_its_paths_as_the_home_folder(tmp_path, monkeypatch):
    """``--out=~/r.json`` (a shell expands no ``~`` after ``=``) wrote under a folder named ``~``."""
    import train

    monkeypatch.setenv("HOME", str(tmp_path))
    args = train.parse_args(["--out=~/r.json", "--plot=~/p.png", "--checkpoint=~/c.pt", "--data-dir=~/data"])
    assert [args.out, args.plot, args.checkpoint, args.data_dir] == [
        str(tmp_path / "r.json"), str(tmp_path / "p.png"), str(tmp_path / "c.pt"), str(tmp_path / "data")]


class _Killed(Exception):
    """Stands for the job killed at an iteration (see :func:`_run_killed_at`)."""


def _run_killed_at(monkeypatch, args, at):
    """examples/train.py's ``train`` on ``args``, killed at iteration ``at`` (after the checkpoints before it); the
    progress bar is its own again afterwards."""
    import train

    real = train.Progress.update

    def update(self, step, *rest, **kwargs):
        if step == at:
            raise _Killed
        return real(self, step, *rest, **kwargs)

    monkeypatch.setattr(train.Progress, "update", update)
    try:
        with pytest.raises(_Killed):
            train.train(train.parse_args(args))
    finally:
        monkeypatch.setattr(train.Progress, "update", real)


@pytest.mark.parametrize("meta_every", [1, 3])
def test_train_py_resumed_from_its_checkpoint_records_the_history_of_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                                         meta_every):
    """A record averages d L_val / d gamma over the meta steps since the last one (every 2nd step of a
    200-step run); a checkpoint between two records held none of them, so the first record after a
    resume averaged its own meta steps only (gamma_grad_norm 0.0073 where the run had 0.0220). With
    --meta-every 3 a record's val_objective is the last meta step's (step 4's at step 6), which the
    weighter's checkpoint does not hold: the resumed run recorded None."""
    def run(checkpoint, every, at):
        _run_killed_at(monkeypatch, ["--epochs", "2", "--max-steps", "200", "--batch-size", "8", "--width", "4",
                                     "--exits", "2", "--no-plot", "--no-progress", "--threads", "1",
                                     "--meta-every", str(meta_every),
                                     "--checkpoint", str(checkpoint), "--checkpoint-every", str(every)], at)

    run(tmp_path / "reference.pt", 1, 7)  # uninterrupted to step 6: its checkpoint holds the records up to there
    run(tmp_path / "run.pt", 5, 6)  # killed after the checkpoint of step 5, between two records (4 and 6)
    run(tmp_path / "run.pt", 1, 7)  # resumed from it, to step 6
    reference, resumed = (torch.load(tmp_path / name, weights_only=False) for name in ("reference.pt", "run.pt"))
    assert reference["step"] == resumed["step"] == 6
    assert [r["step"] for r in resumed["history"]] == [2, 4, 6]
    assert resumed["history"] == reference["history"]
    assert all(r["val_objective"] is not None for r in resumed["history"])


def test_train_py_resumes_under_another_out_or_tag_and_refuses_harmonized_options_for_a_weighting(tmp_path, capsys,
                                                                                                   monkeypatch):
    """--out and --tag say where the results go and what they are called, not what the run computes: a run resumed
    with other values of them goes on from its checkpoint (helper-149: refused as another run's). The harmonized
    weighter's options given with a loss weighting, which does not take them, are refused (they were recorded in
    the results, unused), naming them; with a preset they are taken."""
    import train

    common = ["--epochs", "1", "--max-steps", "6", "--batch-size", "8", "--width", "4", "--exits", "2", "--no-plot",
              "--no-progress", "--threads", "1", "--checkpoint", str(tmp_path / "c.pt"), "--checkpoint-every", "1"]
    _run_killed_at(monkeypatch, common + ["--out", str(tmp_path / "a.json"), "--tag", "a"], 4)
    capsys.readouterr()
    out = train.train(train.parse_args(common + ["--out", str(tmp_path / "b.json"), "--tag", "b"]))
    assert "resumed from" in capsys.readouterr().out
    assert out["config"]["tag"] == "b" and (tmp_path / "b.json").is_file() and not (tmp_path / "a.json").exists()

    for flags in (["--gamma-lr", "0.1"], ["--mode", "fast", "--meta-every", "2"]):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(["--method", "famo", *flags])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert all(f in err for f in flags if f.startswith("--")) and "'famo' does not use them" in err
    with pytest.raises(SystemExit):  # a preset of fixed weights learns no gamma either (helper-150)
        train.parse_args(["--method", "msdnet", "--gamma-lr", "0.5"])
    assert "'msdnet' does not use them" in capsys.readouterr().err
    assert train.parse_args(["--method", "dbt", "--gamma-init", "last"]).gamma_init == "last"  # (its weights)
    assert train.parse_args(["--method", "hdkd", "--gamma-lr", "0.1"]).gamma_lr == 0.1


def test_train_py_checkpoint_through_a_symbolic_link_resumes_and_leaves_the_link_as_it_was(tmp_path, capsys,
                                                                                            monkeypatch):
    """--checkpoint latest.pt -> run/ckpt.pt: the library's save_checkpoint writes through the link (train.py's own
    save, which it replaced, put a file in place of the link); an interrupted run resumes from it; a finished run
    removes the file it wrote and leaves the link as it was before the run (helper-152: the file stayed behind, the
    link alone removed)."""
    import train

    (tmp_path / "run").mkdir()
    link = tmp_path / "latest.pt"
    link.symlink_to(tmp_path / "run" / "ckpt.pt")
    args = ["--epochs", "1", "--max-steps", "6", "--batch-size", "8", "--width", "4", "--exits", "2", "--no-plot",
            "--no-progress", "--threads", "1", "--checkpoint", str(link), "--checkpoint-every", "1"]
    _run_killed_at(monkeypatch, args, 4)
    assert link.is_symlink() and (tmp_path / "run" / "ckpt.pt").is_file()
    capsys.readouterr()
    train.train(train.parse_args(args))
    assert "resumed from" in capsys.readouterr().out
    assert link.is_symlink() and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("script", ["loop.py", "branchynet.py", "transformer.py"])  # (the others' parsers: above)
def test_every_runnable_example_answers_help_with_its_usage_and_runs_nothing(script):
    """``python examples/loop.py --help`` started the 15-epoch run (no parser), and branchynet.py and
    transformer.py printed nothing (helper-157): each example answers --help with its usage, at once."""
    import subprocess

    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), (done.stdout[:200], done.stderr[-500:])
