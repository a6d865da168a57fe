"""CSVLogger and TensorBoardLogger: a failed write changes nothing the logger holds, a torn line is
repaired before the next row, a resumed run's record is judged as the same record mid-run, and no
file is written where it cannot be read back (issue 22, third review)."""

import csv
import os
import time
import warnings

import pytest

import metaweight as mw
from metaweight import _logging


def record(iteration, terms=None, gamma=None):
    return {"iteration": iteration, "meta_step": iteration, "gamma": gamma or {"ce[1]": 0.5},
            "terms": {} if terms is None else terms}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def heard(call):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in got]


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_failed_widening_leaves_the_columns_as_they_were(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    logger = mw.CSVLogger(path)
    logger(record(1))
    with monkeypatch.context() as m:
        m.setattr(_logging.tempfile, "mkstemp", _disk_full)
        assert any("could not write iteration 2" in w for w in heard(lambda: logger(record(2, {"ce[1]": 1.0}))))
    assert logger._fields == ["iteration", "meta_step", "gamma/ce[1]"]  # not widened: the file was not
    logger(record(3, {"ce[1]": 2.0}))
    table = rows(path)
    assert table[0] == ["iteration", "meta_step", "gamma/ce[1]", "term/ce[1]"]
    assert table[1:] == [["1", "1", "0.5", ""], ["3", "3", "0.5", "2.0"]]  # every row as long as the header
    logger.close()


def test_a_failed_rollback_or_restart_changes_nothing_the_logger_holds(tmp_path, monkeypatch):
    # a rollback (iteration back to 2) whose rewrite fails: the last step stays 3
    path = tmp_path / "roll.csv"
    logger = mw.CSVLogger(path)
    for i in (1, 2, 3):
        logger(record(i))
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(_logging.tempfile, "mkstemp", _disk_full)
        heard(lambda: logger(record(2, {"ce[1]": 1.0})))
    assert path.read_bytes() == before and logger._last_step == 3 and len(logger._fields) == 3
    logger(record(4))  # appended under the header the file has
    assert all(len(r) == 3 for r in rows(path)) and [r[0] for r in rows(path)] == ["iteration", "1", "2", "3", "4"]
    logger.close()
    # the file deleted, and its restart fails (the folder made read-only): no warning that it starts
    # again, the columns not widened; the next record starts it once it can
    path = tmp_path / "gone" / "log.csv"
    logger = mw.CSVLogger(path)
    logger(record(1))
    path.unlink()
    with monkeypatch.context() as m:
        m.setattr(_logging.CSVLogger, "_rewrite", lambda *a: _disk_full())
        got = heard(lambda: logger(record(2, {"ce[1]": 1.0})))
    assert not any("starts again" in w for w in got) and any("could not write iteration 2" in w for w in got)
    assert len(logger._fields) == 3 and logger._last_step == 1
    assert any("starts again at iteration 3" in w for w in heard(lambda: logger(record(3))))
    assert [r[0] for r in rows(path)] == ["iteration", "3"]
    logger.close()


def test_a_failed_divert_keeps_the_path(tmp_path, monkeypatch):
    path = tmp_path / "run.csv"
    first = mw.CSVLogger(path)
    for i in (1, 2):
        first(record(i))
    first.close()
    logger = mw.CSVLogger(path)
    with monkeypatch.context() as m:
        m.setattr(_logging.CSVLogger, "_rewrite", lambda *a: _disk_full())
        got = heard(lambda: logger(record(1)))  # a new run: would go to run-2.csv, but the write fails
    assert not any("left as it is" in w for w in got) and logger.path == path
    assert _logging._holder(tmp_path / "run-2.csv") is None and not (tmp_path / "run-2.csv").exists()
    assert any("run-2.csv" in w for w in heard(lambda: logger(record(1))))
    assert logger.path == tmp_path / "run-2.csv"
    logger.close()


def test_a_torn_append_is_dropped_before_the_next_row(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    logger = mw.CSVLogger(path)
    logger(record(1))

    def half(self, fields, row):
        with self.path.open("a", newline="") as f:
            f.write("2,2,0.")  # what the disk took before it was full
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(_logging.CSVLogger, "_append", half)
        heard(lambda: logger(record(2)))
    with pytest.warns(RuntimeWarning, match=rf"The last line of the log {path}, '2,2,0\.', has no newline.*dropped"):
        logger(record(3))
    assert rows(path) == [["iteration", "meta_step", "gamma/ce[1]"], ["1", "1", "0.5"], ["3", "3", "0.5"]]
    logger(record(4))  # and appended again after the repair
    assert [r[0] for r in rows(path)] == ["iteration", "1", "3", "4"]
    logger.close()


def test_a_resumed_run_with_a_new_column_widens_as_the_same_record_mid_run_does(tmp_path):
    mid_run, resumed = tmp_path / "mid.csv", tmp_path / "resumed.csv"
    a = mw.CSVLogger(mid_run)
    for i in (1, 2, 3):
        a(record(i))
    b = mw.CSVLogger(resumed)
    for i in (1, 2, 3):
        b(record(i))
    b.close()
    b = mw.CSVLogger(resumed)
    assert heard(lambda: a(record(4, {"ce[1]": 1.0}))) == []
    assert heard(lambda: b(record(4, {"ce[1]": 1.0}))) == []
    assert b.path == resumed and sorted(os.listdir(tmp_path)) == ["mid.csv", "resumed.csv"]
    assert rows(resumed) == rows(mid_run) and rows(resumed)[-1] == ["4", "4", "0.5", "1.0"]
    assert rows(resumed)[1] == ["1", "1", "0.5", ""]
    # other loss terms (its gamma columns differ): another run, kept apart, warned
    b.close()
    c = mw.CSVLogger(resumed)
    assert any("other loss terms" in w for w in heard(lambda: c(record(5, gamma={"kd[2->1]": 1.0}))))
    assert c.path == tmp_path / "resumed-2.csv"
    c.close()
    a.close()


def test_a_link_into_a_missing_folder_is_refused_when_made(tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "nowhere" / "log.csv")
    with pytest.raises(ValueError, match=r"symbolic link to .*nowhere.*does not exist.*Create that folder"):
        mw.CSVLogger(link)
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()
    (tmp_path / "nowhere").mkdir()  # the fix the message names
    logger = mw.CSVLogger(link)
    assert heard(lambda: logger(record(1))) == []
    assert link.is_symlink() and [r[0] for r in rows(tmp_path / "nowhere" / "log.csv")] == ["iteration", "1"]
    logger.close()


def test_a_first_record_that_drops_rows_says_how_many_and_how_to_keep_them(tmp_path):
    path = tmp_path / "b.csv"
    old = mw.CSVLogger(path)
    for i in range(1, 6):
        old(record(i))
    old.close()
    new = mw.CSVLogger(path)
    got = heard(lambda: new(record(3)))
    assert len(got) == 1
    assert "the 3 rows of iterations 3 to 5" in got[0] and "a path of its own" in got[0]
    assert [r[0] for r in rows(path)] == ["iteration", "1", "2", "3"]  # the documented rule: a resume
    assert heard(lambda: new(record(4))) == []  # said once, at the first record
    new.close()
    # a resume past every row drops nothing and says nothing
    again = mw.CSVLogger(path)
    assert heard(lambda: again(record(5))) == []
    again.close()


def _event_files(folder):
    return sorted(f for f in os.listdir(folder) if "tfevents" in f)


def test_a_closed_tensorboard_logger_never_writes_into_a_folder_another_holds(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    a(record(1))
    a.close()
    b = mw.TensorBoardLogger(folder, overwrite=True)  # the folder is free now
    b(record(1))
    files = _event_files(folder)
    got = heard(lambda: a(record(2)))  # as a weighter still holding it would
    assert any("was closed and another logger now writes" in w and "iteration 2" in w for w in got)
    assert _event_files(folder) == files  # no second writer on b's folder
    with pytest.raises(RuntimeError, match="was closed and another logger"):
        a.writer
    b.close()
    a(record(3))  # free again: taken back, with a writer of its own
    a.writer.flush()
    assert len(_event_files(folder)) == len(files) + 1
    a.close()


def test_the_writer_of_a_folder_is_never_made_on_another_rank(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(_logging, "other_rank", lambda: 1)
    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    with pytest.raises(RuntimeError, match="rank 0 only, and this is rank 1"):
        logger.writer
    logger(record(1))
    assert not folder.exists()  # nothing created on rank 1, by a record or by .writer
    logger.close()
    every = mw.TensorBoardLogger(folder, all_ranks=True)
    assert every.writer is not None and folder.is_dir()  # asked for on every rank: made
    every.close()


# fourth review: a resumed run never cuts another run's log; blank lines and binary files


def _steps(path):
    return [r[0] for r in rows(path)[1:] if r]


def test_a_diverted_run_resumed_on_the_old_path_continues_its_own_log(tmp_path):
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    for i in range(1, 4):  # run A: 1-3
        a(record(i))
    a.close()
    b = mw.CSVLogger(path)
    assert any("log-2.csv" in m for m in heard(lambda: [b(record(i)) for i in range(1, 6)]))  # run B: diverted
    b.close()
    b2 = mw.CSVLogger(path)  # run B resumed from its checkpoint at 5, with the same code
    said = heard(lambda: (b2(record(6)), b2(record(7))))
    assert _steps(path) == ["1", "2", "3"]  # A's log whole
    assert _steps(tmp_path / "log-2.csv") == [str(i) for i in range(1, 8)]  # B's log whole, in one file
    assert b2.path == tmp_path / "log-2.csv" and len(said) == 1 and "log-2.csv" in said[0]


def test_a_first_record_that_two_logs_could_take_goes_to_a_log_of_its_own(tmp_path):
    """Run A logs 1-10, a new run B is diverted to log-2 (1-3); a run starting at 4 may be B continued or
    A resumed from its checkpoint at 3: it is written into neither (issue 22: A's rows went into B's log)."""
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    for i in range(1, 11):  # run A: 1-10
        a(record(i))
    a.close()
    b = mw.CSVLogger(path)
    heard(lambda: [b(record(i)) for i in (1, 2, 3)])  # run B: diverted to log-2.csv
    b.close()
    c = mw.CSVLogger(path)
    said = heard(lambda: (c(record(4)), c(record(5))))
    assert _steps(path) == [str(i) for i in range(1, 11)] and _steps(tmp_path / "log-2.csv") == ["1", "2", "3"]
    assert c.path == tmp_path / "log-3.csv" and _steps(c.path) == ["4", "5"]
    assert len(said) == 1 and "log.csv (iterations 1 to 10" in said[0] and "log-2.csv (iterations 1 to 3" in said[0]
    c.close()
    a2 = mw.CSVLogger(path)  # run A resumed at 11: only its own log leads there, no warning
    assert heard(lambda: a2(record(11))) == [] and _steps(path)[-1] == "11" and a2.path == path
    a2.close()
    a3 = mw.CSVLogger(path)  # run A resumed at 9 (no other log leads there): A's 9-11 are undone
    said = heard(lambda: a3(record(9)))
    assert a3.path == path and _steps(path) == [str(i) for i in range(1, 10)] and "3 rows" in said[0]
    assert _steps(tmp_path / "log-2.csv") == ["1", "2", "3"]


def test_a_log_of_one_row_may_lead_to_any_later_record_so_no_other_log_is_cut(tmp_path):
    """meta_every=5: run A logs 1, 6, ..., 96; run B (same path) is diverted to log-2.csv, logs 1 and
    resumes at 6. One row tells no stride: log-2 may lead to 6, so A's log (resumable at 6) is not the
    only candidate and neither is touched (issue 22 review: A's rows 6-96 were dropped, B's went in)."""
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    for i in range(1, 100, 5):
        a(record(i))
    a.close()
    b = mw.CSVLogger(path)
    heard(lambda: b(record(1)))  # run B: diverted to log-2.csv
    b.close()
    b2 = mw.CSVLogger(path)
    said = heard(lambda: (b2(record(6)), b2(record(11))))
    assert _steps(path) == [str(i) for i in range(1, 100, 5)]  # A's log whole
    assert _steps(tmp_path / "log-2.csv") == ["1"] and b2.path == tmp_path / "log-3.csv"
    assert _steps(b2.path) == ["6", "11"] and len(said) == 1 and "log-2.csv (iterations 1 to 1" in said[0]


def test_a_tensorboard_folder_of_one_step_may_lead_to_any_later_record_so_no_other_folder_is_hidden(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    for i in range(1, 100, 5):
        a(record(i))
    a.close()
    time.sleep(1.1)  # (event files are ordered by the second they were opened)
    b = mw.TensorBoardLogger(folder)
    heard(lambda: b(record(1)))
    b.close()
    time.sleep(1.1)
    b2 = mw.TensorBoardLogger(folder)
    heard(lambda: (b2(record(6)), b2(record(11))))
    b2.close()
    assert _shown(folder) == list(range(1, 100, 5)) and _shown(tmp_path / "tb-2") == [1]
    assert _shown(tmp_path / "tb-3") == [6, 11]


def test_a_first_record_inside_two_logs_cuts_neither(tmp_path):
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    [a(record(i)) for i in range(1, 11)]
    a.close()
    b = mw.CSVLogger(path)
    heard(lambda: [b(record(i)) for i in range(1, 8)])  # B in log-2.csv: 1-7
    b.close()
    c = mw.CSVLogger(path)  # resumed at 6: A's or B's? neither is cut
    said = heard(lambda: c(record(6)))
    assert _steps(path) == [str(i) for i in range(1, 11)]
    assert _steps(tmp_path / "log-2.csv") == [str(i) for i in range(1, 8)]
    assert c.path == tmp_path / "log-3.csv" and _steps(c.path) == ["6"]
    assert len(said) == 1 and "none is cut" in said[0]


def test_a_blank_line_neither_makes_a_new_run_a_resume_nor_stays_in_a_rewrite(tmp_path):
    path = tmp_path / "log.csv"
    a = mw.CSVLogger(path)
    [a(record(i)) for i in range(1, 6)]
    a.close()
    with open(path, "a") as f:
        f.write("\n")
    b = mw.CSVLogger(path)
    said = heard(lambda: b(record(1)))  # a new run: diverted, the old log kept whole
    assert b.path == tmp_path / "log-2.csv" and _steps(path) == ["1", "2", "3", "4", "5"] and len(said) == 1
    path = tmp_path / "other" / "log.csv"
    a = mw.CSVLogger(path)
    [a(record(i)) for i in range(1, 6)]
    a.close()
    with open(path, "a") as f:
        f.write("\n")
    c = mw.CSVLogger(path)  # resumed at 4: 4-5 dropped, the rewrite has no blank line
    heard(lambda: c(record(4)))
    assert c.path == path and [r[0] for r in rows(path)] == ["iteration", "1", "2", "3", "4"]


def test_a_file_that_is_not_text_is_refused_as_not_a_log(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match="not text.*not a metaweight log.*another path"):
        mw.CSVLogger(path)
    assert path.read_bytes() == b"\x89PNG\r\n\x1a\n\x00\x00"
    mw.CSVLogger(path, overwrite=True)(record(1))
    assert _steps(path) == ["1"]


def test_a_tensorboard_writer_asked_for_before_the_first_record_keeps_an_old_run_apart(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 6)]
    a.close()
    before = _shown(folder)
    b = mw.TensorBoardLogger(folder)
    said = heard(lambda: b.writer.add_text("note", "run B"))
    heard(lambda: (b(record(1)), b(record(2))))
    b.close()
    assert b.log_dir == str(tmp_path / "tb-2") and len(said) == 1 and "before its first record" in said[0]
    assert _shown(folder) == before == [1, 2, 3, 4, 5]
    c = mw.TensorBoardLogger(tmp_path / "fresh")  # an empty folder: the writer is made there, no warning
    assert heard(lambda: c.writer) == [] and c.log_dir == str(tmp_path / "fresh")
    c.close()


def _shown(folder):
    """The steps TensorBoard shows for a run's folder (purged points left out), in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars("metaweight/gamma/ce[1]")]


def test_a_diverted_tensorboard_run_resumed_on_the_old_folder_continues_its_own_folder(tmp_path):
    """As the CSVLogger's test above: run B, diverted to tb-2, resumed with the folder tb, continues tb-2
    and never hides run A's points."""
    pytest.importorskip("tensorboard")
    import time

    folder, other = tmp_path / "tb", tmp_path / "tb-2"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 4)]  # run A: 1-3
    a.close()
    b = mw.TensorBoardLogger(folder)
    assert any("tb-2" in m for m in heard(lambda: [b(record(i)) for i in range(1, 6)]))  # run B: diverted
    b.close()
    time.sleep(1.1)  # event files are named by the second they were opened: keep them in order
    b2 = mw.TensorBoardLogger(folder)  # run B resumed from its checkpoint at 5, with the same code
    said = heard(lambda: (b2(record(6)), b2(record(7))))
    b2.close()
    assert _shown(folder) == [1, 2, 3]  # A's points all shown
    assert _shown(other) == list(range(1, 8))  # B's run whole, in its own folder
    assert b2.log_dir == str(other) and len(said) == 1 and "tb-2" in said[0]


def test_a_first_tensorboard_record_that_two_folders_could_take_goes_to_a_folder_of_its_own(tmp_path):
    """As CSVLogger: after A's 1-10 in tb and B's 1-3 diverted to tb-2, a run at 4 goes to neither."""
    pytest.importorskip("tensorboard")
    import time

    folder, other = tmp_path / "tb", tmp_path / "tb-2"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 11)]  # run A: 1-10
    a.close()
    b = mw.TensorBoardLogger(folder)
    heard(lambda: [b(record(i)) for i in (1, 2, 3)])  # run B: diverted to tb-2
    b.close()
    time.sleep(1.1)
    c = mw.TensorBoardLogger(folder)
    said = heard(lambda: (c(record(4)), c(record(5))))
    c.close()
    assert _shown(folder) == list(range(1, 11)) and _shown(other) == [1, 2, 3]
    assert c.log_dir == str(tmp_path / "tb-3") and _shown(c.log_dir) == [4, 5]
    assert len(said) == 1 and "tb (steps 1 to 10" in said[0] and "tb-2 (steps 1 to 3" in said[0]
    time.sleep(1.1)
    a2 = mw.TensorBoardLogger(folder)  # run A resumed at 11: its own folder, no warning
    assert heard(lambda: a2(record(11))) == [] and a2.log_dir == str(folder)
    a2.close()
    time.sleep(1.1)
    a3 = mw.TensorBoardLogger(folder)  # run A resumed at 9: A's 9-11 hidden, with a warning saying so
    said = heard(lambda: a3(record(9)))
    a3.close()
    assert a3.log_dir == str(folder) and _shown(folder) == list(range(1, 10)) and _shown(other) == [1, 2, 3]
    assert len(said) == 1 and "3 steps 9 to 11" in said[0] and "no event file is deleted" in said[0]


def test_a_tensorboard_resume_says_what_it_hides_as_csv_says_what_it_drops(tmp_path):
    pytest.importorskip("tensorboard")
    import time

    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 6)]
    a.close()
    time.sleep(1.1)
    b = mw.TensorBoardLogger(folder)  # resumed from its checkpoint at 2: 3-5 undone
    said = heard(lambda: (b(record(3)), b(record(4))))
    b.close()
    assert _shown(folder) == [1, 2, 3, 4] and b.log_dir == str(folder)
    assert len(said) == 1 and "3 steps 3 to 5" in said[0] and "no event file is deleted" in said[0]


def test_a_tensorboard_prefix_changed_on_resume_is_named_as_what_differs(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 4)]
    a.close()
    b = mw.TensorBoardLogger(folder, prefix="mw/")
    said = heard(lambda: b(record(4)))
    b.close()
    assert b.log_dir == str(tmp_path / "tb-2") and len(said) == 1
    assert "prefix 'metaweight/'" in said[0] and "'mw/'" in said[0] and "[]" not in said[0]


def test_a_first_tensorboard_record_inside_two_runs_hides_neither(tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    a = mw.TensorBoardLogger(folder)
    [a(record(i)) for i in range(1, 11)]
    a.close()
    b = mw.TensorBoardLogger(folder)
    heard(lambda: [b(record(i)) for i in range(1, 8)])  # B in tb-2: 1-7
    b.close()
    c = mw.TensorBoardLogger(folder)  # resumed at 6: A's or B's? neither is hidden
    said = heard(lambda: c(record(6)))
    c.close()
    assert _shown(folder) == list(range(1, 11)) and _shown(tmp_path / "tb-2") == list(range(1, 8))
    assert c.log_dir == str(tmp_path / "tb-3") and _shown(c.log_dir) == [6]
    assert len(said) == 1 and "none is hidden" in said[0]


def test_a_tensorboard_logger_handed_to_a_new_run_keeps_the_old_one_apart_as_csv_does(tmp_path):
    """As CSVLogger: a logger reused by a new weighter counting from 1 again goes to NAME-2 with a warning
    (it would hide the whole first run); one rolled back to a checkpoint hides only the undone steps."""
    pytest.importorskip("tensorboard")
    import time

    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    [logger(record(i)) for i in range(1, 6)]
    said = heard(lambda: [logger(record(i)) for i in (1, 2)])  # a new run, same logger
    assert len(said) == 1 and "new run" in said[0] and logger.log_dir == str(tmp_path / "tb-2")
    time.sleep(1.1)
    logger(record(3))
    said = heard(lambda: logger(record(2)))  # rolled back to the checkpoint at 1: step 2 again, 3 undone
    logger.close()
    assert len(said) == 1 and "rolled back" in said[0] and "2 steps 2 to 3" in said[0]
    assert _shown(folder) == [1, 2, 3, 4, 5] and _shown(tmp_path / "tb-2") == [1, 2]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_logger_reused_after_close_goes_back_by_the_same_rule_as_without_close(tmp_path, kind):
    """close() in between changes nothing of the "went back" rule: the same logger handed to a new run
    (counting from 1 again) keeps the old run whole and goes to NAME-2 with a warning; one rolled back to a
    checkpoint after close() drops (hides) only the undone steps, and says which."""
    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
        import time

        folder = tmp_path / "tb"
        make, shown, where = mw.TensorBoardLogger, _shown, (lambda logger: logger.log_dir)
    else:
        import time

        folder = tmp_path / "tb.csv"
        make, where = mw.CSVLogger, (lambda logger: str(logger.path))
        shown = lambda path: [int(s) for s in _steps(path)]  # noqa: E731
    logger = make(folder)
    [logger(record(i)) for i in range(1, 6)]
    logger.close()
    time.sleep(1.1)  # event files are named by the second they were opened: keep them in order
    said = heard(lambda: [logger(record(i)) for i in (1, 2)])  # a new run, same logger, after close()
    logger.close()
    new = tmp_path / ("tb-2" if kind == "tensorboard" else "tb-2.csv")
    assert len(said) == 1 and "new run" in said[0] and where(logger) == str(new)
    assert shown(folder) == [1, 2, 3, 4, 5] and shown(new) == [1, 2]
    rolled = make(tmp_path / ("r" if kind == "tensorboard" else "r.csv"))
    [rolled(record(i)) for i in range(1, 6)]
    rolled.close()
    time.sleep(1.1)
    said = heard(lambda: rolled(record(3)))  # rolled back to the checkpoint at 2: 3-5 undone
    rolled.close()
    assert len(said) == 1 and "rolled back" in said[0]
    assert ("rows of iterations 3 to 5" if kind == "csv" else "3 steps 3 to 5") in said[0], said[0]
    assert shown(where(rolled)) == [1, 2, 3] and where(rolled).endswith(("r", "r.csv"))


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_rollback_in_the_same_process_says_which_rows_it_drops(tmp_path, kind):
    """A weighter rolled back to a checkpoint in this process logs an iteration at or before the last
    one logged: the later rows (points) were undone and go, as before, but no longer silently: one
    warning names the file and the iterations dropped (first to last, how many), given once the row
    is written; the rows kept are read back independently (csv, TensorBoard's own EventAccumulator)."""
    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
        where = tmp_path / "tb"
        logger = mw.TensorBoardLogger(where)
        shown = lambda: _shown(where)  # noqa: E731
        said_dropped = "the points of its 3 steps 3 to 5 (undone) are hidden"
    else:
        where = tmp_path / "log.csv"
        logger = mw.CSVLogger(where)
        shown = lambda: [int(r[0]) for r in rows(where)[1:]]  # noqa: E731
        said_dropped = "the 3 rows of iterations 3 to 5 (undone) were dropped"
    assert heard(lambda: [logger(record(i)) for i in range(1, 6)]) == []
    said = heard(lambda: logger(record(3)))  # rolled back to the checkpoint at 2: 3, 4, 5 undone
    assert len(said) == 1, said
    assert str(where) in said[0] and "rolled back" in said[0] and said_dropped in said[0], said[0]
    assert heard(lambda: logger(record(4))) == []  # going on from there: appended, nothing to say
    logger.close()
    assert shown() == [1, 2, 3, 4]


def test_a_last_row_without_its_newline_is_kept_if_complete_and_dropped_with_a_warning_if_torn(tmp_path):
    """``1,1,0.5`` without its newline (a hand edit, another tool) was dropped silently at the next
    record, and a torn ``6,6,0.`` too: a complete row is kept now (its newline added), a torn one is
    dropped with a warning naming the file and the text, at a first record (a resume) as at a later one."""
    for last, kept in (("3,3,0.5", True), ("3,3,1e-05", True), ("3,3,0.", False), ("3,3,1e-0", False),
                       ("3,3", False), ("3,", False)):
        path = tmp_path / f"log{len(list(tmp_path.iterdir()))}.csv"
        path.write_text("iteration,meta_step,gamma/ce[1]\r\n1,1,0.5\r\n2,2,0.5\r\n" + last, newline="")
        logger = mw.CSVLogger(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logger(record(4))
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert [r[0] for r in rows(path)] == ["iteration", "1", "2", *(["3"] if kept else []), "4"], last
        if kept:
            assert rows(path)[3] == last.split(",") and said == [], last
        else:
            assert len(said) == 1 and f"The last line of the log {path}, {last!r}, has no newline" in said[0], said
        logger.close()
    path = tmp_path / "lone.csv"  # a log torn in its very first write: its header cut short
    path.write_text("iteration,met", newline="")
    logger = mw.CSVLogger(path)
    with pytest.warns(RuntimeWarning, match="'iteration,met', has no newline"):
        logger(record(1))
    assert rows(path) == [["iteration", "meta_step", "gamma/ce[1]"], ["1", "1", "0.5"]]
    logger.close()
    other = tmp_path / "notes.csv"  # a file of another kind, one line without its newline: refused, kept whole
    other.write_text("name,score", newline="")
    with pytest.raises(ValueError, match="not a metaweight log"):
        mw.CSVLogger(other)
    assert other.read_text() == "name,score"


def _tb_steps(folder, tag="metaweight/gamma/ce[1]"):
    """The steps TensorBoard itself shows for ``tag`` (its own reader, purge rule and all)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [e.step for e in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []


def test_a_tensorboard_folder_deleted_mid_run_starts_again_as_a_csv_log_does(tmp_path, monkeypatch):
    """``rm -rf`` of a TensorBoardLogger's folder mid-run lost every later point (the writer's thread died
    on it with a traceback, later records warned a raw FileNotFoundError) and ``close()`` raised that raw
    error at every call. Now, as CSVLogger recreates a deleted log: a new writer starts the folder again
    at the next record, with one warning that the earlier points are not in it; close() never raises and
    does nothing the second time."""
    pytest.importorskip("tensorboard")
    import shutil
    import threading

    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    for i in (1, 2, 3):
        logger(record(i))
    logger.close()
    logger(record(4))  # a second writer, as after a resume in this process
    shutil.rmtree(folder)
    said = heard(lambda: logger(record(5)))
    assert len(said) == 1 and f"the folder {folder} was deleted: it starts again at step 5" in said[0], said
    assert heard(lambda: logger(record(6))) == [] and heard(lambda: logger(record(7))) == []
    assert heard(logger.close) == [] and heard(logger.close) == []
    assert _tb_steps(folder) == [5, 6, 7] and died == []

    other = mw.TensorBoardLogger(tmp_path / "tb2")  # a writer that fails to close: warned, never raised
    other(record(1))

    def fails():
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(other._writer, "close", fails)
    shutil.rmtree(tmp_path / "tb2")
    said = heard(other.close)
    assert len(said) == 1 and "could not be closed (FileNotFoundError" in said[0] and "was deleted" in said[0], said
    assert heard(other.close) == []


def test_a_tensorboard_write_that_failed_once_does_not_lose_every_later_point(tmp_path, monkeypatch):
    """A failed write (the folder read-only for a while, a full disk) kills the SummaryWriter's thread, and
    the logger kept that writer: every later record failed on it, with a warning each, though the folder
    was writable again (CSVLogger wrote on). Now the failed writer is dropped and the next record opens a
    new one; a writer the user gave is theirs and is kept."""
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    for i in (1, 2, 3):
        logger(record(i))
    broken = logger._writer

    def refused(*args, **kwargs):  # as a writer whose thread died on a refused write: every call fails
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(broken, "add_scalar", refused)
    monkeypatch.setattr(broken, "flush", refused)
    said = heard(lambda: logger(record(4)))
    assert len(said) == 1 and "could not write iteration 4 (PermissionError" in said[0], said
    assert heard(lambda: logger(record(5))) == [] and heard(lambda: logger(record(6))) == []
    assert logger._writer is not broken
    logger.close()
    assert _tb_steps(folder) == [1, 2, 3, 5, 6]

    class Given:
        def __init__(self):
            self.points, self.fail = [], True

        def add_scalar(self, tag, value, step):
            if self.fail:
                self.fail = False
                raise OSError(28, "No space left on device")
            self.points.append(step)

    given = Given()
    theirs = mw.TensorBoardLogger(given)
    assert len(heard(lambda: theirs(record(1)))) == 1
    assert heard(lambda: theirs(record(2))) == [] and theirs._writer is given and 2 in given.points


def test_a_csv_folder_deleted_mid_run_is_made_again_as_a_tensorboard_one_is(tmp_path):
    """``rm -rf`` of a CSVLogger's folder mid-run dropped every later row ("its folder is gone", one
    warning per row) where TensorBoardLogger starts its folder again. Now the folder and the file (with
    its header) are made again at the next record, with one warning that the earlier rows are not in it."""
    import shutil

    folder = tmp_path / "sub"
    logger = mw.CSVLogger(folder / "log.csv")
    for i in (1, 2):
        logger(record(i))
    shutil.rmtree(folder)
    said = heard(lambda: logger(record(3)))
    assert len(said) == 1 and f"The folder {folder} of the log {folder / 'log.csv'} was deleted" in said[0] \
        and "starts again at iteration 3" in said[0] and "the rows before are not in it" in said[0], said
    assert heard(lambda: logger(record(4))) == []
    table = list(csv.DictReader(open(folder / "log.csv", newline="")))
    assert [r["iteration"] for r in table] == ["3", "4"]
    logger.close()


def test_relative_paths_are_fixed_at_construction_so_a_chdir_does_not_move_the_log(tmp_path, monkeypatch):
    """A relative CSVLogger path read again after ``os.chdir`` split the log in two folders (with a false
    "deleted" warning) and left the first path held after close(); a relative TensorBoardLogger folder
    split the same way. Now every user path is made absolute when the logger is built."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    tensorboard = _has_tensorboard()
    csv_logger, tb_logger = mw.CSVLogger("log.csv"), mw.TensorBoardLogger("tb") if tensorboard else None
    for i in (1, 2):
        csv_logger(record(i))
        if tensorboard:
            tb_logger(record(i))
    monkeypatch.chdir(tmp_path / "b")
    assert heard(lambda: csv_logger(record(3))) == []
    if tensorboard:
        assert heard(lambda: tb_logger(record(3))) == []
        tb_logger.close()
        assert _tb_steps(tmp_path / "a" / "tb") == [1, 2, 3] and not (tmp_path / "b" / "tb").exists()
    assert csv_logger.path == tmp_path / "a" / "log.csv" and not (tmp_path / "b" / "log.csv").exists()
    assert [r["iteration"] for r in csv.DictReader(open(tmp_path / "a" / "log.csv", newline=""))] == ["1", "2", "3"]
    csv_logger.close()
    mw.CSVLogger(tmp_path / "a" / "log.csv").close()  # the path was given up, not held under its relative name


class _PathLike:
    """An ``os.PathLike`` that is not a ``Path`` (as pytest's ``tmpdir`` is)."""

    def __init__(self, path):
        self.path = str(path)

    def __fspath__(self):
        return self.path


def test_any_os_pathlike_is_a_path(tmp_path):
    """CSVLogger refused an os.PathLike that save_checkpoint took (TypeError "str or Path"), and
    TensorBoardLogger took it for a writer; every path argument now goes through one reader."""
    logger = mw.CSVLogger(_PathLike(tmp_path / "log.csv"))
    logger(record(1))
    assert logger.path == tmp_path / "log.csv" and (tmp_path / "log.csv").is_file()
    logger.close()
    if _has_tensorboard():
        tb = mw.TensorBoardLogger(_PathLike(tmp_path / "tb"))
        tb(record(1))
        tb.close()
        assert _tb_steps(tmp_path / "tb") == [1]
    for bad in (3, "", _PathLike(""), b"log.csv"):
        with pytest.raises(TypeError, match=r"`path` should be a file path \(a non-empty str, Path or other "
                                            r"os\.PathLike\)\. Found"):
            mw.CSVLogger(bad)


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_tensorboard_warnings_count_only_the_points_tensorboard_shows(tmp_path):
    """A folder logged at 1-10, resumed at 4 (hiding 4-10) and logged to 5: a second resume at 6 was told
    it hid "5 steps 6 to 10" (hidden already), and a new run was told the folder "holds a run logged at
    steps 1 to 10", because the old points were counted though TensorBoard no longer shows them. The
    folder's points are now read with TensorBoard's purge rule, checked against TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    tag = "metaweight/gamma/ce[1]"
    for second, expected in ((6, None), (1, "holds a run logged at steps 1 to 5,")):
        folder = tmp_path / f"tb{second}"
        first = mw.TensorBoardLogger(folder)
        for i in range(1, 11):
            first(record(i))
        first.close()
        resumed = mw.TensorBoardLogger(folder)
        said = heard(lambda: resumed(record(4)))
        assert len(said) == 1 and "7 steps 4 to 10" in said[0], said
        resumed(record(5))
        resumed.close()
        shown = _tb_steps(folder)
        assert shown == [1, 2, 3, 4, 5]
        assert sorted(s for s, t in _logging._logged_events(folder) if t == tag) == shown
        again = mw.TensorBoardLogger(folder)
        said = heard(lambda: again(record(second)))
        if expected is None:  # continues the folder, hiding nothing
            assert said == [] and again.log_dir == str(folder), said
        else:  # a new run, diverted; the folder said to hold what it shows
            assert len(said) == 1 and expected in said[0] and again.log_dir == str(folder) + "-2", said
        again.close()


def _weighter_logging_to(path):
    import torch
    from torch import nn

    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    return mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                 callbacks=[mw.CSVLogger(path)])


def test_a_notebook_cell_run_again_is_told_exactly_how_to_free_its_log(tmp_path):
    """``w = HarmonizedWeighter(..., callbacks=[CSVLogger("nb.csv")])`` run twice: the old weighter, still
    bound to ``w`` while the line runs, holds the old logger, and the refusal said only "use that logger,
    call its close() (or drop the weighter holding it)". It now says how to reach it, and each way out it
    gives works; two live writers on one file stay refused."""
    import gc

    import torch

    path = tmp_path / "nb.csv"
    w = _weighter_logging_to(path)
    with pytest.raises(ValueError) as info:
        w = _weighter_logging_to(path)
    said = str(info.value)
    assert "notebook cell run again" in said and "`for c in w.callbacks: c.close()`" in said and "`del w`" in said
    for c in w.callbacks:  # the first way out, as said
        c.close()
    old, w = w, _weighter_logging_to(path)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    w.step(batch, batch)
    said = heard(lambda: old.step(batch, batch))  # the old weighter's record is skipped, not written twice
    assert any("was closed and another logger now writes to" in s for s in said), said
    assert [r[0] for r in rows(path)] == ["iteration", "1"]
    del old, w  # the second way out, as said
    gc.collect()
    w = _weighter_logging_to(path)
    for c in w.callbacks:
        c.close()


def test_a_hook_writing_through_the_tensorboard_logger_s_writer_resumes_in_its_folder(tmp_path):
    """A hook listed after a TensorBoardLogger that logs the training loss through ``logger.writer`` (as the
    logger's docstring tells): a run resumed from its checkpoint continues the folder, hiding the steps undone.
    When the library's loggers were called after every other hook (helper-153), the hook asked for the writer
    before the logger's first record, and the resumed run was diverted to ``tb-2``."""
    pytest.importorskip("tensorboard")
    import copy

    import torch

    from metaweight._logging import _logged_events

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(6)]

    def setup():
        torch.manual_seed(0)
        model = mw.MultiExit([torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh()),
                              torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())],
                             [torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logger = mw.TensorBoardLogger(tmp_path / "tb")
        own = lambda r: logger.writer.add_scalar("train/loss", r["loss"], r["iteration"])  # noqa: E731
        return model, opt, logger, mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), callbacks=[logger, own])

    model, opt, logger, w = setup()
    for i in range(5):
        w.step(batches[i], batches[5])
        if i == 2:
            saved = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "w": w.state_dict()})
    logger.close()
    model, opt, logger, w = setup()
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    w.load_state_dict(saved["w"])
    with pytest.warns(RuntimeWarning, match="taken for a run resumed from its checkpoint"):
        for i in range(3, 5):
            w.step(batches[i], batches[5])
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]
    assert sorted({s for s, t in _logged_events(tmp_path / "tb") if t == "train/loss"}) == [1, 2, 3, 4, 5]


class _RaiseAt:
    """A user's meta-step hook that raises once, at the record of iteration ``at``."""

    def __init__(self, at):
        self.at = at

    def __call__(self, record):
        if record.iteration == self.at:
            self.at = None
            raise RuntimeError("the user's hook failed")


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("restart", ["resume", "rollback"])
@pytest.mark.parametrize("method,unlogged", [("hdkd", "skipped"), ("hdkd", "hook before the logger"),
                                             ("hdkd", "logger before the hook"), ("uw", "hook before the logger"),
                                             ("uw", "logger before the hook")])
def test_a_log_holds_no_entry_of_a_step_undone_whatever_the_first_record_after_it(tmp_path, kind, restart, method,
                                                                               unlogged):
    """A run logs iterations 1-8 and is restarted from its checkpoint at iteration 4 (a new process resuming,
    or a rollback in the same one); the first meta step after it (iteration 5) is not logged as it stands:
    skipped as not finite (``nonfinite="skip"``), or put back by a user's hook that raised, listed before or
    after the logger. Iteration 5's row of the undone run was kept (the logger cut the log at the first record
    it got, 6): a row of a step no history holds, its gamma another run's. The log must hold exactly the
    meta steps that stand, each with the gamma its record reports: 1-4 of the first run, then those kept
    after the restart (read back independently: csv, TensorBoard's own EventAccumulator)."""
    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(12)]

    def build(hooks=()):
        torch.manual_seed(0)
        net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        logger = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
        make = mw.HarmonizedWeighter if method == "hdkd" else mw.UW
        weighter = make(net, optimizer, mw.DenseDistillLoss(2), nonfinite="skip", callbacks=[*hooks, logger][
            ::-1 if unlogged == "logger before the hook" else 1])
        return net, optimizer, weighter, logger

    def state(net, optimizer, weighter):
        return {k: torch.load(_io(torch.save, v), weights_only=False)
                for k, v in {"net": net.state_dict(), "opt": optimizer.state_dict(),
                             "w": weighter.state_dict()}.items()}

    net, optimizer, weighter, logger = build()
    stood = {}  # iteration -> gamma of the meta steps that stand
    for i in range(8):
        stood[i + 1] = weighter.step(batches[i], batches[i + 1]).gamma
        if i == 3:
            checkpoint = state(net, optimizer, weighter)
    stood = {k: v for k, v in stood.items() if k <= 4}
    if restart == "resume":
        logger.close()
        del weighter
        hook = _RaiseAt(5) if unlogged != "skipped" else None
        net, optimizer, weighter, logger = build([hook] if hook else [])
    else:
        hook = None
        if unlogged != "skipped":
            hook = _RaiseAt(5)
            weighter.register_meta_step_hook(hook)
            if unlogged == "hook before the logger":  # (registered after it: the logger is listed again after)
                for handle_id, callback in list(weighter._hooks.items()):
                    if callback is logger:
                        weighter._hooks.move_to_end(handle_id)
    net.load_state_dict(checkpoint["net"])
    optimizer.load_state_dict(checkpoint["opt"])
    weighter.load_state_dict(checkpoint["w"])
    nan = (batches[5][0] * float("nan"), batches[5][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if unlogged == "skipped":
            assert weighter.step(batches[4], nan).skipped
        else:
            with pytest.raises(RuntimeError, match="the user's hook failed"):
                weighter.step(batches[4], batches[5])
        for i in (5, 6, 7):
            record = weighter.step(batches[i], batches[i + 1])
            assert record.ran and not record.skipped
            stood[record.iteration] = record.gamma
    logger.close()
    assert 5 not in stood and sorted(stood) == [1, 2, 3, 4, 6, 7, 8]
    if kind == "csv":
        table = rows(where)
        header, body = table[0], table[1:]
        got = {int(float(r[0])): {c[len("gamma/"):]: float(v) for c, v in zip(header, r) if c.startswith("gamma/")}
               for r in body}
        assert [int(float(r[0])) for r in body] == sorted(stood), body
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(where))
        events.Reload()
        got = {}
        for tag in events.Tags()["scalars"]:
            if tag.startswith("metaweight/gamma/"):
                for e in events.Scalars(tag):
                    got.setdefault(e.step, {})[tag[len("metaweight/gamma/"):]] = e.value
        assert sorted(got) == sorted(stood), sorted(got)
    for iteration, gamma in stood.items():
        assert got[iteration] == pytest.approx(gamma, rel=1e-6), iteration


def _io(save, value):
    import io

    buffer = io.BytesIO()
    save(value, buffer)
    buffer.seek(0)
    return buffer


def test_a_tensorboard_writer_made_again_in_the_same_second_is_read_after_the_first(tmp_path, monkeypatch):
    """TensorBoard reads a folder's event files by name, ``events.out.tfevents.SECOND.HOST.PID.N`` with ``N``
    counting the process's writers: a writer made again in the same second (a rollback) whose ``N`` has one digit
    more (9, then 10) sorted first, so its purge marker was read before the points it should hide and every
    point stayed shown. The new writer's file must be read last: the rolled-back run shows 1, 2, 3, 4."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import event_file_writer

    uids = iter(range(9, 100))
    monkeypatch.setattr(event_file_writer._global_uid, "get", lambda: next(uids))
    time.sleep(1.01 - time.time() % 1)  # (at the start of a second: both writers in it)
    folder = tmp_path / "tb"
    logger = mw.TensorBoardLogger(folder)
    [logger(record(i)) for i in range(1, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger(record(3))  # rolled back to the checkpoint at 2
    logger(record(4))
    logger.close()
    files = sorted(f.name for f in folder.glob("*tfevents*"))
    assert len(files) == 2, files  # (the file made first in the same second is not left behind)
    assert _shown(folder) == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_new_run_whose_first_meta_steps_were_skipped_keeps_an_old_log_whole(tmp_path, kind):
    """A new weighter (built, not loaded) on the path of an old run's log 1-6, whose first two meta steps are
    skipped as not finite: its first record is iteration 3, inside the old log, and was taken for that run
    resumed (rows 3-6 dropped, the old run's 1-2 kept before the new run's rows). The record says it follows
    iteration 0: a new run, diverted to a log of its own, the old one left whole."""
    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    old = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
    [old(record(i, gamma=dict.fromkeys(mw.DenseDistillLoss(2).term_names, 0.5))) for i in range(1, 7)]
    old.close()
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    logger = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                     mw.DenseDistillLoss(2), nonfinite="skip", callbacks=[logger])
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for val in [(batch[0] * float("nan"), batch[1])] * 2 + [batch]:
            weighter.step(batch, val)
    logger.close()
    new = tmp_path / ("tb-2" if kind == "tensorboard" else "log-2.csv")
    assert str(new) in " ".join(str(w.message) for w in said)
    shown = _shown if kind == "tensorboard" else (lambda path: [int(float(r[0])) for r in rows(path)[1:]])
    assert shown(where) == [1, 2, 3, 4, 5, 6] and shown(new) == [3]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("restart", ["resume", "rollback"])
def test_a_run_restored_from_a_checkpoint_before_its_first_logged_row_continues_its_log(tmp_path, kind, restart):
    """Iterations 1-2 are a warm-up with gamma fixed (``learn = False``: no meta step, no row), the checkpoint
    is saved at 2, the run logs 3-6 and is restarted from that checkpoint (a new process, or a rollback in the
    same one). Every row of the log is after the checkpoint, so every row would be dropped: that was taken for a
    new run, diverted to ``NAME-2`` while the undone rows 3-6 stayed in the log. A weighter restored from a
    checkpoint is its run resumed: the log must read 3-7, as the run without the restart's."""
    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    batch = (torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))

    def build():
        torch.manual_seed(0)
        net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
        logger = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
        return net, mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                          callbacks=[logger]), logger

    net, weighter, logger = build()
    for i in range(6):
        weighter.learn = i >= 2
        weighter.step(batch, batch)
        if i == 1:
            checkpoint = {"net": {k: v.clone() for k, v in net.state_dict().items()}, "w": weighter.state_dict()}
    if restart == "resume":
        logger.close()
        net, weighter, logger = build()
    net.load_state_dict(checkpoint["net"])
    weighter.load_state_dict(checkpoint["w"])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(5):
            weighter.step(batch, batch)
    logger.close()
    assert not [str(w.message) for w in said if "so this is a new run" in str(w.message)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [where.name]
    shown = _shown if kind == "tensorboard" else (lambda path: [int(float(r[0])) for r in rows(path)[1:]])
    assert shown(where) == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("method", ["hdkd", "uw"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_whole_object_checkpoint_of_a_weighter_and_its_logger_resumes_without_duplicate_rows(
        tmp_path, kind, method, overwrite):
    """``torch.save((net, optimizer, weighter))`` at iteration 4 (its logger pickled with it), the run goes on to
    8 and is resumed from that object. The copy of a CSVLogger remembered having written up to 4 and appended
    5-8 after the undone 5-8 (helper-156: the log read 1..8, 5..8, with no warning); a TensorBoardLogger that had
    written could not be pickled at all (its SummaryWriter's lock: TypeError), so neither could the weighter. A
    copy of either starts as a logger that has not written (an overwrite=True one continuing its log): the log
    shows 1-8 once, the resumed run's values from 5 on, read back by csv and TensorBoard's own reader."""
    import io

    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    path = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logger = (mw.TensorBoardLogger if kind == "tensorboard" else mw.CSVLogger)(path, overwrite=overwrite)
    make = mw.HarmonizedWeighter if method == "hdkd" else mw.UW
    weighter = make(net, optimizer, mw.DenseDistillLoss(2), callbacks=[logger])
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(9)]
    for i in range(4):
        weighter.step(batches[i], batches[i + 1])
    saved = io.BytesIO()
    torch.save((net, optimizer, weighter), saved)
    for i in range(4, 8):
        weighter.step(batches[i], batches[i + 1])
    weighter.callbacks[0].close()
    saved.seek(0)
    net, optimizer, weighter = torch.load(saved, weights_only=False)
    gammas = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4, 8):
            gammas[i + 1] = round(weighter.step(batches[i], batches[i + 1]).gamma["ce[1]"], 5)
    weighter.callbacks[0].close()
    shown = _points(kind, path)
    assert [s for s, _ in shown] == list(range(1, 9)), shown
    assert all(value == gammas[s] for s, value in shown if s > 4), (shown, gammas)


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_copied_weighter_whose_original_still_logs_is_told_its_logger_is_a_copy(tmp_path, kind):
    """``copy.deepcopy(weighter)`` while the original goes on: the copy's logger cannot write where the original
    does, and was told "This CSVLogger was closed", which it never was. It is told it is a copy, and how to let
    it take the log; closed, the original gives the log up and the copy writes its next row there."""
    import copy

    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    path = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    logger = (mw.TensorBoardLogger if kind == "tensorboard" else mw.CSVLogger)(path)
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     callbacks=[logger])
    batch, val = (torch.randn(8, 4), torch.randint(0, 3, (8,))), (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    weighter.step(batch, val)
    twin = copy.deepcopy(weighter)
    said = heard(lambda: twin.step(batch, val))
    assert len(said) == 1 and said[0].startswith(f"This {type(logger).__name__} is a copy") and \
        "iteration 2 was not logged by it" in said[0], said
    weighter.step(batch, val)
    logger.close()
    assert heard(lambda: twin.step(batch, val)) == []
    twin.callbacks[0].close()
    assert [s for s, _ in _points(kind, path)] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("copier", ["copy.deepcopy", "torch.save"])
def test_a_logger_copied_with_its_weighter_logs_the_copy(tmp_path, kind, copier):
    """A weighter copied whole before its first step (a checkpoint resumed): its logger, pickled without the weak
    reference to the weighter it logs, logged no weighter (helper-160). A hook listed after it that raised at the
    first meta step then had its put-back row read as a new run (the log moved to log-2.csv / tb-2), and the logger
    handed to another weighter did not tell the copy its records were no longer written (two runs in one log, each
    dropping the other's rows). The copy's logger logs the copy: the log reads as the uninterrupted run's, and
    handed over, it warns the copy as it warns the original."""
    import copy
    import io

    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]

    def run(folder, copied):
        folder.mkdir()
        where = folder / ("tb" if kind == "tensorboard" else "log.csv")
        logger = (mw.TensorBoardLogger if kind == "tensorboard" else mw.CSVLogger)(where)
        torch.manual_seed(0)
        net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        run = (net, optimizer, mw.UW(net, optimizer, mw.DenseDistillLoss(2), callbacks=[logger, _RaiseAt(1)]))
        if copied:
            if copier == "torch.save":
                buffer = io.BytesIO()
                torch.save(run, buffer)
                buffer.seek(0)
                run = torch.load(buffer, weights_only=False)
            else:
                run = copy.deepcopy(run)
            logger.close()  # (as in a fresh process: the original holds nothing)
        weighter = run[2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="the user's hook failed"):
                weighter.step(batches[0], batches[1])
            for i in range(3):
                weighter.step(batches[i], batches[i + 1])
        other = mw.DWA(run[0], run[1], mw.DenseDistillLoss(2), window=1, callbacks=[weighter.callbacks[0]])
        said = heard(lambda: weighter.step(batches[3], batches[4]))
        weighter.callbacks[0].close()
        del other
        return sorted(p.name for p in folder.iterdir()), _points(kind, where), said

    files, points, said = run(tmp_path / "uninterrupted", False)
    assert files == ["tb" if kind == "tensorboard" else "log.csv"] and [s for s, _ in points] == [2, 3, 4]
    assert len(said) == 1 and "given to another weighter since" in said[0], said
    assert run(tmp_path / "copied", True) == (files, points, said)


def test_a_tensorboard_logger_given_a_writer_refuses_a_whole_object_checkpoint_clearly(tmp_path):
    """A writer you give the logger (a SummaryWriter) cannot be pickled, so neither can the weighter holding the
    logger: torch.save said only "cannot pickle '_thread.lock' object". It now says which object and what to do
    instead, and the logger and the weighter go on as before."""
    pytest.importorskip("tensorboard")
    import copy
    import io

    import torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    writer = SummaryWriter(tmp_path / "tb")
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     callbacks=[mw.TensorBoardLogger(writer)])
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    weighter.step(batch, (batch[0].clone(), batch[1]))
    for save in (lambda: torch.save((net, weighter), io.BytesIO()), lambda: copy.deepcopy(weighter)):
        with pytest.raises(TypeError, match=r"writer you gave it \(`SummaryWriter`\), which cannot be pickled "
                                            r"\(.*lock.*\).*TensorBoardLogger\(writer.log_dir\)"):
            save()
    weighter.step(batch, (batch[0].clone(), batch[1]))
    writer.close()
    assert _tb_steps(tmp_path / "tb") == [1, 2]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("schedule", ["meta_every=2", "learn paused at 3-4"])
def test_a_logger_fed_every_record_step_returns_keeps_every_row(tmp_path, kind, schedule):
    """``log(weighter.step(...))`` at every iteration, some without a meta step (``meta_every=2``, or ``learn``
    paused): a record of no meta step says nothing of what it follows, and the next meta step's record follows
    the previous meta step, so its rows between were taken for steps undone and dropped (helper-156: rows 1, 3,
    5, 6 of 1-6, with a warning). The rows of records of no meta step that this logger wrote stand: 1-6, no
    warning."""
    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     meta_every=2 if schedule == "meta_every=2" else 1)
    log = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for i in range(6):
            weighter.learn = schedule == "meta_every=2" or i not in (2, 3)
            log(weighter.step(batch, (batch[0].clone(), batch[1])))
    log.close()
    assert not [str(w.message) for w in said if "Logger" in str(w.message)]
    shown = _shown if kind == "tensorboard" else (lambda path: [int(float(r[0])) for r in rows(path)[1:]])
    assert shown(where) == [1, 2, 3, 4, 5, 6]


def _points(kind, where):
    """The (iteration, gamma/ce[1]) a log shows, read back independently (csv, TensorBoard's EventAccumulator)."""
    if kind == "csv":
        table = rows(where)
        column = table[0].index("gamma/ce[1]")
        return [(int(float(r[0])), round(float(r[column]), 5)) for r in table[1:]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(where))
    events.Reload()
    return [(e.step, round(e.value, 5)) for e in events.Scalars("metaweight/gamma/ce[1]")]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("case", ["rollback, every record logged", "a refused step logged",
                                  "hook before a raising one, records of no meta step logged too"])
def test_records_of_no_meta_step_logged_by_hand_stand_beside_the_meta_steps_rows(tmp_path, kind, case):
    """helper-158, against the rows of the records that stand (values included): TensorBoardLogger fed every
    record of step() (meta_every=2) and rolled back in the process kept the undone point of 6 beside the new one
    (it forgot standing steps from view after a record following a meta step); with the logger also a hook
    before one that raised, the purge hid a standing point of no meta step above the put-back one; a refused
    model step's record (model_step_skipped: not counted, its iteration taken again) was written and then
    dropped as a rollback, with a warning. Each log must show exactly the records that stand, and say nothing."""
    import torch
    from torch import nn

    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("tb" if kind == "tensorboard" else "log.csv")
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    log = mw.TensorBoardLogger(where) if kind == "tensorboard" else mw.CSVLogger(where)
    armed = []

    def raising(record):
        if armed:
            armed.pop()
            raise RuntimeError("the user's hook failed")

    hooked = case.startswith("hook")
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     meta_every=2, nonfinite="skip", callbacks=[log, raising] if hooked else [])
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(12)]
    stood = {}

    def call(i, train=None):
        record = weighter.step(train or batches[i], batches[i + 1])
        if not (hooked and record.follows is not None):  # (a hook-fed logger gets the meta steps itself)
            log(record)
        if not record.model_step_skipped:
            stood[record.iteration] = round(record.gamma["ce[1]"], 5)

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if case.startswith("rollback"):
            for i in range(5):
                call(i)
            checkpoint = {"net": {k: v.clone() for k, v in net.state_dict().items()}, "w": weighter.state_dict()}
            for i in range(5, 9):
                call(i)
            net.load_state_dict(checkpoint["net"])
            weighter.load_state_dict(checkpoint["w"])
            stood = {k: v for k, v in stood.items() if k <= 5}
            for i in range(5, 8):
                call(i)
        elif case.startswith("a refused"):
            for i in range(4):
                call(i, (batches[i][0] * float("nan"), batches[i][1]) if i == 2 else None)
            call(4)
        else:
            call(0)
            call(1)
            armed.append(True)
            with pytest.raises(RuntimeError, match="the user's hook failed"):
                call(2)  # iteration 3's meta step put back, its model step standing
            stood[3] = None
            for i in range(3, 6):
                call(i)
            del stood[3]
    log.close()
    assert _points(kind, where) == sorted(stood.items())
    rolled_back = case.startswith("rollback")
    assert len([w for w in said if "Logger" in str(w.message)]) == (1 if rolled_back or hooked else 0), \
        [str(w.message) for w in said]
