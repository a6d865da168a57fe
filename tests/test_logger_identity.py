"""CSVLogger and TensorBoardLogger know their run by an identity, not by guessing from the log's steps
(issue 22, "nothing lost, nothing reported that did not happen"): a resumed run continues its own log,
found from the state a weighter's checkpoint carries, and never another run's; a logger with nothing
restored is a new run and keeps away from every log already there."""

import csv
import os
import re
import time
import warnings

import pytest
import torch

import metaweight as mw


def record(iteration):
    return {"iteration": iteration, "meta_step": iteration, "gamma": {"ce[1]": 0.5, "ce[2]": 0.5}}


def steps(path):
    with open(path, newline="") as f:
        return [int(float(r["iteration"])) for r in csv.DictReader(f)]


def heard(call):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in got]


def shown(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars("metaweight/gamma/ce[1]")]


def test_a_diverted_run_resumed_continues_its_own_log_whatever_its_stride(tmp_path):
    """Reproducer csv2: run A logs 1, 6, ..., 96 (meta_every=5); run B, diverted to log-2.csv, logs 1,
    checkpoints at 5 and crashes. Guessed from the steps (log-2's one row: stride 1, does not lead to 6;
    log.csv holds 6 "before and after"), B resumed at 6 was taken for A resumed: A's rows 6-96 were lost."""
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    [a(record(i)) for i in range(1, 100, 5)]
    a.close()
    b = mw.CSVLogger(path)
    heard(lambda: b(record(1)))
    checkpoint = b.state_dict()
    b.close()
    resumed = mw.CSVLogger(path)
    resumed.load_state_dict(checkpoint)
    assert heard(lambda: (resumed(record(6)), resumed(record(11)))) == []
    assert steps(path) == list(range(1, 100, 5))  # A's log whole
    assert resumed.path == tmp_path / "log-2.csv" and steps(resumed.path) == [1, 6, 11]


def test_a_diverted_tensorboard_run_resumed_continues_its_own_folder_whatever_its_stride(tmp_path):
    """Reproducer tb2: as csv2, TensorBoard hid A's points 6-96 and wrote B's into A's folder."""
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 100, 5)]
    a.close()
    b = mw.TensorBoardLogger(folder)
    heard(lambda: b(record(1)))
    checkpoint = b.state_dict()
    b(record(6))  # logged after the checkpoint, then the crash
    b.close()
    time.sleep(1.1)  # event files are named by the second they were opened: keep them in order
    resumed = mw.TensorBoardLogger(folder)
    resumed.load_state_dict(checkpoint)
    said = heard(lambda: (resumed(record(6)), resumed(record(11))))
    resumed.close()
    assert shown(folder) == list(range(1, 100, 5))  # A's points all shown, none of B's
    assert resumed.log_dir == str(tmp_path / "tb-2") and shown(resumed.log_dir) == [1, 6, 11]
    assert len(said) == 1 and "the step 6 logged after it" in said[0] and "1 to 96" not in said[0]


def test_a_resumed_run_continues_its_own_log_beside_a_log_named_like_a_diverted_one(tmp_path):
    """Reproducer csv1: the user's own exp.csv (seed 1) and exp-2.csv (seed 2); seed 1 resumed at 7 was
    diverted to exp-3.csv as "ambiguous", its run split across files."""
    logs = {}
    for name in ("exp.csv", "exp-2.csv"):
        logger = mw.CSVLogger(tmp_path / name)
        [logger(record(i)) for i in range(1, 7)]
        logs[name] = logger.state_dict()  # the checkpoint at 6
        [logger(record(i)) for i in range(7, 11)]
        logger.close()
    resumed = mw.CSVLogger(tmp_path / "exp.csv")
    resumed.load_state_dict(logs["exp.csv"])
    said = heard(lambda: (resumed(record(7)), resumed(record(8))))
    assert resumed.path == tmp_path / "exp.csv" and steps(tmp_path / "exp.csv") == list(range(1, 9))
    assert steps(tmp_path / "exp-2.csv") == list(range(1, 11)) and not (tmp_path / "exp-3.csv").exists()
    assert len(said) == 1 and "4 rows 7 to 10" in said[0]


def test_a_diverted_run_resumed_twice_stays_in_one_log(tmp_path):
    """Reproducer csv4: run B, diverted to log-2.csv beside A's 1-100, resumed at 11 then at 21, was split
    into log-3.csv and log-4.csv."""
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    [a(record(i)) for i in range(1, 101)]
    a.close()
    b = mw.CSVLogger(path)
    heard(lambda: [b(record(i)) for i in range(1, 11)])
    checkpoint = b.state_dict()
    b.close()
    for start in (11, 21):
        resumed = mw.CSVLogger(path)
        resumed.load_state_dict(checkpoint)
        assert heard(lambda: [resumed(record(i)) for i in range(start, start + 10)]) == []
        checkpoint = resumed.state_dict()
        resumed.close()
        assert resumed.path == tmp_path / "log-2.csv"
    assert steps(path) == list(range(1, 101)) and steps(tmp_path / "log-2.csv") == list(range(1, 31))
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == ["log-2.csv", "log.csv"]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_rollback_in_the_same_process_names_what_it_drops(tmp_path, kind):
    """Reproducer csv3: a record at 3 after 5 in the same logger dropped rows 3-5 with no warning."""
    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    logger = mw.CSVLogger(tmp_path / "log.csv") if kind == "csv" else mw.TensorBoardLogger(tmp_path / "tb")
    [logger(record(i)) for i in range(1, 6)]
    said = heard(lambda: logger(record(3)))
    logger.close()
    assert len(said) == 1 and "rolled back" in said[0] and "3 steps 3 to 5" in said[0].replace("rows", "steps")
    if kind == "csv":
        assert steps(tmp_path / "log.csv") == [1, 2, 3]
    else:
        assert shown(tmp_path / "tb") == [1, 2, 3]


def test_a_tensorboard_resume_counts_only_the_points_still_shown(tmp_path):
    """Reproducer csv3/tb: a second resume counted the points an earlier resume had hidden already."""
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    [logger(record(i)) for i in range(1, 3)]
    at_2 = logger.state_dict()
    [logger(record(i)) for i in range(3, 6)]
    logger.close()
    time.sleep(1.1)
    again = mw.TensorBoardLogger(folder)
    again.load_state_dict(at_2)
    heard(lambda: again(record(3)))  # hides 3-5
    at_3 = again.state_dict()
    again(record(4))
    again.close()
    time.sleep(1.1)
    third = mw.TensorBoardLogger(folder)
    third.load_state_dict(at_3)
    said = heard(lambda: third(record(4)))
    third.close()
    assert shown(folder) == [1, 2, 3, 4]
    # (the folder's path and the run id may hold a 5 of their own: the steps are read without them)
    steps_said = re.sub(r"run id [^)]*", "", said[0].replace(str(folder), "TB"))
    assert len(said) == 1 and "the step 4 logged after it" in said[0] and not re.search(r"\b5\b", steps_said)


def _net():
    torch.manual_seed(0)
    return mw.MultiExit([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])


def _weighter(kind, logger):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    if kind == "harmonized":
        return mw.HarmonizedWeighter(net, optimizer, mw.DenseDistillLoss(2), callbacks=[logger])
    return mw.UW(net, optimizer, mw.DenseDistillLoss(2), callbacks=[logger])


def _steps(weighter, n):
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    for _ in range(n):
        if isinstance(weighter, mw.HarmonizedWeighter):
            weighter.step(batch, batch)
        else:
            weighter.optimizer.zero_grad()
            weighter.loss(weighter.module(batch[0]), batch[1]).backward()
            weighter.optimizer.step()
            weighter.meta_step(batch)


@pytest.mark.parametrize("kind", ["harmonized", "uw"])
def test_a_run_resumed_through_a_checkpoint_file_continues_its_own_log(tmp_path, kind):
    """The weighter's checkpoint carries its loggers' state: a new process (new logger, new weighter)
    loading it continues the same log, dropping only the rows logged after the checkpoint, and names
    them; a new run on that path beside it never touches it."""
    path = tmp_path / "log.csv"
    other = mw.CSVLogger(tmp_path / "other.csv")  # a second run's log beside, never touched
    [other(record(i)) for i in range(1, 9)]
    other.close()
    first = _weighter(kind, mw.CSVLogger(path))
    _steps(first, 3)
    mw.save_checkpoint({"weighter": first.state_dict()}, tmp_path / "ckpt.pt")
    _steps(first, 2)  # logged, then the crash: undone
    first.callbacks[0].close()
    del first
    checkpoint = mw.load_checkpoint(tmp_path / "ckpt.pt")
    logger = mw.CSVLogger(path)
    resumed = _weighter(kind, logger)
    resumed.load_state_dict(checkpoint["weighter"])
    said = heard(lambda: _steps(resumed, 3))
    logger.close()
    assert logger.path == path and steps(path) == [1, 2, 3, 4, 5, 6]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".csv")) == ["log.csv", "other.csv"]
    assert [s for s in said if "log.csv" in s] == [s for s in said if "2 rows 4 to 5" in s] and \
        len([s for s in said if "log.csv" in s]) == 1
    assert steps(tmp_path / "other.csv") == list(range(1, 9))


def test_a_checkpoint_without_logger_state_still_loads_and_keeps_the_old_log(tmp_path):
    """A checkpoint of an older version has no ``hooks``: it loads, and its logger is a new run, kept
    away from the log there (made without a run id) instead of guessing it is its own."""
    path = tmp_path / "log.csv"
    first = _weighter("harmonized", mw.CSVLogger(path))
    _steps(first, 3)
    state = first.state_dict()
    del state["hooks"]
    first.callbacks[0].close()
    os.unlink(tmp_path / ".log.csv.metaweight")  # as an older version left it: no run id
    before = path.read_bytes()
    logger = mw.CSVLogger(path)
    resumed = _weighter("harmonized", logger)
    resumed.load_state_dict(state)
    assert resumed.num_meta_steps == 3
    said = heard(lambda: _steps(resumed, 1))
    logger.close()
    assert path.read_bytes() == before and logger.path == tmp_path / "log-2.csv" and steps(logger.path) == [4]
    assert len(said) == 1 and "without a run id" in said[0]


def test_a_bad_logger_state_is_refused_and_changes_nothing(tmp_path):
    logger = mw.CSVLogger(tmp_path / "log.csv")
    weighter = _weighter("harmonized", logger)
    _steps(weighter, 1)
    state = weighter.state_dict()
    state["hooks"][0]["state"] = {"logger": "CSVLogger", "run_id": 3, "path": None, "last_step": None}
    gamma = weighter.gamma.clone()
    with pytest.raises(ValueError, match="run_id should be a non-empty str"):
        weighter.load_state_dict(state)
    assert torch.equal(weighter.gamma, gamma) and logger.state_dict()["run_id"] != 3
    with pytest.raises(ValueError, match="TensorBoardLogger's, not a CSVLogger's"):
        logger.load_state_dict({"logger": "TensorBoardLogger", "run_id": "x", "path": None, "last_step": None})
    logger.close()
