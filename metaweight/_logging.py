"""Logging hooks: a weighter or weighting calls each callback with a record after every meta step."""

from __future__ import annotations

import csv
import math
import os
import re
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from metaweight._checkpoint import _pickles
from metaweight._checks import check_flag
from metaweight._files import file_mode, special_file, user_path, write_target
from metaweight._warn import warn_user


def flatten_record(record: dict[str, Any]) -> dict[str, float]:
    """A meta-step record as flat scalars: ``iteration``, ``meta_step``, ``val_objective`` (where the record has
    one), ``val_ce[k]``, ``gamma/NAME`` and ``term/NAME``; the model step's ``loss`` and ``model_step_skipped``,
    which ``step()`` adds to the record it returns, are not among them."""
    flat: dict[str, float] = {"iteration": record["iteration"], "meta_step": record["meta_step"]}
    if record.get("val_objective") is not None:  # HarmonizedWeighter's; the other weightings have none
        flat["val_objective"] = record["val_objective"]
    for k, value in enumerate(record.get("val_exit_losses") or []):
        flat[f"val_ce[{k + 1}]"] = value
    for name, value in record["gamma"].items():
        flat[f"gamma/{name}"] = value
    for name, value in (record.get("terms") or {}).items():
        flat[f"term/{name}"] = value
    return flat


def _iteration(record: Any) -> Any:
    """The iteration a record says it reports, for a warning about it (whatever the record is)."""
    try:
        return record.get("iteration")
    except Exception:  # noqa: BLE001 - not a mapping: named as it is
        return repr(record)[:80]


def _undone_from(record: Any, step: float) -> tuple[float, bool]:
    """The first iteration whose logged entries a record says are undone: one past the iteration it
    follows (:attr:`MetaStepRecord.follows`: the weighter's previous meta step kept, or the iteration it was
    built or loaded at), so that entries of steps undone go even where the first meta step after a resume
    or a rollback was not logged (skipped as not finite, or put back by a hook that raised); for a record
    that does not say (a mapping of the user's, a weighter pickled by an earlier metaweight), its own
    iteration ``step``. And whether the weighter was restored from a checkpoint (:attr:`MetaStepRecord.restored`):
    a resumed run even where every entry goes, unless the checkpoint was taken before its first call (a weighter
    loaded or copied before its first step, a template for a new run as often as a resume: every entry would go, so
    it is a new run, as for a weighter built; the weighter says ``restored=False`` then)."""
    if _follows_known(record) and 0 <= record.follows < step:
        return float(record.follows + 1), getattr(record, "restored", False) is True
    return step, False


def _follows_known(record: Any) -> bool:
    """Whether ``record`` says which iteration it follows (:attr:`MetaStepRecord.follows`: a meta step's record
    handed to the hooks), where a record of no meta step (a ``step()`` record you log yourself) does not."""
    follows = getattr(record, "follows", None)
    return isinstance(follows, int) and not isinstance(follows, bool)


def _why_undone(record: Any) -> str:
    """Why a warning takes a logger's entries for steps undone, by what ``record`` says (:func:`_follows_known`)."""
    if not _follows_known(record):
        return "taken for a weighter rolled back to a checkpoint in this process"
    return ("steps its weighter no longer holds (rolled back to a checkpoint in this process, or a meta step put "
            "back by a hook that raised)")


def _following(step: float, cut: float) -> str:
    """How a warning names a record (iteration ``step``) and, where it says so, the iteration it follows."""
    if cut == step:
        return f"iteration {step:g}"
    return (f"iteration {step:g}, which follows iteration {cut - 1:g} in its weighter (its previous meta step kept, "
            f"or the iteration it was built or loaded at)")


def _step_of(line: str) -> float | None:
    """The iteration a logged CSV row reports (its first column), or ``None`` if it cannot be read."""
    try:
        return float(next(csv.reader([line]))[0])
    except (StopIteration, IndexError, ValueError):
        return None


def _before(lines: list[str], step: float, stands: set[float] | frozenset[float] = frozenset()) -> list[str]:
    """The rows logged before ``step``, and those of the iterations that ``stands`` all the same
    (:meth:`HandedLogger._stands`); a row whose step cannot be read is kept, not ours to judge."""
    return [line for line in lines if (s := _step_of(line)) is None or s < step or s in stands]


def _read_log(path: Path) -> tuple[list[str] | None, list[str], bool, str | None]:
    """A log's header, its complete rows (raw lines, blank lines left out: nothing to keep), whether its
    last line lacks its newline (the file must then be rewritten, not appended to) and the text of a
    torn last line, dropped (``None``: none). A last row without its newline that reads as a complete
    row (:func:`_complete`: a hand edit, another tool) is kept, its newline added; one that does not
    is what a crash (or a full disk) in the middle of a write leaves, and is dropped. A lone line
    without its newline is the header, unless it is a torn start of one (``iteration,met``): a file
    of another kind is returned as it is, for the caller to refuse. Raises ``UnicodeDecodeError``
    for a file that is not text."""
    with path.open(newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    unended = bool(lines) and not lines[-1].endswith("\n")
    dropped = None
    if unended and len(lines) > 1:
        last = lines.pop()
        width = len(next(csv.reader([lines[0]]), []))
        if _complete(last, width):
            before = lines[-1]
            lines.append(last.rstrip("\r\n") + (before[len(before.rstrip("\r\n")):] or "\r\n"))
        elif last.strip():
            dropped = last.rstrip("\r\n")
    elif unended and _HEADER.startswith(lines[0]) and lines[0] != _HEADER:  # a header torn in its first write
        dropped = lines.pop()
    lines = [line for line in lines if line.strip()]
    if not lines:
        return None, [], unended, dropped
    return next(csv.reader([lines[0]]), []), lines[1:], unended, dropped


_HEADER = "iteration,meta_step,"  # how every metaweight log starts


def _complete(line: str, width: int) -> bool:
    """Whether a logged line without its newline reads as a complete row of a log whose header has
    ``width`` columns: that many values, each a number or blank (a column the record lacked), its
    iteration a number, and its last value a number as Python writes one (``0.5``, ``1e-05``, ``3``):
    a write cut short ends inside its last value, and a cut float mostly does not read as one
    (``0.``, ``1e-0``). A cut that leaves a number as written (``0.5`` of ``0.55``) cannot be told
    from a complete row, and is kept."""
    try:
        values = next(csv.reader([line.rstrip("\r\n")]))
        numbers = [float(v) for v in values if v != ""]
    except (csv.Error, StopIteration, ValueError):
        return False
    last = values[-1] if values else ""
    written = last != "" and (repr(float(last)) == last or last.lstrip("-").isdigit())
    return len(values) == width and values[0] != "" and written and all(map(math.isfinite, numbers[:2]))


def _torn_note(path: Path, dropped: str) -> str:
    return (f"The last line of the log {path}, {dropped!r}, has no newline and does not read as a complete row "
            f"(its header's columns, each a number): what a crash or a full disk in the middle of a write leaves. "
            f"It was dropped from {path}; the rows before it are kept.")


def _readable(lines: list[str]) -> list[float]:
    """The iterations of the rows that can be read (a row that cannot is kept, but says nothing)."""
    return [s for s in map(_step_of, lines) if s is not None]


def _siblings(path: Path, suffix: str | None = None, folders: bool = False) -> list[Path]:
    """The logs ``NAME-2.csv``, ``NAME-3.csv``, ... (or folders ``NAME-2``, ... with ``suffix=""`` and
    ``folders``) beside ``path``, where new runs were diverted (:func:`_fresh`), in order."""
    suffix = path.suffix if suffix is None else suffix
    stem = path.name[:-len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    pattern = re.compile(re.escape(stem) + r"-([0-9]+)" + re.escape(suffix) + "$")
    found = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match and int(match.group(1)) >= 2 and (entry.is_dir() if folders else entry.is_file()):
                found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


_HELD: dict[str, weakref.ReferenceType[Any]] = {}  # path -> the live logger writing there, in this process


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _holder(path: Path) -> Any:
    ref = _HELD.get(_key(path))
    return None if ref is None else ref()


def _hold(path: Path, owner: Any) -> None:
    """Make ``owner`` the one logger writing to ``path`` in this process, or refuse (changing nothing)
    while another live one holds it: two loggers on one file would each write every row."""
    other = _holder(path)
    if other is not None and other is not owner:
        import gc

        gc.collect()  # a logger of a dropped weighter may only wait for the cycle collector
        other = _holder(path)
    if other is not None and other is not owner:
        raise ValueError(f"Another {type(other).__name__} in this process writes to {path}: two loggers on one "
                         f"log would each write every row. If this is a notebook cell run again, the weighter its "
                         f"last run made still holds that logger (`w = HarmonizedWeighter(...)` rebinds `w` only "
                         f"once this line has run): close its loggers first, `for c in w.callbacks: c.close()` "
                         f"(a closed logger gives the path up; that weighter's later records are then skipped with "
                         f"a warning, never written twice), or `del w` and run the cell again (with no other "
                         f"reference to it left, such as IPython's `_` or `Out`). Otherwise use that logger, call "
                         f"its close(), or log to another path.")
    _HELD[_key(path)] = weakref.ref(owner)


def _release(path: Path, owner: Any) -> None:
    if _holder(path) is owner:
        del _HELD[_key(path)]


def other_rank() -> int | None:
    """This process's rank when ``torch.distributed`` runs several processes and this is not rank 0;
    ``None`` otherwise (one process, or rank 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0:
        return dist.get_rank()
    return None


def _write_standing(logger: Any, record: dict[str, Any], where: str, item: str) -> None:
    """A logger's meta-step hook: on rank 0 only (unless ``logger.all_ranks``), ``logger._record(record)``;
    any error is warned, never raised: the step the record reports stands."""
    if not logger.all_ranks and other_rank() is not None:
        return
    try:
        logger._record(record)
    except Exception as exc:  # noqa: BLE001 - the step this reports stands: never raise from the hook
        warn_user(f"{type(logger).__name__} could not write iteration {_iteration(record)} {where}"
                  f"({type(exc).__name__}: {exc}); the training step stands, this {item} is not in the log.")


def _check_flag(value: Any, name: str) -> None:
    check_flag(value, name)  # the library's one check of a bool option


def _check_can_create(path: Path, what: str) -> None:
    """Refuse a path that cannot be written: a file where a folder must be, or no write permission."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"`{what}` {path} cannot be created: {ancestor} is a file, not a folder. Pass a path "
                         f"under a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"`{what}` {path} cannot be written: no write permission on the folder {ancestor}. "
                         f"Pass a path you can write to.")
    _check_creates_files(ancestor, path, what)


def _check_creates_files(folder: Path, path: Path, what: str) -> None:
    """Refuse a folder in which no file can be created, as the permission bits may not tell (``/proc`` and ``/sys``,
    which grant root everything; a read-only mount): a temporary file is created there and removed at once."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"`{what}` {path} cannot be written: no file can be created in {folder} "
                         f"({type(exc).__name__}: {exc.strerror or exc}). Pass a path you can write to.") from None


def _last(steps: list[float]) -> float:
    return max(steps) if steps else float("-inf")


def _continued_log(step: float, logs: list[tuple[bool, list[float]]], cut: float | None = None,
                   restored: bool = False) -> tuple[int | None, bool, list[int]]:
    """The one rule both loggers follow at their first record (step ``step``) to tell a resumed run from a
    new one. ``logs``: the logs this run may continue, each as (whether it is the path asked for, the
    steps it holds): the path first, then the ``NAME-2``, ``NAME-3``, ... beside it where new runs were
    diverted, those of the same loss terms only; ``cut``: the first step the record says is undone
    (:func:`_undone_from`; ``step`` if not given), ``restored``: whether the record's weighter was restored
    from a checkpoint at ``cut - 1`` (a log of steps all after it is then its run's, all undone). Returns
    the index of the log to continue (``None``:
    divert the run to a new log), whether that log's steps at or after ``cut`` are undone (a resumed
    run: a CSV drops those rows, TensorBoard purges them from view), and, when no log is continued, the
    indices of the logs that could each have been this run's (two or more: ambiguous; none: a new run).
    See :class:`CSVLogger` for the rule in words."""
    cut = step if cut is None else cut

    def leads_here(steps: list[float]) -> bool:  # its last step is one of its own strides before this record
        logged = sorted(set(steps))  # (a TensorBoard folder lists a step once per tag)
        # one step tells no stride (meta_every=5 logs 1, 6, 11, ...): any later record may be its next
        stride = max([b - a for a, b in zip(logged, logged[1:])] or [math.inf])
        return bool(logged) and 0 < cut - logged[-1] <= stride

    # a log whose steps all end before this record continues with nothing undone: the path, or a diverted
    # log that leads here; of several, those that lead here (the path counts only if it does)
    clean = [i for i, (is_path, steps) in enumerate(logs) if _last(steps) < cut and (is_path or leads_here(steps))]
    if len(clean) > 1:
        clean = [i for i in clean if leads_here(logs[i][1])]
    # a log with steps before this record and at or after it: a run resumed from its checkpoint, whose
    # undone steps go (every step, for a weighter restored from a checkpoint before the log's first step)
    resumable = [i for i, (_, steps) in enumerate(logs) if steps and (restored or min(steps) < cut) and
                 cut <= _last(steps)]
    candidates = clean + resumable
    if len(candidates) != 1:  # none: a new run; several: any could be this run's, so none is touched
        return None, False, candidates
    return candidates[0], bool(resumable), []


def _candidates_said(step: float, logs: list[tuple[Any, list[float]]], unit: str) -> str:
    """The logs that could each be a run's whose first record is ``step``, named with why, for a warning."""
    said = []
    for name, steps in logs:
        how = "before and after it" if _last(steps) >= step else "leading to it"
        said.append(f"{name} ({unit}s {min(steps):g} to {max(steps):g}, {how})")
    return ", ".join(said)


def _went_back(last_step: float | None, first_logged: float | None, step: float, ours: bool = False
               ) -> str | None:
    """The one rule both loggers follow at a record after their first, closed or not in between:
    whether ``step`` goes back in the log this logger wrote (its last step ``last_step``, its first
    ``first_logged``). ``None``: it does not (the record is appended); ``"rolled back"``: a weighter
    rolled back to a checkpoint, the steps at or after ``step`` are undone; ``"new run"``: every step
    logged would go (e.g. a new weighter counting from 1 with the same logger), so the record goes to a
    new log, the old one kept whole; unless every step logged is known to be the record's weighter's
    (``ours``: it was restored from a checkpoint before them, or wrote them itself and had its meta step
    put back by a hook that raised): rolled back. Whether a writer is open at that moment plays no part."""
    if last_step is None or step > last_step:
        return None
    if first_logged is not None and first_logged >= step and not ours:
        return "new run"
    return "rolled back"


def _fresh(path: Path, suffix: str = "") -> Path:
    """The first of ``stem-2``, ``stem-3``, ... beside ``path`` that neither exists nor is held."""
    stem = path.name[:-len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    n = 2
    while True:
        candidate = path.with_name(f"{stem}-{n}{suffix}")
        if not candidate.exists() and _holder(candidate) is None:
            return candidate
        n += 1


class HandedLogger:
    """What the library's loggers share: the weighter each logs, the one given it last, and those it was taken
    from (see ``Weighting.register_meta_step_hook``), held weakly. Known by class: a user's callback may answer
    any attribute (a ``unittest.mock.Mock``) or raise from ``__getattr__``."""

    _metaweight_owner: Any = None  # (a weakref to the weighter it logs: see register_meta_step_hook)
    _metaweight_passed_over: Any = None  # (weighters it was taken from, weakly: whether each was warned)
    _rows_owner: Any = None  # (a weakref to the weighter it logged when it wrote its last entry)
    # the entries this run holds for certain: those up to the iteration the last record that said so follows
    # (MetaStepRecord.follows), and of the entries written since, those of records of no meta step (a step()
    # record logged by the user: they stand, where a meta step's entry may be put back)
    _confirmed: float | None = None
    _recent: list[tuple[float, bool]] = []  # (iteration, of a record of no meta step) written since (reassigned)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the weak references to the weighters it logs (which a weighter pickled with it
        sets again when it registers the copy), and as :meth:`_as_copy` says."""
        return self._as_copy({**{k: v for k, v in self.__dict__.items()
                                 if k not in ("_metaweight_owner", "_metaweight_passed_over", "_rows_owner")},
                              "_copied": True})  # (until it holds its log: see _held_elsewhere)

    def _as_copy(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state a pickled copy starts from (``state``, as it is, unless a logger class says otherwise)."""
        return state

    @staticmethod
    def _unwritten(state: dict[str, Any], **own: Any) -> dict[str, Any]:
        """``state`` as that of a logger that has not written yet, continuing its log (its ``overwrite`` spent),
        with the logger class's ``own`` entries of what it wrote: what :meth:`_as_copy` gives a copy of a logger
        that has written."""
        return {**state, "_last_step": None, "overwrite": False, "_confirmed": None, "_recent": [], **own}

    def _held_elsewhere(self, where: Any) -> str:
        """The start of what is said where this logger cannot write to ``where``: another logger of this
        process holds it, the one this was copied from (with its weighter) or one taken after close()."""
        if self.__dict__.get("_copied"):
            return (f"This {type(self).__name__} is a copy (pickled or copy.deepcopy'd with its weighter) of a "
                    f"logger that holds {where} (made or written there), or another logger now does (close that "
                    f"one, e.g. `for c in original.callbacks: c.close()`, for this copy to take it)")
        return f"This {type(self).__name__} was closed and another logger now writes to {where}"

    def _stands(self, cut: float, step: float) -> set[float]:
        """Of the rows from ``cut`` to before ``step`` (the iterations a record says are undone), those that stand
        all the same: rows this logger wrote, since the iteration the last record that said so follows, for
        records of no meta step (a ``step()`` record you log yourself: its model's step stood; a meta step's row
        may have been put back). None where the record goes back before that iteration (a rollback)."""
        if self._confirmed is None or cut - 1 < self._confirmed:
            return set()
        return {s for s, plain in self._recent if plain and cut <= s < step}

    def _keep_track(self, step: float, cut: float, stands: set[float], fresh: bool, known: bool) -> None:
        """After a row was written: what :meth:`_stands` reads next time."""
        if fresh or self._confirmed is None:  # (a record of no meta step says nothing of what it follows: none)
            self._confirmed, self._recent = (cut - 1 if known else 0), []
        else:
            self._recent = [(s, plain) for s, plain in self._recent if s < cut or s in stands]
            self._confirmed = cut - 1 if known else min(self._confirmed, cut - 1)
        if known:  # (rows up to it are this run's for certain)
            self._recent = [(s, plain) for s, plain in self._recent if s > self._confirmed]
        self._recent.append((step, not known))

    def _goes_back(self, cut: float, step: float, stands: set[float]) -> bool:
        """Whether a record (iteration ``step``, entries from ``cut`` on undone but ``stands``) goes back before
        the last entry this logger wrote: not where every entry from ``cut`` on stands (a record following a meta
        step, after the entries of your own step() records of no meta step)."""
        return self._last_step is not None and cut <= self._last_step and (
            step <= self._last_step or not stands or any(not plain for s, plain in self._recent if s >= cut))

    def _wrote(self) -> None:
        """Note that an entry was just written, for the weighter this logger logs."""
        self._rows_owner = self._metaweight_owner

    def _own_rows(self, record: Any) -> bool:
        """Whether ``record`` is of the weighter this logger logs (it says what it follows:
        :attr:`MetaStepRecord.follows`) and that weighter wrote the last entry too: a record of it going back
        to before every entry is then its meta step put back by a hook that raised (its first), not a new
        run counting from 1 with this logger (a new weighter registers the logger anew)."""
        owner, last = self._metaweight_owner, self._rows_owner
        return _follows_known(record) and owner is not None and last is not None and owner() is not None and \
            owner() is last()


class CSVLogger(HandedLogger):
    """Writes one row per meta step to a CSV file, with one header; resumes where the run resumes.

    The column ``iteration`` is the step. A file that already exists is continued under the
    header it has, as TensorBoard's ``SummaryWriter(purge_step=...)`` continues an event log:

    * the first record this logger gets says where the run stands: rows of the file after the
      iteration it follows (:attr:`MetaStepRecord.follows`: the weighter's previous meta step
      kept, or the iteration it was loaded at; a record without it, such as a dict of yours: rows
      at or after its own iteration) were logged after the checkpoint the run resumed from, by
      steps that were undone, and are dropped (a run that logged iterations 1-5 and resumes from
      its checkpoint at 3 logs 4 and 5 again: the file holds 1-5 once; if the meta step of 4 is
      skipped, the file holds 1-3 and 5); the same holds for any later record that follows an
      iteration before the last row (a weighter rolled back in the same process, or a meta step
      put back by a hook that raised after this logger logged it), with a ``RuntimeWarning``
      naming the file and the iterations dropped; rows this logger wrote for records of no meta
      step that you log yourself (``log(weighter.step(...))`` with ``meta_every`` or ``learn``
      paused: they say nothing of what they follow) stand beside them, and a record of a model
      step ``step()`` refused (``model_step_skipped``: not counted, its iteration taken again) is
      not written;
    * a last line without its newline is what a crash (or a disk full) in the middle of a write
      leaves, or a hand edit: before the next row is written (at any record) it is kept, its
      newline added, if it reads as a complete row (the header's number of values, each a number
      or blank), and dropped otherwise, with a ``RuntimeWarning`` naming the file and the text.

    The iteration alone cannot tell a resumed run from a new run whose first record falls inside
    an old log (a warm-up without meta steps, a new run on an old path), so rows are dropped at a
    first record only from a log that can be shown to be this run's. The logs this run may
    continue are the file at ``path`` and the ``NAME-2.csv``, ``NAME-3.csv``, ... beside it (where
    new runs on ``path`` were diverted: a diverted run resumed with the same code asks for
    ``path`` again), those of the same loss terms (``gamma/`` columns). Of these, in order:

    1. a log whose rows all end before the record could be continued, nothing dropped: ``path``,
       or a diverted log whose last row is at most one of its own strides (the largest gap between
       its rows) before the record (of several, only those that lead there so: ``path`` counts
       then only if it does too);
    2. a log that holds rows both before and at or after the record could be the run resumed
       from its checkpoint, its rows at or after the record dropped;
    3. if exactly one log could be this run's by 1 or 2, it is taken (a resumed one with a
       ``RuntimeWarning`` that says how many rows and which iterations were dropped); if none
       (a new run) or several (e.g. run A's log 1-10 and a run diverted from it to ``NAME-2``
       with 1-3, for a record at 4: A resumed at its checkpoint, or the other continued?) nothing
       is written to any of them: the run is diverted as below, and the warning names the
       candidates.

    Only rows whose iteration can be read count (a blank line, or a row edited by hand, decides
    nothing; blank lines are left out when the file is rewritten). A run that must not touch an
    old log gives a path of its own (or ``overwrite=True`` to start afresh).

    What the file alone tells is judged here, when the logger is made, and refused with a
    ``ValueError`` that changes nothing: a folder, a path that cannot be written, a file that is
    not a metaweight log (not UTF-8 text, or its first columns are not ``iteration,meta_step``), a path another
    live logger of this process writes to. Two things can only be judged at the first record,
    which a weighter hands over after its step has been taken: a log of another run (other loss
    terms: its ``gamma/`` columns differ) and a new run on an old log (every row would be
    dropped). A hook must
    not raise then (the step stands; a retry would take it twice), and the old log must not be
    lost, so the logger leaves the old file as it is, writes to the first free ``NAME-2.csv``,
    ``NAME-3.csv``, ... beside it, warns, and shows the new path in :attr:`path`.
    ``overwrite=True`` starts the file afresh at the first record instead. The same holds for one
    logger handed to a new weighter, whose iterations count from 1 again: every row would be
    dropped, so the new run goes to ``NAME-2.csv``, with a warning.

    A record with columns the header lacks (loss terms first logged at a later step, as a
    weighting's ``meta_step`` without ``loss()`` has none) widens the header, whether it is this
    logger's first record (a resumed run) or a later one: the file is rewritten with the new
    columns after the others, earlier rows blank there. A record without
    some columns leaves them blank. A file deleted (or emptied), or its folder deleted, while the
    logger writes to it starts again with its header (the folder made again), with a warning. Nothing a logger meets after the step raises
    out of the hook: a row that cannot be written (a folder removed, a disk full, a record it
    cannot read) is reported lost in a ``RuntimeWarning``, and training goes on.

    Under ``torch.distributed`` (a process group initialized with more than one process) only
    rank 0 writes: after a meta step every rank holds the same gamma (its meta-gradient is
    averaged over the ranks), so the same logger built on every rank (as a weighter's callbacks
    are) writes each row once, rank 0's (its loss terms are those of rank 0's batch), not once
    per rank into one file. The rank is read at each record, so a logger
    made before ``init_process_group`` follows it too. ``all_ranks=True`` writes on every rank:
    give each rank its own path then (e.g. ``f"log-{rank}.csv"``).

    Dropping rewrites the file whole: a temporary file beside it, then ``os.replace`` (atomic),
    so an interruption leaves the old log or the new one, never a mix. A write that fails changes
    nothing the logger holds (its columns, its path, its last iteration): the next record is
    judged against the file as it is, and no warning reports what did not happen. Without anything to drop
    a row is appended. Nothing is written (no folder, no file) until the first record: the
    weighter calls its hooks only for meta steps that stand (list the logger after hooks of your own
    that may raise: one that raises puts the meta step back, after the loggers before it logged it;
    its row is dropped at the next record). :meth:`close` gives the path up
    for another logger of this process.

    Pickled with its weighter (``torch.save((model, optimizer, weighter))``, ``copy.deepcopy``), a
    copy starts as a logger that has not written: its first record is judged against the file as
    it is then, as a resumed run's first record is (its ``overwrite`` spent once the file was
    started). While the logger it was copied from holds the path, the copy's records are skipped
    with a warning.

    Args:
        path: the CSV file; created (with its folder) at the first record.
        overwrite: start a new file at the first record instead of continuing an existing one.
        all_ranks: write on every rank of a distributed run, not on rank 0 only.

    Raises:
        TypeError: ``path`` is not a str or Path, or ``overwrite`` or ``all_ranks`` not a bool.
        ValueError: ``path`` is a folder or no file (``os.devnull``, a pipe), cannot be written, is
            not a metaweight log (unless ``overwrite``), is a symbolic link into a folder that does
            not exist, or another live logger of this process writes to it.

    Example:
        >>> import tempfile, torch, metaweight as mw
        >>> path = tempfile.mktemp(suffix=".csv")
        >>> net = mw.MultiExit([torch.nn.Linear(4, 4)] * 2, [torch.nn.Linear(4, 3)] * 2)
        >>> w = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
        ...                           callbacks=[mw.CSVLogger(path)])
        >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> _ = w.step(batch, batch)
        >>> open(path).readline().split(",")[:3]
        ['iteration', 'meta_step', 'val_objective']
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False, all_ranks: bool = False) -> None:
        path = user_path(path)
        _check_flag(overwrite, "overwrite")
        _check_flag(all_ranks, "all_ranks")
        self.all_ranks = all_ranks
        if path.is_dir():
            raise ValueError(f"`path` {path} is a folder; pass a file path in it, such as {path / 'log.csv'}.")
        kind = special_file(path)
        if kind is not None:  # (its rows could not be read back, and a rewrite would put a file in its place)
            raise ValueError(f"`path` {path} is {kind}, not a file: CSVLogger keeps a log it reads back (to go on "
                             f"after a resume, to drop the rows past a checkpoint) and rewrites. Pass a file path; to "
                             f"log nothing, pass no CSVLogger.")
        _check_can_create(path, "path")
        if path.is_symlink() and not path.exists():  # a link to a file not there yet: written through
            target = Path(os.path.realpath(path))
            if not target.parent.is_dir():
                raise ValueError(f"`path` {path} is a symbolic link to {target}, whose folder {target.parent} does "
                                 f"not exist: every row would be lost. Create that folder, or log to another path.")
            _check_can_create(target, "path")
        if path.exists():
            if not os.access(path, os.R_OK | os.W_OK):
                raise ValueError(f"`path` {path} exists but cannot be read and written: check its permissions, or "
                                 f"log to another path.")
            if not os.access(path.parent, os.W_OK | os.X_OK):  # a rewrite puts a new file in its place
                raise ValueError(f"`path` {path} cannot be rewritten: no write permission on its folder "
                                 f"{path.parent}. Log to another path.")
        self.path = path
        self.overwrite = overwrite
        try:
            header, _, _, _ = (None, [], False, None) if overwrite else self._existing()
        except UnicodeDecodeError as exc:
            raise ValueError(f"`path` {path} holds a file that is not text ({exc.reason} at byte {exc.start}: not "
                             f"UTF-8; a compressed log or an image?), so not a metaweight log; nothing was changed. "
                             f"Log to another path, or pass overwrite=True to replace it.") from None
        if header is not None and header[:2] != ["iteration", "meta_step"]:
            raise ValueError(f"`path` {path} holds a CSV with the columns {header[:6]}, not a metaweight log (its "
                             f"first columns are iteration,meta_step); nothing was changed. Log to another path, "
                             f"or pass overwrite=True to replace it.")
        _hold(path, self)
        self._fields: list[str] | None = None
        self._last_step: float | None = None  # the iteration of the last row this logger wrote

    def close(self) -> None:
        """Give the path up, so that another logger of this process may write to it."""
        _release(self.path, self)

    def _as_copy(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy (pickled with its weighter, a whole-object checkpoint, and resumed) starts as a logger that
        has not written yet, continuing its file: its first record is judged against the file as it is then,
        where the original may have logged steps undone since (appended to, they stood twice), or a whole run
        (a template copied when built). A copy never overwrites: its ``overwrite`` is spent."""
        if state.get("_fields") is None:  # (it has not written: the original may write the file before the copy
            return {**state, "overwrite": False}  # does, a template copied when built; never overwritten by a copy)
        return self._unwritten(state, _fields=None)

    def _existing(self) -> tuple[list[str] | None, list[str], bool, str | None]:
        """:func:`_read_log` of the file at :attr:`path` (no header, no rows if there is none)."""
        if not self.path.is_file():
            return None, [], False, None
        return _read_log(self.path)

    def _rewrite(self, fields: list[str], kept: list[str], row: dict[str, float], path: Path) -> None:
        """Write the header, the kept rows and ``row`` to a temporary file, then put it in place of the
        log at ``path`` (a new log is simply written)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():  # nothing to keep safe: a new file, with the permissions open() gives
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerow(row)
            return
        target = write_target(path)  # through a symbolic link: the link stays, its target is rewritten
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(tmp, file_mode(target))  # the log's own (mkstemp's are owner-only)
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                f.writelines(kept)
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __call__(self, record: dict[str, Any]) -> None:
        _write_standing(self, record, f"to {self.path} ", "row")

    def _record(self, record: dict[str, Any]) -> None:
        if _refused(record):
            return
        row = flatten_record(record)
        step = float(row["iteration"])
        if _holder(self.path) is not self:  # closed: take the path back, unless another logger has it
            if _holder(self.path) is not None:
                warn_user(f"{self._held_elsewhere(self.path)}: iteration {step:g} was not logged by it.")
                return
            _hold(self.path, self)
            self._copied = False
        # A transaction: the new state (path, columns, last step) and the warnings are worked out first,
        # the file is written, and only then is the state kept and the warnings given; a write that
        # fails leaves the logger as it was, so the next row is judged against the file as it is.
        cut, restored = _undone_from(record, step)
        stands = self._stands(cut, step)
        path, fields, kept, notes = self._plan(row, step, cut, restored, record=record, stands=stands)
        if path != self.path:
            _hold(path, self)
        try:
            if kept is None:  # only ever on the path this logger holds
                self._append(fields, row)
            else:
                self._rewrite(fields, kept, row, path)
        except BaseException:
            if path != self.path:
                _release(path, self)
            raise
        fresh = path != self.path or self._fields is None or (kept is not None and not kept)
        if path != self.path:
            _release(self.path, self)
            self.path = path
        self._fields, self._last_step = fields, step
        self._wrote()
        self._keep_track(step, cut, stands, fresh, _follows_known(record))
        for note in notes:
            warn_user(note)

    def _plan(self, row: dict[str, float], step: float, cut: float, restored: bool = False, *, record: Any = None,
              stands: set[float] | None = None) -> tuple[Path, list[str], list[str] | None, list[str]]:
        """Where ``row`` goes, under which columns, the complete rows kept before it (``None``: append to
        the file as it is) and the warnings to give once it is written; the rows at or after ``cut``
        are of steps undone but ``stands`` (:meth:`_stands`), and ``restored`` says the weighter was
        restored at ``cut - 1`` (:func:`_undone_from`). Changes nothing."""
        fields = list(row)
        path = self.path
        stands = stands or set()
        if self._fields is None:  # the first record: a new file, or continue the one there
            return self._plan_first(fields, step, cut, restored)
        size, torn = _tail(path)
        if not size:  # deleted or emptied while this logger writes to it; a folder deleted is made again
            what = (f"The log {path} was deleted or emptied" if path.parent.is_dir() else
                    f"The folder {path.parent} of the log {path} was deleted")  # as TensorBoardLogger does
            return path, _widened(self._fields, fields), [], [
                f"{what} while this CSVLogger wrote to it: it starts again at iteration {step:g}, with its "
                f"header{'' if path.parent.is_dir() else ', in that folder made again'}; the rows before are "
                f"not in it."]
        columns = _widened(self._fields, fields)
        extra = len(columns) - len(self._fields)
        went_back = self._goes_back(cut, step, stands)
        if not (went_back or extra or torn):
            return path, columns, None, []  # the common case: appended, the file not read
        _, lines, _, dropped = self._existing()  # a torn last line (a failed append) is left out of ``lines``
        torn_notes = [_torn_note(path, dropped)] if dropped is not None else []
        if went_back:  # in this process
            kept = _before(lines, cut, stands)
            logged = _readable(lines)
            if _went_back(self._last_step, min(logged, default=None), cut,
                          bool(stands) or restored or self._own_rows(record)) == "new run":
                new = _fresh(path, path.suffix)
                return new, fields, [], [
                    f"This CSVLogger logged iterations {min(logged):g} to {max(logged):g} to {path} and now gets "
                    f"{_following(step, cut)}: every row would be dropped as undone, so this is a new run (e.g. a "
                    f"new weighter counting from 1 with the same logger), not a weighter rolled back to a "
                    f"checkpoint. {_diverted(path, new)}"]
            # rolled back: the undone rows go, and the warning says which (none dropped: nothing to say)
            dropped = [s for s in logged if s >= cut and s not in stands]
            notes = [f"This CSVLogger logged up to iteration {self._last_step:g} to {path} and now gets "
                     f"{_following(step, cut)}: {_why_undone(record)}, the {_rows(len(dropped))} of {_span(dropped, 'iteration')} "
                     f"(undone) {'was' if len(dropped) == 1 else 'were'} dropped from {path}. If this is a new run, "
                     f"give it a logger of its own."] if dropped else []
            return path, columns, [_pad(line, extra) for line in kept], notes + torn_notes
        return path, columns, [_pad(line, extra) for line in lines], torn_notes  # header widened / newline fixed

    def _plan_first(self, fields: list[str], step: float, cut: float, restored: bool = False
                    ) -> tuple[Path, list[str], list[str] | None, list[str]]:
        """:meth:`_plan` for this logger's first record: which log it continues (or a new one), judged
        from the file at :attr:`path` and the logs diverted beside it."""
        path = self.path
        if self.overwrite:
            return path, fields, [], []
        header, lines, unended, dropped = self._existing()
        if header is None:
            return path, fields, [], [_torn_note(path, dropped)] if dropped is not None else []
        # every log this run may continue: the path and the logs new runs were diverted to beside it
        # (a diverted run resumed with the same code asks for the path again); those of other loss
        # terms, not metaweight logs, unreadable or held by another logger are not this run's
        candidates: list[tuple[Path, list[str], list[str], bool, str | None]] = []
        for file in [path, *_siblings(path)]:
            if file != path and _holder(file) not in (None, self):
                continue
            try:
                other = (header, lines, unended, dropped) if file == path else _read_log(file)
            except (OSError, UnicodeDecodeError):
                continue
            if other[0] is not None and other[0][:2] == ["iteration", "meta_step"] and _same_terms(other[0], fields):
                candidates.append((file, *other))  # type: ignore[arg-type]

        steps = [_readable(c[2]) for c in candidates]  # each candidate's iterations, read once
        chosen, resumed, resumable_at = _continued_log(step, [(c[0] == path, s) for c, s in zip(candidates, steps)],
                                                       cut, restored)
        if chosen is not None and not resumed:
            file, old_header, old_lines, old_unended, old_dropped = candidates[chosen]
            columns = _widened(old_header, fields)
            extra = len(columns) - len(old_header)
            notes = [_torn_note(file, old_dropped)] if old_dropped is not None else []
            if file != path:
                notes.append(f"The log {path} is not this run's continuation (its rows or loss terms do not lead "
                             f"to iteration {step:g}), but {file}, where a new run on {path} was diverted, ends at "
                             f"iteration {_last(steps[chosen]):g}: taken for that run resumed, this run continues "
                             f"{file}. {path} was left as it is.")
            if file != path or old_unended or extra:
                return file, columns, [_pad(line, extra) for line in old_lines], notes
            return file, columns, None, notes
        if chosen is not None:
            file, old_header, old_lines, _, old_dropped = candidates[chosen]
            columns = _widened(old_header, fields)
            extra = len(columns) - len(old_header)
            dropped = [s for s in steps[chosen] if s >= cut]
            notes = [f"The log {file} holds rows up to iteration {max(dropped):g}, and this run's first record is "
                     f"{_following(step, cut)}: taken for a run resumed from its checkpoint, the {len(dropped)} rows of "
                     f"iterations {min(dropped):g} to {max(dropped):g} (steps taken after that checkpoint, undone) "
                     f"were dropped. If this is a new run, not a resumed one, those rows were another run's: give "
                     f"each new run a path of its own (or overwrite=True) to keep a run's log whole."]
            if old_dropped is not None:
                notes.append(_torn_note(file, old_dropped))
            if file != path:
                notes.insert(0, f"The log {path} is another run's; {file}, where a new run on {path} was diverted, "
                                f"is taken for this run's and continued.")
            return file, columns, [_pad(line, extra) for line in _before(old_lines, cut)], notes
        new = _fresh(path, path.suffix)
        if not _same_terms(header, fields):
            why = (f"The log {path} has the columns {header}, but this run records {fields}: other loss terms, so "
                   f"another run; appending would mix them.")
        elif not resumable_at:
            logged = _readable(lines) or [step]
            why = (f"The log {path} holds iterations {min(logged):g} to {max(logged):g}, and this run's first "
                   f"record is {_following(step, cut)}: every row would be dropped as undone, so this is a new run, "
                   f"not one resumed from a checkpoint.")
        else:
            named = _candidates_said(cut, [(candidates[i][0], steps[i]) for i in resumable_at], "iteration")
            why = (f"This run's first record is iteration {step:g}, and the logs {named} could each be this run's "
                   f"(continued, or resumed from a checkpoint): writing to one would put this run's rows into "
                   f"another run's log, so none is continued and none is cut (a log is continued only when "
                   f"exactly one can be this run's).")
        return new, fields, [], [f"{why} {_diverted(path, new)}"]

    def _append(self, fields: list[str], row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)


def _tail(path: Path) -> tuple[int, bool]:
    """The size of the file at ``path`` (0 if there is none) and whether its last line is torn (no newline:
    an append that failed half-way, or a crash in the middle of one)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if not size:
                return 0, False
            f.seek(size - 1)
            return size, f.read(1) != b"\n"
    except FileNotFoundError:
        return 0, False


def _widened(header: list[str], fields: list[str]) -> list[str]:
    """``header`` with the columns of ``fields`` it lacks added after the others."""
    return header + [name for name in fields if name not in header]


def _same_terms(header: list[str], fields: list[str]) -> bool:
    """Whether a log's header and a record weight the same loss terms (the ``gamma/`` columns): a run
    weights the same terms throughout, while other columns (``term/``, ``val_``) may come later."""
    return {f for f in header if f.startswith("gamma/")} == {f for f in fields if f.startswith("gamma/")}


def _diverted(old: Path, new: Path) -> str:
    return (f"The old log {old} was left as it is; this run logs to {new} instead. Pass overwrite=True to "
            f"replace the old log, or a path of its own.")


def _rows(count: int, what: str = "row") -> str:
    """``count`` and ``what``, plural where it is: ``1 row``, ``3 rows``."""
    return f"{count} {what}{'s' if count != 1 else ''}"


def _span(steps: list[Any], unit: str) -> str:
    """The first to the last of ``steps`` (sorted), as a warning names them: ``iteration 3``, ``iterations 3 to 5``
    (``unit`` "iteration"; "" for the bare numbers: ``3``, ``3 to 5``)."""
    low, high = min(steps), max(steps)
    if low == high:
        return f"{unit} {low:g}".strip()
    return f"{unit + 's ' if unit else ''}{low:g} to {high:g}"


def _refused(record: Any) -> bool:
    """Whether ``record`` is of a model step ``step()`` refused (``model_step_skipped``): nothing of it stands,
    and the next call takes its iteration again, so no logger writes it."""
    try:
        return record.get("model_step_skipped") is True
    except Exception:  # noqa: BLE001 - not a mapping: judged where it is read
        return False


def _pad(line: str, columns: int) -> str:
    """A logged row with ``columns`` empty values added at its end (columns added after it was logged)."""
    if not columns:
        return line
    body = line.rstrip("\r\n")
    return body + "," * columns + line[len(body):]


def _logged_events(folder: Path) -> list[tuple[int, str]]:
    """(step, tag) of every value TensorBoard shows from the event files directly in ``folder``: the
    files read in its order (by name), and TensorBoard's purge rule applied (its ``EventAccumulator``'s),
    so that points an earlier resume hid are not counted: in files of version 2 (a ``SummaryWriter``'s),
    a restart marker (``SessionLog.START`` at step ``s``: ``purge_step=s``) hides every value read before
    it at step ``s`` or later; in files of no version, a value whose step goes back hides the values
    of its tag read before it at that step or later."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    events: list[tuple[int, str]] = []
    version = 0.0
    latest: int | None = None  # the step of the last value read (for files of no version)
    for file in sorted(folder.glob("*tfevents*")):
        try:
            for e in EventFileLoader(str(file)).Load():
                if e.HasField("file_version"):
                    try:
                        version = float(e.file_version.split(":")[-1])
                    except ValueError:
                        pass
                if version >= 2:
                    if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                        events = [(s, t) for s, t in events if s < e.step]
                elif e.HasField("summary") and latest is not None and e.step < latest:
                    tags = {v.tag for v in e.summary.value}
                    events = [(s, t) for s, t in events if s < e.step or t not in tags]
                if e.HasField("summary"):
                    events.extend((e.step, v.tag) for v in e.summary.value)
                    latest = e.step
        except Exception:  # noqa: BLE001 - a torn last event: what was read stands
            pass
    return events


def _last_writer(make: Any, folder: str | None) -> Any:
    """``make()``, a new ``SummaryWriter`` on ``folder``, whose event file is read after every other there.
    TensorBoard reads a folder's event files in the order of their names
    (``events.out.tfevents.SECOND.HOST.PID.N``, ``N`` counting the writers of the process): a writer made
    in the same second as an earlier one whose ``N`` has one digit more (9, then 10) sorts before it, so a
    rolled-back run's purge would be read last and hide the points written after it. Such a file (its
    header and purge marker only) is removed and the writer made again in the next second (waiting at most
    one second: a file named by a clock far ahead of this one cannot be passed)."""
    writer = make()
    name = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_file_name", None)
    if folder is None or not isinstance(name, str):
        return writer
    mine = os.path.basename(name)
    later = [f.name for f in Path(folder).glob("*tfevents*") if f.name > mine]
    if not later:
        return writer
    writer.close()
    os.unlink(name)
    seconds = [int(m.group(1)) for f in later if (m := re.search(r"tfevents\.(\d+)\.", f))]
    wait = max(seconds, default=0) + 1 - time.time()
    if wait > 0:
        time.sleep(min(wait, 1.0))
    return make()


class TensorBoardLogger(HandedLogger):
    """Writes a meta-step record's scalars to TensorBoard (needs the ``tensorboard`` package): those
    :func:`flatten_record` gives (``meta_step``, ``val_objective``, ``val_ce[k]``, ``gamma/NAME``,
    ``term/NAME``); not the training ``loss`` that :meth:`HarmonizedWeighter.step` adds to the record it
    returns (log that yourself).

    The step of every scalar is the record's ``iteration``. Given a folder, the writer (and the
    folder) is created at the first record, not before, as
    ``SummaryWriter(log_dir, purge_step=...)``, one past the iteration that record follows
    (:attr:`MetaStepRecord.follows`; a record without it: its own iteration): a run resumed from
    its checkpoint hides the events an earlier attempt logged after that iteration (steps that
    were undone), as :class:`CSVLogger` drops those rows (records of no meta step you log
    yourself stand, as there, written again where a purge hid them; a refused step's record is
    not written). A writer made again (a rollback) in a
    folder whose event files would be read after its own (TensorBoard reads them by name) is made
    in the next second. TensorBoard hides them, it deletes no
    file. Which folder a first record continues, and whether it hides anything, follows
    :class:`CSVLogger`'s rule, over the folder asked for and the ``NAME-2``, ``NAME-3``, ... beside
    it (where new runs were diverted), those with the same ``gamma/`` tags: a run diverted to
    ``tb-2`` and resumed with the folder ``tb`` continues ``tb-2`` and hides nothing of ``tb``.
    Steps hidden at a resume are named in a ``RuntimeWarning``. A
    new run on a folder holding another run's events (other loss terms or another ``prefix``,
    every one of its points at or after the first record's iteration, or a first record that two
    folders could each take) would hide or join another run: the logger then leaves the folder as it is, writes to the
    first free ``NAME-2``, ``NAME-3``, ... beside it and warns (it cannot refuse then: the
    weighter hands the record over after its step). The :attr:`writer` asked for before the first record is judged the same way: made then,
    it cannot purge, so on a folder holding events it goes to ``NAME-2`` too, with a warning.
    ``overwrite=True`` hides the old run instead. A folder that cannot be written, a file
    in its place, or a folder another live logger of this process writes to are refused when the
    logger is made. Given a writer, nothing is purged: create it with ``purge_step`` yourself when
    you resume.

    Pickled with its weighter (``torch.save((model, optimizer, weighter))``, ``copy.deepcopy``), a
    copy holds no writer: as :class:`CSVLogger`'s, it makes its own on the folder at its first
    record, judged as a resumed run's first record is, and its records are skipped with a warning
    while the logger it was copied from holds the folder. A logger given a ``SummaryWriter``
    cannot be pickled (nor can the writer): that raises a ``TypeError`` saying so.

    A record that cannot be written (a read-only folder, a full disk) is warned and skipped, never
    raised: the step stands. The writer made here is dropped with it (its thread died on the
    failure), so the next record opens a new event file and logging goes on once the folder can be
    written again; a writer you gave is kept.

    Under ``torch.distributed`` (a process group initialized with more than one process) only
    rank 0 writes: after a meta step every rank holds the same gamma (its meta-gradient is
    averaged over the ranks), so the same logger built on every rank (as a weighter's callbacks
    are) writes each row once, rank 0's (its loss terms are those of rank 0's batch), not once
    per rank into one file. The rank is read at each record, so a logger
    made before ``init_process_group`` follows it too. ``all_ranks=True`` writes on every rank:
    give each rank its own path then (e.g. ``f"log-{rank}.csv"``). The :attr:`writer` of a
    folder is never made on another rank either: asking for it there raises a ``RuntimeError``.

    :meth:`close` closes the writer and gives the folder up; a record after it takes the folder
    back with a new writer if it is free, and is skipped with a warning if another logger of this
    process now writes there (two writers on one folder would interleave two runs). A record taken
    back this way is judged as one without ``close()`` in between: one that goes back to before all
    this logger wrote is a new run (to ``NAME-2``, with a warning), one that goes back less is a
    weighter rolled back to a checkpoint (only its undone steps hidden, and named in a warning), as
    :class:`CSVLogger` does.

    Args:
        log_dir_or_writer: a log folder, or an existing ``torch.utils.tensorboard.SummaryWriter``
            (anything with ``add_scalar(tag, value, step)``).
        prefix: prepended to every tag.
        overwrite: with a folder, let a new run hide the events already there.
        all_ranks: write on every rank of a distributed run, not on rank 0 only.

    Raises:
        TypeError: ``log_dir_or_writer`` is neither a folder nor a writer, ``prefix`` is not a str,
            or ``overwrite`` or ``all_ranks`` not a bool.
        ValueError: the folder is a file, cannot be written, or another live logger of this
            process writes to it.
        ImportError: a folder is given and ``tensorboard`` is not installed.
    """

    def __init__(self, log_dir_or_writer: Any, prefix: str = "metaweight/", *, overwrite: bool = False,
                 all_ranks: bool = False) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` should be a str. Found {prefix!r}.")
        _check_flag(overwrite, "overwrite")
        _check_flag(all_ranks, "all_ranks")
        self.all_ranks = all_ranks
        self._log_dir: str | None = None
        self._writer: Any = None
        self._judge = False  # whether the folder's old events are yet to be judged (at the first writer)
        self._floor: int | None = None  # the first step the folder written to shows (its old run's, or ours)
        self._last_step: int | None = None  # the last step this logger wrote
        self._shown: set[int] = set()  # the steps its folder shows, as far as this logger knows (to say what it hides)
        self._plain_points: dict[int, dict[str, float]] = {}  # the values of the entries of _recent of no meta step
        self.overwrite = overwrite
        if isinstance(log_dir_or_writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (fail here, not at the first record)
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from exc
            folder = user_path(log_dir_or_writer, "log_dir_or_writer")
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"`log_dir_or_writer` {folder} is a file, not a folder. Pass a folder for the "
                                 f"event files.")
            if folder.is_dir():
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise ValueError(f"`log_dir_or_writer` {folder} cannot be written: no write permission. Pass "
                                     f"a folder you can write to.")
                _check_creates_files(folder, folder, "log_dir_or_writer")
                self._judge = not overwrite
            else:
                _check_can_create(folder, "log_dir_or_writer")
            _hold(folder, self)
            self._log_dir = str(folder)  # the folder is created with the writer, at the first record
        elif callable(getattr(log_dir_or_writer, "add_scalar", None)):
            self._writer = log_dir_or_writer
        else:
            raise TypeError(f"`log_dir_or_writer` should be a log folder (str or Path) or a SummaryWriter. Found "
                            f"`{type(log_dir_or_writer).__name__}`.")
        self.prefix = prefix

    @property
    def log_dir(self) -> str | None:
        """The folder written to (``None`` for a writer given); another one than asked for if a new run
        was kept away from an old one."""
        return self._log_dir

    def close(self) -> None:
        """Close the writer made here, and give the folder up for another logger of this process. A
        record after this takes the folder back (with a new writer) if no other logger holds it, and is
        skipped with a warning if one does, as :class:`CSVLogger` does. Calling it again does nothing;
        it never raises: a writer whose folder was deleted cannot flush its last points, and a
        ``RuntimeWarning`` says so."""
        if self._log_dir is not None:
            failed = self._drop_writer()  # a closed SummaryWriter would open a new event file at its next scalar
            _release(Path(self._log_dir), self)
            if failed is not None:
                warn_user(f"The TensorBoardLogger's writer on {self._log_dir} could not be closed ({failed}): "
                          f"{self._gone() or 'its event file could not be written'}, so the points it held "
                          f"unwritten are lost. The logger is closed.")

    def _as_copy(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy (pickled with its weighter, a whole-object checkpoint, and resumed; ``copy.deepcopy``)
        holds no writer (a ``SummaryWriter`` holds a thread and an open event file: pickle refused the
        weighter, ``cannot pickle '_thread.lock' object``). As :class:`CSVLogger`'s, it starts as a logger
        that has not written, continuing its folder: its first record makes a new writer, judged against
        the folder's events as they are then (as a resumed run's first record is), where the original may
        have logged steps undone since, or a whole run (a template copied when built). A copy never
        overwrites: its ``overwrite`` is spent.

        Raises:
            TypeError: the logger was given a writer that cannot be pickled (a ``SummaryWriter``): a copy
                could not write where the original does.
        """
        if self._log_dir is None:
            why = _pickles(self._writer)
            if why is not None:
                raise TypeError(f"This TensorBoardLogger writes with a writer you gave it "
                                f"(`{type(self._writer).__name__}`), which cannot be pickled ({why}), so neither "
                                f"can a weighter it is a callback of (torch.save((model, optimizer, weighter)), "
                                f"copy.deepcopy). Give the logger a folder instead, "
                                f"TensorBoardLogger(writer.log_dir): a copy then makes its own writer there and "
                                f"resumes the run; or save weighter.state_dict(), the weighter's checkpoint.")
            return state
        if state.get("_writer") is None and state.get("_last_step") is None:  # (it has not written: the original
            # may write the folder before the copy does, a template copied when built: judged at its first record)
            return {**state, "_judge": True, "overwrite": False}  # (nor overwritten by a copy)
        return self._unwritten(state, _writer=None, _floor=None, _shown=set(), _plain_points={}, _judge=True)

    def _drop_writer(self) -> str | None:
        """Close and forget the writer made here (if any); what failed in closing it, as text, or ``None``.
        Never raises: a writer whose folder was deleted fails to flush (its thread died on it)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return None
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - reported by the caller; the writer is gone either way
            return f"{type(exc).__name__}: {exc}"
        return None

    def _gone(self) -> str | None:
        """What was deleted of what this logger wrote: its folder, or the event file its writer writes
        to (``None``: nothing, or nothing written yet)."""
        if self._log_dir is None or self._last_step is None:
            return None
        if not os.path.isdir(self._log_dir):
            return f"the folder {self._log_dir} was deleted"
        file = getattr(getattr(getattr(self._writer, "file_writer", None), "event_writer", None), "_file_name", None)
        if isinstance(file, str) and not os.path.exists(file):
            return f"its event file {file} was deleted"
        return None

    def _take_back(self) -> bool:
        """Whether this logger may write to its folder: it holds it, or takes it back after close()."""
        if self._log_dir is None:
            return True
        folder = Path(self._log_dir)
        if _holder(folder) is self:
            return True
        if _holder(folder) is not None:
            return False
        _hold(folder, self)
        self._copied = False
        return True

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``: the one given, or the one made on ``log_dir`` at the first record.
        Asked for before any record, it is made here without ``purge_step``; if the folder holds
        events already, that cannot be told from a new run, so the run goes to ``NAME-2``, ... as a
        new run's first record does, with a warning (log the first record first to resume there).

        Raises:
            RuntimeError: the writer would be made here on a rank other than 0 of a distributed
                run (only rank 0 writes, unless ``all_ranks``), or this logger was closed and
                another logger of this process now writes to its folder.
        """
        if self._log_dir is not None:
            rank = None if self.all_ranks else other_rank()
            if rank is not None:
                raise RuntimeError(f"This TensorBoardLogger writes on rank 0 only, and this is rank {rank}: its "
                                   f"writer would create files in {self._log_dir} here. Use it on rank 0 "
                                   f"(`if dist.get_rank() == 0:`), or pass all_ranks=True with a folder per rank.")
            if not self._take_back():
                raise RuntimeError(f"{self._held_elsewhere(self._log_dir)}. Use that logger's writer.")
        return self._writer_from(None)

    def _writer_from(self, step: int | None, terms: set[str] | None = None, cut: int | None = None,
                     restored: bool = False) -> Any:
        """The writer; made here if there is none, as ``SummaryWriter(log_dir, purge_step=...)`` with the
        first record's ``step`` (``None``: asked for before any record), its ``gamma/`` tags and the first
        step it says is undone (``cut``, :func:`_undone_from`; ``step`` if not given)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = step if cut is None else cut
            if self._judge:
                purge_step = self._plan_first(step, terms or set(), purge_step, restored)
                self._judge = False  # judged once: the folder now holds this run (taken back after close())
            self._writer = _last_writer(lambda: SummaryWriter(self._log_dir, purge_step=purge_step), self._log_dir)
        return self._writer

    def _plan_first(self, step: int | None, terms: set[str], cut: int | None = None, restored: bool = False
                    ) -> int | None:
        """Which folder this run writes to, by :class:`CSVLogger`'s rule (:func:`_continued_log`) over
        the folder asked for and the ``NAME-2``, ``NAME-3``, ... beside it, and the ``purge_step`` to
        make its writer with (``cut``: the first step the record says is undone); moves :attr:`log_dir`
        there and warns as it says."""
        old = Path(self._log_dir)  # type: ignore[arg-type]
        events = _logged_events(old)
        cut = step if cut is None else cut
        if not events:
            return cut
        steps = [s for s, _ in events]
        seen = f"The TensorBoard folder {old} holds a run logged at steps {min(steps)} to {max(steps)}, and "
        if step is None:  # the writer asked for before any record: cannot purge
            return self._divert(old, seen + (
                f"this TensorBoardLogger's writer was asked for before its first record, so it cannot tell a run "
                f"resumed from its checkpoint (whose first record hides the steps undone) from a new run, and "
                f"would mix this run into it. To resume in {old}, log the first record before asking for the "
                f"writer."))

        def gammas(tags: set[str]) -> set[str]:
            return {t for t in tags if t.startswith(self.prefix + "gamma/")}

        logs: list[tuple[Path, list[int]]] = []
        same_terms = gammas({t for _, t in events}) == terms
        if same_terms:
            logs.append((old, steps))
        for folder in _siblings(old, "", folders=True):
            if _holder(folder) in (None, self):
                found = _logged_events(folder)
                if found and gammas({t for _, t in found}) == terms:
                    logs.append((folder, [s for s, _ in found]))
        as_floats = [[float(s) for s in s_] for _, s_ in logs]
        chosen, resumed, resumable = _continued_log(step, [(f == old, s_) for (f, _), s_ in zip(logs, as_floats)],
                                                    cut, restored)
        if chosen is None:
            if not same_terms:
                why = self._other_terms(events, terms)
            elif not resumable:
                why = (f"this run's first record is {_following(step, cut).replace('iteration', 'step')}: it "
                       f"would hide that whole run, so this is a new run, not one resumed from a checkpoint.")
            else:
                named = _candidates_said(cut, [(logs[i][0], as_floats[i]) for i in resumable], "step")
                why = (f"this run's first record is step {step}, and the folders {named} could each be this run's "
                       f"(continued, or resumed from a checkpoint): writing to one would put this run's points "
                       f"into another run, so none is continued and none is hidden (a folder is continued only "
                       f"when exactly one can be this run's).")
            return self._divert(old, seen + why)
        folder, logged = logs[chosen]
        self._floor = min(logged) if logged else None
        self._shown = {s for s in logged if s < cut} if resumed else set(logged)
        hidden = sorted({s for s in logged if s >= cut}) if resumed else []
        said = (f" hiding from view the points of its {len(hidden)} step{'s' if len(hidden) > 1 else ''} "
                f"{hidden[0]} to {hidden[-1]} (taken after that checkpoint, undone; TensorBoard's purge_step: no "
                f"event file is deleted, they are only hidden)"
                if hidden else "")
        if folder != old:
            _release(old, self)
            _hold(folder, self)
            self._log_dir = str(folder)
            warn_user(f"The TensorBoard folder {old} is not this run's continuation (its steps or loss terms do not "
                      f"lead to step {step}), but {folder}, where a new run on {old} was diverted, "
                      f"{'holds steps before and after it' if resumed else 'leads to it'}: taken for that run "
                      f"resumed, this run continues {folder}{',' if said else ''}{said}. {old} was left as it is.")
        elif hidden:
            warn_user(f"The TensorBoard folder {folder} holds steps up to {hidden[-1]}, and this run's first record "
                      f"is {_following(step, cut).replace('iteration', 'step')}: taken for a run resumed from its "
                      f"checkpoint, this run continues it,{said}. "
                      f"If this is a new run, not a resumed one, those points were another run's: give each new "
                      f"run a folder of its own (or overwrite=True) to keep a run's points whole.")
        return cut if resumed else None

    def _other_terms(self, events: list[tuple[int, str]], terms: set[str]) -> str:
        """Why a folder's events are another run's: what differs, its loss terms or only the tags' prefix."""
        def split(tag: str) -> tuple[str, str] | None:  # (prefix, term) of a gamma tag
            at = tag.find("gamma/")
            return None if at < 0 else (tag[:at], tag[at + len("gamma/"):])

        theirs = {p for p in map(split, {t for _, t in events}) if p is not None}
        ours = {p for p in map(split, terms) if p is not None}
        their_terms, our_terms = sorted({t for _, t in theirs}), sorted({t for _, t in ours})
        their_prefixes = sorted({p for p, _ in theirs})
        if their_terms == our_terms and their_prefixes != [self.prefix]:
            return (f"its tags are under the prefix {', '.join(map(repr, their_prefixes))}, and this run's under "
                    f"{self.prefix!r} (the same loss terms {our_terms}): its points and this run's would show as "
                    f"separate charts. To continue that run, pass prefix={their_prefixes[0]!r}.")
        return (f"its loss terms ({their_terms or 'none'}) are not this run's ({our_terms}): another run; "
                f"logging here would mix them.")

    def _divert(self, old: Path, why: str) -> None:
        """Move this run to the first free ``NAME-2``, ``NAME-3``, ... beside ``old``, with a warning."""
        new = _fresh(old)
        _release(old, self)
        _hold(new, self)
        self._log_dir = str(new)
        warn_user(f"{why} The folder was left as it is; this run logs to {new} instead. Pass overwrite=True to "
                  f"hide the old run, or a folder of its own.")

    def __call__(self, record: dict[str, Any]) -> None:
        _write_standing(self, record, "", "record")

    def _record(self, record: dict[str, Any]) -> None:
        if _refused(record):
            return
        flat = flatten_record(record)
        step = int(flat.pop("iteration"))
        undone_from, restored = _undone_from(record, step)
        cut = int(undone_from)
        if not self._take_back():
            warn_user(f"{self._held_elsewhere(self._log_dir)}: "
                      f"iteration {step} was not logged by it.")
            return
        terms = {self.prefix + tag for tag in flat if tag.startswith("gamma/")}
        gone = self._gone()
        if gone is not None:  # deleted while this logger wrote there: a new writer starts it again
            self._drop_writer()  # (whatever it held unwritten is lost with the folder)
            self._shown = set()
        fresh = self._last_step is None or gone is not None
        stands = self._stands(cut, step)  # (CSVLogger's rule: your own step() records of no meta step stand)
        back = _went_back(self._last_step, self._floor, cut, bool(stands) or restored or self._own_rows(record)) \
            if self._log_dir is not None and self._goes_back(cut, step, stands) else None
        hidden: list[int] = []
        purge = cut  # (TensorBoard hides every point from the purge step on)
        if back is not None:  # went back in this process, closed in between or not: CSVLogger's rule
            old = Path(self._log_dir)  # type: ignore[arg-type]
            self._drop_writer()  # the new writer purges the undone steps from view
            if back == "new run":  # every point would be hidden
                self._divert(old, f"This TensorBoardLogger logged steps {self._floor} to {self._last_step} to "
                                  f"{old} and now gets {_following(step, cut).replace('iteration', 'step')}: every "
                                  f"point would be hidden as undone, so this "
                                  f"is a new run (e.g. a new weighter counting from 1 with the same logger), not a "
                                  f"weighter rolled back to a checkpoint.")
                self._floor = None
                self._shown = set()
                fresh = True
            else:  # rolled back to a checkpoint: a new writer purges the undone steps from view
                purge = min([s for s in self._shown if s >= cut and s not in stands], default=cut)
                hidden = sorted(s for s in self._shown if s >= purge and s not in stands)
        # the points of your own step() records of no meta step that stand but the purge hides, written again
        again = sorted(s for s in stands if s >= purge and s in self._plain_points) if back is not None else []
        writer = self._writer_from(step, terms, purge, restored)  # the first step undone: where a resumed run goes on
        try:
            for s in again:
                for tag, value in self._plain_points[s].items():
                    writer.add_scalar(self.prefix + tag, value, s)
            for tag, value in flat.items():
                writer.add_scalar(self.prefix + tag, value, step)
            if self._log_dir is not None:  # on disk before the hook returns: a failure is warned here, not in
                writer.flush()  # the writer's thread (which dies on it), and a folder deleted later loses nothing held
        except Exception:
            if self._log_dir is not None:  # its thread died on the failure: a new writer takes the next record
                self._drop_writer()  # (a writer given by the user is kept: it is theirs)
            raise
        self._floor = step if self._floor is None else min(self._floor, step)
        self._last_step = step
        self._wrote()
        if back is not None or fresh:  # a new writer, purging from purge on
            self._shown = {s for s in self._shown if s < purge} | set(again) | {step}
        else:
            self._shown.add(step)
        known = _follows_known(record)
        standing = stands if back is None else {s for s in stands if s < purge} | set(again)  # (none purged: all)
        self._keep_track(step, cut, standing, fresh, known)
        plain = {s for s, is_plain in self._recent if is_plain}
        self._plain_points = {s: v for s, v in self._plain_points.items() if s in plain}
        if not known:
            self._plain_points[step] = flat
        if gone is not None:  # said once the record is written, as CSVLogger says a deleted log starts again
            warn_user(f"While this TensorBoardLogger wrote to {self._log_dir}, {gone}: it starts again at step "
                      f"{step} with a new event file; the points logged before are not in it.")
        if hidden:  # said once the record is written, as CSVLogger says what it drops
            warn_user(f"This TensorBoardLogger logged up to step {hidden[-1]} to {self._log_dir} and now gets "
                      f"{_following(step, cut).replace('iteration', 'step')}: {_why_undone(record)}, the points of its "
                      f"{_rows(len(hidden), 'step')} {_span(hidden, '')} (undone) are hidden from view "
                      f"(TensorBoard's purge_step: no event file is deleted). If this is a new run, give it a logger "
                      f"of its own.")
