"""The reproduction pipeline end to end on a tiny fake CIFAR-10, and the report's numbers by hand."""

import json
import pickle
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
import reproduce  # noqa: E402


def fake_cifar10(root: Path, per_class_per_batch: int = 3, test_per_class: int = 2) -> Path:
    """The python release's layout and format, with random pixels."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(per_class):
        labels = [c for c in range(10) for _ in range(per_class)]
        return {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels}

    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_class_per_batch), f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump(batch(test_per_class), f)
    return root


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_pipeline_on_a_tiny_setting(tmp_path, capsys):
    data = fake_cifar10(tmp_path / "data")
    results = tmp_path / "results"
    args = ["--grid", "cpu", "--settings", "cifar10-150", "--methods", "msdnet", "hdkd", "--seeds", "0",
            "--epochs", "1", "--max-steps", "2", "--data-dir", str(data), "--results", str(results)]
    reproduce.main(args)
    files = sorted((results / "cifar10-150").glob("*.json"))
    assert [f.name for f in files] == ["hdkd-seed0.json", "msdnet-seed0.json"]
    result = json.loads(files[0].read_text())
    assert result["config"]["method"] == "hdkd" and result["iterations"] == 2 and result["num_exits"] == 4
    assert result["data"] == "cifar10(150)" and result["test"]["num_samples"] == 20
    assert len(result["test"]["top1"]) == len(result["test"]["top5"]) == len(result["val"]["top1"]) == 4
    assert len(result["costs"]["macs"]) == 4 and len(result["budget"]["points"]) == 39
    assert len(result["gamma"]) == 4 + 6 and result["gamma_history"]
    assert result["config"]["data_dir"] == "data" and result["config"]["tag"] == "hdkd"  # no machine paths
    assert not list((results / "cifar10-150").glob("*.ckpt"))  # finished runs leave no checkpoint
    reproduce.main(args)  # finished runs are skipped
    assert "0 runs to do" in capsys.readouterr().out
    report.main([str(results), "--write"])
    text = (results / "cifar10-150" / "report.md").read_text()
    assert "| exit | MMACs | MSDNet | HDKD |" in text and text.count("\n| ") >= 2 * 5
    assert "| exit | HDKD − MSDNet (n=1) |" in text  # the paired differences (one seed: no interval)
    assert (results / "cifar10-150" / "budget.png").stat().st_size > 0


def tiny_run(data: Path, epochs: int) -> list[str]:
    """train.py's arguments for a run of a few seconds on the fake CIFAR-10."""
    return ["--method", "hdkd", "--dataset", "cifar10", "--per-class", "12", "--data-dir", str(data), "--model",
            "branchynet", "--exits", "3", "--width", "4", "--epochs", str(epochs), "--batch-size", "16", "--no-plot",
            "--no-progress"]


def killed_at(monkeypatch, train, args: list[str], iteration: int, cls=None) -> None:
    """Run train.py with ``args`` until its ``iteration``-th step raises KeyboardInterrupt (a killed run)."""
    import metaweight as mw

    cls = cls or mw.HarmonizedWeighter
    real_step, calls = cls.step, []

    def failing_step(self, *a):
        calls.append(1)
        if len(calls) == iteration:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(cls, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args(args))
    monkeypatch.setattr(cls, "step", real_step)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    """A run stopped after a checkpoint and started again ends exactly where an uninterrupted one does."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    base = tiny_run(fake_cifar10(tmp_path / "data"), 3) + ["--gamma-optimizer", "adam", "--select-per-class", "2"]
    whole = train.train(train.parse_args(base))
    ckpt = tmp_path / "run.ckpt"
    resumable = base + ["--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    killed_at(monkeypatch, train, resumable, 5)
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    resumed = train.train(train.parse_args(resumable))
    assert not ckpt.exists()
    assert resumed["iterations"] == whole["iterations"] == 18
    assert resumed["gamma"] == whole["gamma"] and resumed["test"] == whole["test"]
    assert resumed["selection"] == whole["selection"] and resumed["gamma_history"] == whole["gamma_history"]


@pytest.mark.parametrize("method", ["famo", "rlw", "dwa"])
@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_interrupted_weighting_run_resumes_exactly(method, tmp_path, monkeypatch):
    """The same for the other loss weightings: their state (logits and moments, generator, window sums) resumes."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    import metaweight as mw

    base = tiny_run(fake_cifar10(tmp_path / "data"), 2) + ["--teachers", "none"]
    base[base.index("hdkd")] = method
    whole = train.train(train.parse_args(base))
    ckpt = tmp_path / "run.ckpt"
    resumable = base + ["--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    killed_at(monkeypatch, train, resumable, 8, cls=mw.Weighting)
    resumed = train.train(train.parse_args(resumable))
    assert resumed["iterations"] == whole["iterations"] == 12
    assert resumed["gamma"] == whole["gamma"] and resumed["test"] == whole["test"]
    assert resumed["gamma_history"] == whole["gamma_history"]


def test_every_weighting_has_a_dense_and_a_ce_configuration():
    import metaweight as mw

    for w in mw.WEIGHTINGS:
        assert reproduce.CONFIGS[w] == (w, [], 1) and reproduce.CONFIGS[f"{w}_ce"] == (w, ["--teachers", "none"], 1)
        assert {w, f"{w}_ce"} <= set(reproduce.GRIDS["weightings"]["configs"])
    cmd = reproduce.command("cifar10-500", "famo_ce", 1, 100, reproduce.GRIDS["weightings"], Path("x.json"), None,
                            "cpu", 1, None)
    assert cmd[cmd.index("--method") + 1] == "famo" and cmd[cmd.index("--tag") + 1] == "famo_ce"
    assert cmd[cmd.index("--teachers") + 1] == "none" and cmd[cmd.index("--per-class") + 1] == "500"


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_resume_takes_other_thread_counts_and_names_a_setting_that_differs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    ckpt = tmp_path / "run.ckpt"
    base = tiny_run(fake_cifar10(tmp_path / "data"), 2) + ["--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    killed_at(monkeypatch, train, base + ["--threads", "2"], 3)
    with pytest.raises(SystemExit, match="lr: 0.1 there, 0.05 here"):
        train.train(train.parse_args(base + ["--threads", "2", "--lr", "0.05"]))
    assert torch.load(ckpt, weights_only=False)["step"] == 2  # the refused run left the checkpoint alone
    resumed = train.train(train.parse_args(base + ["--threads", "1", "--checkpoint-every", "5"]))
    assert resumed["iterations"] == 12 and not ckpt.exists()


def hand_made(method, seed, top1, top5, seconds):
    return {"config": {"method": method, "seed": seed}, "test": {"top1": top1, "top5": top5, "num_samples": 4},
            "train_seconds": seconds, "data": "toy", "costs": {"macs": [1e6, 3e6]}}


def test_report_statistics_by_hand():
    runs = {"hdkd": [hand_made("hdkd", 0, [50.0, 75.0], [100.0, 100.0], 10.0),
                     hand_made("hdkd", 1, [25.0, 75.0], [75.0, 100.0], 14.0)],
            "msdnet": [hand_made("msdnet", 0, [25.0, 50.0], [75.0, 75.0], 4.0),
                       hand_made("msdnet", 1, [25.0, 100.0], [75.0, 100.0], 6.0)]}
    s = report.summarize(runs)
    assert list(s["methods"]) == ["msdnet", "hdkd"]  # the paper's column order
    assert s["methods"]["hdkd"]["top1"][0] == pytest.approx((37.5, statistics.stdev([50.0, 25.0])))
    assert s["methods"]["msdnet"]["top1"][1] == pytest.approx((75.0, 35.35533905932738))
    assert s["methods"]["hdkd"]["train_seconds"] == pytest.approx((12.0, 2.8284271247461903))
    text = report.table(s, "top1")
    assert "| 1 | 1.00 | 25.00 ± 0.00 | **37.50 ± 17.68** |" in text
    # paired by seed: exit 1 differences 25, 0; exit 2: 25, -25; t_{0.975,1} = 12.706
    diffs = report.paired(runs["hdkd"], runs["msdnet"])
    assert diffs[0] == pytest.approx((12.5, 12.706 * statistics.stdev([25.0, 0.0]) / 2 ** 0.5, 2))
    assert diffs[1] == pytest.approx((0.0, 12.706 * statistics.stdev([25.0, -25.0]) / 2 ** 0.5, 2))
    assert report.paired(runs["hdkd"], [hand_made("msdnet", 7, [0.0, 0.0], [0.0, 0.0], 1.0)]) == []
    # the best other method per exit: DBT at exit 1 (40 > 25), MSDNet at exit 2 (75 > 60); by hand,
    # exit 1: HDKD − DBT = 10, -15 (mean -2.5, sd 17.68); exit 2 as above against MSDNet
    runs["dbt"] = [hand_made("dbt", 0, [40.0, 60.0], [0.0, 0.0], 1.0), hand_made("dbt", 1, [40.0, 60.0], [0.0, 0.0], 1.0)]
    best = report.best_other_table(report.summarize(runs), runs)
    half1 = 12.706 * statistics.stdev([10.0, -15.0]) / 2 ** 0.5
    assert f"| 1 | DBT (40.00): -2.50 ± {half1:.2f} (n=2) |" in best
    assert f"| 2 | MSDNet (75.00): +0.00 ± {diffs[1][1]:.2f} (n=2) |" in best


def test_weighting_table_by_hand():
    """Each weighting against the best fixed preset at each exit, paired by seed, with its time ratio."""
    runs = {"msdnet": [hand_made("msdnet", 0, [25.0, 50.0], [0.0, 0.0], 4.0),
                       hand_made("msdnet", 1, [25.0, 100.0], [0.0, 0.0], 6.0)],
            "dbt": [hand_made("dbt", 0, [40.0, 60.0], [0.0, 0.0], 5.0),
                    hand_made("dbt", 1, [40.0, 60.0], [0.0, 0.0], 5.0)],
            "famo_ce": [hand_made("famo", 0, [50.0, 75.0], [0.0, 0.0], 10.0),
                        hand_made("famo", 1, [20.0, 75.0], [0.0, 0.0], 10.0)]}
    presets = {k: runs[k] for k in ("msdnet", "dbt")}
    assert report.weighting_table(report.summarize(presets), presets) == ""  # no weighting run: no table
    text = report.weighting_table(report.summarize(runs), runs)
    # exit 1: best preset DBT (40 > 25): differences 10, -20; exit 2: MSDNet (75 > 60): 25, -25
    half1 = 12.706 * statistics.stdev([10.0, -20.0]) / 2 ** 0.5
    half2 = 12.706 * statistics.stdev([25.0, -25.0]) / 2 ** 0.5
    assert "| best fixed preset | | | DBT 40.00 | MSDNet 75.00 | |" in text
    assert f"| FAMO | CE | 2 | 35.00 (-5.00 ± {half1:.2f}) | 75.00 (+0.00 ± {half2:.2f}) | 2.00 |" in text
