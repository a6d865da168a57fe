"""Logging hooks: a weighter or weighting calls each callback with a record after every meta step."""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

from metaweight._checks import check_flag
from metaweight._files import file_mode, write_target
from metaweight._warn import warn_user


def flatten_record(record: dict[str, Any]) -> dict[str, float]:
    """A meta-step record as flat scalars: ``gamma/ce[1]``, ``term/kd[2->1]``, ``val_ce[1]``, ..."""
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


def _step_of(line: str) -> float | None:
    """The iteration a logged CSV row reports (its first column), or ``None`` if it cannot be read."""
    try:
        return float(next(csv.reader([line]))[0])
    except (StopIteration, IndexError, ValueError):
        return None


def _before(lines: list[str], step: float) -> list[str]:
    """The rows logged before ``step``; a row whose step cannot be read is kept, not ours to judge."""
    return [line for line in lines if (s := _step_of(line)) is None or s < step]


def _read_log(path: Path) -> tuple[list[str] | None, list[str], bool]:
    """A log's header, its complete rows (raw lines, blank lines left out: nothing to keep) and whether
    its last line was torn. Raises ``UnicodeDecodeError`` for a file that is not text."""
    with path.open(newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")
    if torn:
        lines.pop()
    lines = [line for line in lines if line.strip()]
    if not lines:
        return None, [], torn
    return next(csv.reader([lines[0]]), []), lines[1:], torn


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
                         f"log would each write every row. Use that logger, call its close() (or drop the weighter "
                         f"holding it) first, or log to another path.")
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


def _new_run_id() -> str:
    return uuid.uuid4().hex


def _csv_sidecar(path: Path) -> Path:
    """Where a CSV log's run identity is kept: ``.NAME.csv.metaweight`` beside it (the CSV stays plain)."""
    return path.with_name(f".{path.name}.metaweight")


def _tb_sidecar(folder: Path) -> Path:
    """Where a TensorBoard folder's run identity is kept: a file inside it."""
    return folder / "metaweight-run.json"


def _run_of(sidecar: Path) -> str | None:
    """The run id a log's sidecar names; ``None`` without one (a log of an older version, or not ours)."""
    try:
        found = json.loads(sidecar.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _claim(sidecar: Path, run_id: str) -> None:
    """Name ``run_id`` as the run of the log beside ``sidecar`` (a temporary file, then ``os.replace``)."""
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=sidecar.name, suffix=".tmp", dir=sidecar.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"run_id": run_id}, f)
        os.replace(tmp, sidecar)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _steps_said(steps: list[float], unit: str) -> str:
    """``"the 3 rows of iterations 6 to 96"``-like words for the steps a warning names."""
    if len(steps) == 1:
        return f"{unit} {steps[0]:g}"
    return f"{len(steps)} {unit}s {min(steps):g} to {max(steps):g}"


def _undone(steps: list[float], last_step: float | None, step: float) -> list[float]:
    """The steps of a run's own log undone at a resume: those after the checkpoint's last logged step
    (all of them when the checkpoint was taken before any record) or at or after the first record."""
    return sorted({s for s in steps if (last_step is None or s > last_step) or s >= step})


def _check_logger_state(owner: Any, state: Any, key: str) -> None:
    """Refuse a logger state that is not ``type(owner).state_dict()``'s, changing nothing."""
    name = type(owner).__name__
    if not isinstance(state, dict):
        raise TypeError(f"`state_dict` should be a dict from {name}.state_dict(). Found `{type(state).__name__}`.")
    missing = [k for k in ("logger", "run_id", key, "last_step") if k not in state]
    if missing:
        raise ValueError(f"This state lacks {missing}: it is not a {name}.state_dict() (keys found: "
                         f"{sorted(state)}). Nothing was changed.")
    if state["logger"] != name:
        raise ValueError(f"This state is a {state['logger']}'s, not a {name}'s. Nothing was changed.")
    if not isinstance(state["run_id"], str) or not state["run_id"]:
        raise ValueError(f"The state's run_id should be a non-empty str. Found {state['run_id']!r}.")
    if state[key] is not None and not isinstance(state[key], str):
        raise ValueError(f"The state's {key} should be a str or None. Found {state[key]!r}.")
    last = state["last_step"]
    if last is not None and (isinstance(last, bool) or not isinstance(last, (int, float))):
        raise ValueError(f"The state's last_step should be a number or None. Found {last!r}.")


def _went_back(last_step: float | None, first_logged: float | None, step: float) -> str | None:
    """The one rule both loggers follow at a record after their first, closed or not in between:
    whether ``step`` goes back in the log this logger wrote (its last step ``last_step``, its first
    ``first_logged``). ``None``: it does not (the record is appended); ``"rolled back"``: a weighter
    rolled back to a checkpoint, the steps at or after ``step`` are undone; ``"new run"``: every step
    logged would go (e.g. a new weighter counting from 1 with the same logger), so the record goes to a
    new log, the old one kept whole. Whether a writer is open at that moment plays no part."""
    if last_step is None or step > last_step:
        return None
    if first_logged is not None and first_logged >= step:
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


class CSVLogger:
    """Writes one row per meta step to a CSV file, with one header; resumes where the run resumes.

    The column ``iteration`` is the step. Which log a run writes is known by the run's identity,
    never guessed from the steps a file holds: every logger is a run with a run id, named in a
    small file beside its log (``.NAME.csv.metaweight``, JSON; the CSV itself stays plain), and
    :meth:`state_dict` holds that id, the log written and the last iteration logged. A weighter's
    ``state_dict()`` carries the state of the loggers among its callbacks and its
    ``load_state_dict()`` gives it back, so a checkpoint saved with ``save_checkpoint`` and loaded
    with ``load_checkpoint`` resumes the log too:

    * a resumed run (its state restored, before its next record) continues its own log under the
      header it has, as TensorBoard's ``SummaryWriter(purge_step=...)`` continues an event log:
      the rows logged after its checkpoint (steps undone) are dropped, with a ``RuntimeWarning``
      that names them (a run that logged iterations 1-5 and resumes from its checkpoint at 3
      logs 4 and 5 again: the file holds 1-5 once); a record whose iteration is not past the last
      row, in the same process, is a weighter rolled back: the rows at or after it go, named in a
      warning too;
    * a logger with nothing restored is a new run: on a path that holds a log already (another
      run's, or one without a run id, made by an older version or by hand) it writes to the
      first free ``NAME-2.csv``, ``NAME-3.csv``, ... beside it instead, with a warning, never
      into that log nor truncating it (``overwrite=True`` starts the file afresh instead); a
      resumed run whose log now holds another run (or is held by another logger of this process)
      goes beside it the same way;
    * a last line without its newline is what a crash (or a disk full) in the middle of a write
      leaves: an incomplete record, dropped before the next row is written, at any record.

    Only rows whose iteration can be read are dropped (a blank line, or a row edited by hand, is
    kept as it is; blank lines are left out when the file is rewritten).

    What the file alone tells is judged here, when the logger is made, and refused with a
    ``ValueError`` that changes nothing: a folder, a path that cannot be written, a file that is
    not a metaweight log (not UTF-8 text, or its first columns are not ``iteration,meta_step``), a
    path another live logger of this process writes to. Where the run goes is decided at the first
    record, which a weighter hands over after its step has been taken: a hook must not raise then
    (the step stands; a retry would take it twice), and no log may be lost, so a run kept away
    from a log warns and shows the new path in :attr:`path`. The same holds for one logger handed
    to a new weighter, whose iterations count from 1 again: every row would be dropped, so the new
    run (with a new run id) goes to ``NAME-2.csv``, with a warning.

    A record with columns the header lacks (loss terms first logged at a later step, as a
    weighting's ``meta_step`` without ``loss()`` has none) widens the header, whether it is this
    logger's first record (a resumed run) or a later one: the file is rewritten with the new
    columns after the others, earlier rows blank there. A record without
    some columns leaves them blank. A file deleted (or emptied) while the logger writes to it
    starts again with its header, with a warning. Nothing a logger meets after the step raises
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
    weighter calls its hooks only for meta steps that stand. :meth:`close` gives the path up
    for another logger of this process.

    Args:
        path: the CSV file; created (with its folder) at the first record.
        overwrite: a new run (nothing restored) starts the file at ``path`` afresh at its first record
            instead of going beside an existing log; a resumed run continues its own log either way.
        all_ranks: write on every rank of a distributed run, not on rank 0 only.

    Raises:
        TypeError: ``path`` is not a str or Path, or ``overwrite`` or ``all_ranks`` not a bool.
        ValueError: ``path`` is a folder, cannot be written, is not a metaweight log (unless
            ``overwrite``), is a symbolic link into a folder that does not exist, or another live
            logger of this process writes to it.

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

    def __init__(self, path: str | Path, *, overwrite: bool = False, all_ranks: bool = False) -> None:
        if not isinstance(path, (str, Path)) or not str(path):
            raise TypeError(f"`path` should be a file path (str or Path). Found {path!r}.")
        _check_flag(overwrite, "overwrite")
        _check_flag(all_ranks, "all_ranks")
        self.all_ranks = all_ranks
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"`path` {path} is a folder; pass a file path in it, such as {path / 'log.csv'}.")
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
            header, _, _ = (None, [], False) if overwrite else self._existing()
        except UnicodeDecodeError as exc:
            raise ValueError(f"`path` {path} holds a file that is not text ({exc.reason} at byte {exc.start}: not "
                             f"UTF-8; a compressed log or an image?), so not a metaweight log; nothing was changed. "
                             f"Log to another path, or pass overwrite=True to replace it.") from None
        if header is not None and header[:2] != ["iteration", "meta_step"]:
            raise ValueError(f"`path` {path} holds a CSV with the columns {header[:6]}, not a metaweight log (its "
                             f"first columns are iteration,meta_step); nothing was changed. Log to another path, "
                             f"or pass overwrite=True to replace it.")
        _hold(path, self)
        self._asked = path  # the path asked for; :attr:`path` is the one written to
        self._fields: list[str] | None = None
        self._last_step: float | None = None  # the iteration of the last row this logger wrote
        self._run_id = _new_run_id()  # this run's identity, named beside every log it writes
        self._restored: dict[str, Any] | None = None  # a state to resume from, applied at the next record

    def close(self) -> None:
        """Give the path up, so that another logger of this process may write to it."""
        _release(self.path, self)

    def state_dict(self) -> dict[str, Any]:
        """This run's identity and the log it writes: ``{"logger", "run_id", "path", "last_step"}``
        (``path`` ``None`` before the first record). A weighter's ``state_dict()`` carries it for the
        loggers among its callbacks, so a checkpoint knows its run's log."""
        if self._restored is not None:  # not applied yet: still this state
            return dict(self._restored)
        return {"logger": type(self).__name__, "run_id": self._run_id,
                "path": None if self._fields is None else str(self.path), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the run of :meth:`state_dict`: its next record continues that run's own log (found by
        its run id), dropping only the rows logged after the checkpoint, with a warning naming them;
        never another run's log. Checked first: a wrong state raises and changes nothing."""
        self._check_state(state_dict)
        self._restored = dict(state_dict)

    def _check_state(self, state_dict: Any) -> None:
        _check_logger_state(self, state_dict, "path")

    def _existing(self) -> tuple[list[str] | None, list[str], bool]:
        """The file's header, its complete rows (raw lines) and whether its last line was torn."""
        if not self.path.is_file():
            return None, [], False
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
        row = flatten_record(record)
        step = float(row["iteration"])
        if _holder(self.path) is not self:  # closed: take the path back, unless another logger has it
            if _holder(self.path) is not None:
                warn_user(f"This CSVLogger was closed and another logger now writes to {self.path}: iteration "
                          f"{step:g} was not logged by it.")
                return
            _hold(self.path, self)
        # A transaction: the new state (path, columns, last step) and the warnings are worked out first,
        # the file is written, and only then is the state kept and the warnings given; a write that
        # fails leaves the logger as it was, so the next row is judged against the file as it is.
        path, fields, kept, notes, run_id = self._plan(row, step)
        if path != self.path:
            _hold(path, self)
        sidecar = _csv_sidecar(write_target(path))
        claimed = False
        try:
            if kept is None:  # only ever on this run's own log, the path this logger holds
                self._append(fields, row)
            else:
                if _run_of(sidecar) != run_id:  # named before the rows go in: a log is never left without
                    _claim(sidecar, run_id)
                    claimed = True
                self._rewrite(fields, kept, row, path)
        except BaseException:
            if claimed and not path.exists():
                sidecar.unlink(missing_ok=True)
            if path != self.path:
                _release(path, self)
            raise
        if path != self.path:
            _release(self.path, self)
            self.path = path
        self._fields, self._last_step, self._run_id, self._restored = fields, step, run_id, None
        for note in notes:
            warn_user(note)

    def _plan(self, row: dict[str, float], step: float
              ) -> tuple[Path, list[str], list[str] | None, list[str], str]:
        """Where ``row`` goes, under which columns, the complete rows kept before it (``None``: append to
        the file as it is), the warnings to give once it is written and the run id the log is named
        for. Changes nothing."""
        fields = list(row)
        path = self.path
        if self._fields is None or self._restored is not None:  # a first record, or one resumed
            return self._plan_first(fields, step)
        size, torn = _tail(path)
        if not size:  # deleted or emptied while this logger writes to it
            if not path.parent.is_dir():
                raise FileNotFoundError(f"its folder {path.parent} is gone")
            return path, _widened(self._fields, fields), [], [
                f"The log {path} was deleted or emptied while this CSVLogger wrote to it: it starts again at "
                f"iteration {step:g}, with its header; the rows before are not in it."], self._run_id
        columns = _widened(self._fields, fields)
        extra = len(columns) - len(self._fields)
        went_back = self._last_step is not None and step <= self._last_step
        if not (went_back or extra or torn):
            return path, columns, None, [], self._run_id  # the common case: appended, the file not read
        _, lines, _ = self._existing()  # a torn last line (a failed append) is left out of ``lines``
        if went_back:  # in this process
            kept = _before(lines, step)
            logged = _readable(lines)
            if _went_back(self._last_step, min(logged, default=None), step) == "new run":
                new = _fresh(path, path.suffix)
                return new, fields, [], [
                    f"This CSVLogger logged iterations {min(logged):g} to {max(logged):g} to {path} and now gets "
                    f"iteration {step:g}: every row would be dropped as undone, so this is a new run (e.g. a new "
                    f"weighter counting from 1 with the same logger), not a weighter rolled back to a checkpoint. "
                    f"{_diverted(path, new)}"], _new_run_id()
            dropped = sorted(s for s in logged if s >= step)
            notes = [f"This CSVLogger logged up to iteration {self._last_step:g} to {path} and now gets iteration "
                     f"{step:g}: taken for a weighter rolled back to a checkpoint, the "
                     f"{_steps_said(dropped, 'row')} (steps undone) were dropped."] if dropped else []
            return path, columns, [_pad(line, extra) for line in kept], notes, self._run_id
        return path, columns, [_pad(line, extra) for line in lines], [], self._run_id  # widened / torn dropped

    def _plan_first(self, fields: list[str], step: float
                    ) -> tuple[Path, list[str], list[str] | None, list[str], str]:
        """:meth:`_plan` for a first record, or the first after :meth:`load_state_dict`: a resumed run
        continues its own log, known by its run id, never another run's; a new run writes to the path
        asked for unless a log is there already."""
        asked = self._asked
        restored = self._restored
        if restored is None:
            run_id = self._run_id
            if self.overwrite or _read_header(asked) is None:
                return asked, fields, [], [], run_id
            why = (f"The log {asked} is {_whose(_run_of(_csv_sidecar(asked)))}, and this CSVLogger starts a new run "
                   f"(nothing restored by load_state_dict(), as a weighter's load_state_dict() does for its "
                   f"callbacks).")
            new = _fresh(asked, asked.suffix)
            return new, fields, [], [f"{why} {_diverted(asked, new)}"], run_id
        run_id, last = restored["run_id"], restored["last_step"]
        own = Path(restored["path"]) if restored["path"] is not None else next(
            (f for f in [asked, *_siblings(asked)] if _run_of(_csv_sidecar(write_target(f))) == run_id), None)
        if own is None:  # the checkpoint was taken before any record, and none was written after it
            if _read_header(asked) is None:
                return asked, fields, [], [], run_id
            new = _fresh(asked, asked.suffix)
            return new, fields, [], [f"The log {asked} is {_whose(_run_of(_csv_sidecar(asked)))}, not this resumed "
                                     f"run's. {_diverted(asked, new)}"], run_id
        held = _holder(own) not in (None, self)
        if not held and own.is_file() and _run_of(_csv_sidecar(write_target(own))) == run_id:
            header, lines, torn = _read_log(own)
            if header is None:
                return own, fields, [], [], run_id
            columns = _widened(header, fields)
            extra = len(columns) - len(header)
            dropped = _undone(_readable(lines), last, step)
            if not dropped and not torn and not extra and own == self.path and self._fields is not None:
                return own, columns, None, [], run_id
            kept = [line for line in lines if (s := _step_of(line)) is None or s not in dropped]
            notes = [f"The log {own} is this run's (run id {run_id}); resumed from its checkpoint (last row "
                     f"{'none' if last is None else format(last, 'g')}), it drops the "
                     f"{_steps_said(dropped, 'row')} logged after it (steps undone) and continues at iteration "
                     f"{step:g}."] if dropped else []
            return own, columns, [_pad(line, extra) for line in kept], notes, run_id
        if not held and not own.exists():
            return own, fields, [], [f"This resumed run's log {own} is not there (deleted or moved?): it starts "
                                     f"again at iteration {step:g}; the rows before are not in it."], run_id
        new = _fresh(own, own.suffix)
        whose = "held by another logger of this process" if held else _whose(_run_of(_csv_sidecar(own)))
        return new, fields, [], [f"This resumed run's log {own} is {whose}, not this run's (run id {run_id}). "
                                 f"{_diverted(own, new)}"], run_id

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


def _diverted(old: Path, new: Path) -> str:
    return (f"The old log {old} was left as it is; this run logs to {new} instead. Pass overwrite=True to "
            f"replace the old log, or a path of its own.")


def _read_header(path: Path) -> list[str] | None:
    """The header of the log at ``path``; ``None`` when there is no log there (no file, or an empty one)."""
    if not path.is_file():
        return None
    try:
        return _read_log(path)[0]
    except (OSError, UnicodeDecodeError):
        return ["?"]  # something is there that is not ours to judge: kept


def _whose(run_id: str | None) -> str:
    return (f"another run's (run id {run_id})" if run_id is not None
            else "a log without a run id (another run's, or made by an older version)")


def _pad(line: str, columns: int) -> str:
    """A logged row with ``columns`` empty values added at its end (columns added after it was logged)."""
    if not columns:
        return line
    body = line.rstrip("\r\n")
    return body + "," * columns + line[len(body):]


def _logged_events(folder: Path) -> list[tuple[int, str]]:
    """(step, tag) of every value the event files directly in ``folder`` show: a writer made with
    ``purge_step`` (its ``SessionLog.START`` event) hides the events before it at or after that step,
    as TensorBoard does, so points hidden already are not counted again."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    events: list[tuple[int, str]] = []
    for file in sorted(folder.glob("*tfevents*")):
        try:
            for e in EventFileLoader(str(file)).Load():
                if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                    events = [(s, t) for s, t in events if s < e.step]
                elif e.HasField("summary"):
                    events.extend((e.step, v.tag) for v in e.summary.value)
        except Exception:  # noqa: BLE001 - a torn last event: what was read stands
            pass
    return events


def _has_events(folder: Path) -> bool:
    """Whether ``folder`` holds a run's log: events, or a run id named in it."""
    return folder.is_dir() and (any(folder.glob("*tfevents*")) or _tb_sidecar(folder).exists())


def _logged_steps(folder: Path) -> list[int]:
    """The steps of the scalars the event files directly in ``folder`` hold."""
    return [step for step, _ in _logged_events(folder)]


class TensorBoardLogger:
    """Writes every scalar of a meta-step record to TensorBoard (needs the ``tensorboard`` package).

    The step of every scalar is the record's ``iteration``. Given a folder, the writer (and the
    folder) is created at the first record, not before. Which folder a run writes is known by its
    identity, as :class:`CSVLogger`'s log is: the run id is named in ``metaweight-run.json``
    inside the folder (TensorBoard reads only event files), and :meth:`state_dict` (carried by a
    weighter's ``state_dict()``) holds it with the folder written and the last step logged. A run
    resumed from its checkpoint (its state restored) continues its own folder as
    ``SummaryWriter(log_dir, purge_step=...)``, hiding the points it logged after that checkpoint
    (steps undone), named in a ``RuntimeWarning`` (only points still shown are counted: those an
    earlier resume hid are not named again); TensorBoard hides them, it deletes no file. A logger
    with nothing restored is a new run: on a folder holding a log already (another run's, or one
    without a run id, made by an older version) it leaves the folder as it is, writes to the first
    free ``NAME-2``, ``NAME-3``, ... beside it and warns (it cannot refuse then: the weighter hands
    the record over after its step). The :attr:`writer` asked for before the first record is
    judged the same way (a resumed run's purges after its checkpoint's last step).
    ``overwrite=True`` lets a new run hide the old run instead. A folder that cannot be written, a
    file in its place, or a folder another live logger of this process writes to are refused when
    the logger is made. Given a writer, nothing is purged: create it with ``purge_step`` yourself
    when you resume.

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
    weighter rolled back to a checkpoint (only its undone steps hidden, named in a warning), as
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
        self._asked_dir: Path | None = None
        self._planned = False  # whether the folder this run writes to was chosen (at the first writer)
        self._run_id = _new_run_id()  # this run's identity, named inside every folder it writes
        self._restored: dict[str, Any] | None = None  # a state to resume from, applied at the next writer
        self._floor: int | None = None  # the first step the folder written to shows (its old run's, or ours)
        self._last_step: int | None = None  # the last step this logger wrote
        self.overwrite = overwrite
        if isinstance(log_dir_or_writer, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (fail here, not at the first record)
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from exc
            folder = Path(log_dir_or_writer)
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"`log_dir_or_writer` {folder} is a file, not a folder. Pass a folder for the "
                                 f"event files.")
            if folder.is_dir():
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise ValueError(f"`log_dir_or_writer` {folder} cannot be written: no write permission. Pass "
                                     f"a folder you can write to.")
            else:
                _check_can_create(folder, "log_dir_or_writer")
            _hold(folder, self)
            self._asked_dir = folder
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
        skipped with a warning if one does, as :class:`CSVLogger` does."""
        if self._log_dir is not None:
            if self._writer is not None:
                self._writer.close()  # a closed SummaryWriter would open a new event file at its next scalar
                self._writer = None
            _release(Path(self._log_dir), self)

    def state_dict(self) -> dict[str, Any]:
        """This run's identity and the folder it writes: ``{"logger", "run_id", "log_dir",
        "last_step"}`` (``log_dir`` ``None`` before the first writer, or for a writer given). A
        weighter's ``state_dict()`` carries it for the loggers among its callbacks."""
        if self._restored is not None:  # not applied yet: still this state
            return dict(self._restored)
        return {"logger": type(self).__name__, "run_id": self._run_id,
                "log_dir": self._log_dir if self._planned else None, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the run of :meth:`state_dict`: its next record continues that run's own folder (found
        by its run id), hiding only the points logged after the checkpoint, with a warning naming
        them; never another run's folder. Checked first: a wrong state raises and changes nothing."""
        self._check_state(state_dict)
        if self._asked_dir is None:  # a writer given: nothing to choose, nothing purged
            self._run_id, self._last_step = state_dict["run_id"], state_dict["last_step"]
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._restored = dict(state_dict)

    def _check_state(self, state_dict: Any) -> None:
        _check_logger_state(self, state_dict, "log_dir")

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
                raise RuntimeError(f"This TensorBoardLogger was closed and another logger now writes to "
                                   f"{self._log_dir}. Use that logger's writer.")
        return self._writer_from(None)

    def _writer_from(self, step: int | None) -> Any:
        """The writer; made here if there is none, as ``SummaryWriter(log_dir, purge_step=...)`` with the
        first record's ``step`` (``None``: asked for before any record)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = step
            if self._log_dir is not None and (not self._planned or self._restored is not None):
                purge_step = self._plan_first(step)
            self._writer = SummaryWriter(self._log_dir, purge_step=purge_step)
            if self._log_dir is not None:
                sidecar = _tb_sidecar(Path(self._log_dir))
                if _run_of(sidecar) != self._run_id:
                    _claim(sidecar, self._run_id)
                self._planned, self._restored = True, None
        return self._writer

    def _plan_first(self, step: int | None) -> int | None:
        """The folder this run writes to and the ``purge_step`` of its writer, at its first writer or the
        first after :meth:`load_state_dict`: a resumed run continues its own folder, known by its run id,
        never another run's; a new run writes to the folder asked for unless a log is there already.
        Moves :attr:`log_dir` there and warns as it says."""
        asked = self._asked_dir
        assert asked is not None
        restored = self._restored
        if restored is None:
            if self.overwrite or not _has_events(asked):
                self._move_to(asked)
                return step
            return self._divert(asked, f"The TensorBoard folder {asked} is {_whose(_run_of(_tb_sidecar(asked)))}"
                                       f", and this TensorBoardLogger starts a new run (nothing restored by "
                                       f"load_state_dict(), as a weighter's load_state_dict() does for its "
                                       f"callbacks).")
        run_id, last = restored["run_id"], restored["last_step"]
        self._run_id = run_id
        own = Path(restored["log_dir"]) if restored["log_dir"] is not None else next(
            (f for f in [asked, *_siblings(asked, "", folders=True)] if _run_of(_tb_sidecar(f)) == run_id), None)
        if own is None:  # the checkpoint was taken before any record, and none was written after it
            if not _has_events(asked):
                self._move_to(asked)
                return step
            return self._divert(asked, f"The TensorBoard folder {asked} is {_whose(_run_of(_tb_sidecar(asked)))}"
                                       f", not this resumed run's.")
        held = _holder(own) not in (None, self)
        if not held and own.is_dir() and _run_of(_tb_sidecar(own)) == run_id:
            self._move_to(own)
            shown = _logged_steps(own)
            hidden = _undone([float(s) for s in shown], last, float("inf") if step is None else step)
            self._floor = min((s for s in shown if s not in hidden), default=None)
            if hidden:
                warn_user(f"The TensorBoard folder {own} is this run's (run id {run_id}); resumed from its "
                          f"checkpoint (last step {'none' if last is None else format(last, 'g')}), it hides from "
                          f"view the points of the {_steps_said(hidden, 'step')} logged after it (steps undone; "
                          f"TensorBoard's purge_step: no event file is deleted, they are only hidden).")
                return int(min(hidden))
            return step
        if not held and not own.exists():
            self._move_to(own)
            warn_user(f"This resumed run's TensorBoard folder {own} is not there (deleted or moved?): it starts "
                      f"again; the points before are not in it.")
            return step
        whose = "held by another logger of this process" if held else _whose(_run_of(_tb_sidecar(own)))
        return self._divert(own, f"This resumed run's TensorBoard folder {own} is {whose}, not this run's "
                                 f"(run id {run_id}).")

    def _move_to(self, folder: Path) -> None:
        """Write to ``folder`` from now on (held for this logger)."""
        if self._log_dir is not None and Path(self._log_dir) != folder:
            _release(Path(self._log_dir), self)
        _hold(folder, self)
        self._log_dir = str(folder)

    def _divert(self, old: Path, why: str) -> None:
        """Move this run to the first free ``NAME-2``, ``NAME-3``, ... beside ``old``, with a warning."""
        new = _fresh(old)
        self._move_to(new)
        self._floor = None
        warn_user(f"{why} The folder was left as it is; this run logs to {new} instead. Pass overwrite=True to "
                  f"hide the old run, or a folder of its own.")
        return None

    def __call__(self, record: dict[str, Any]) -> None:
        _write_standing(self, record, "", "record")

    def _record(self, record: dict[str, Any]) -> None:
        flat = flatten_record(record)
        step = int(flat.pop("iteration"))
        if not self._take_back():
            warn_user(f"This TensorBoardLogger was closed and another logger now writes to {self._log_dir}: "
                      f"iteration {step} was not logged by it.")
            return
        back = None
        if self._log_dir is not None and self._restored is None:
            back = _went_back(self._last_step, self._floor, step)
        if back is not None:  # went back in this process, closed in between or not: CSVLogger's rule
            old = Path(self._log_dir)  # type: ignore[arg-type]
            if self._writer is not None:
                self._writer.close()
                self._writer = None  # the new writer purges the undone steps from view
            if back == "new run":  # every point would be hidden
                self._divert(old, f"This TensorBoardLogger logged steps {self._floor} to {self._last_step} to "
                                  f"{old} and now gets step {step}: every point would be hidden as undone, so this "
                                  f"is a new run (e.g. a new weighter counting from 1 with the same logger), not a "
                                  f"weighter rolled back to a checkpoint.")
                self._floor, self._run_id = None, _new_run_id()
            else:  # rolled back to a checkpoint: a new writer purges the undone steps from view
                hidden = sorted({float(s) for s in _logged_steps(old) if s >= step})
                if hidden:
                    warn_user(f"This TensorBoardLogger logged up to step {self._last_step} to {old} and now gets step "
                              f"{step}: taken for a weighter rolled back to a checkpoint, the points of the "
                              f"{_steps_said(hidden, 'step')} (steps undone) are hidden from view.")
        writer = self._writer_from(step)  # the first record's iteration: where a resumed run continues
        for tag, value in flat.items():
            writer.add_scalar(self.prefix + tag, value, step)
        self._floor = step if self._floor is None else min(self._floor, step)
        self._last_step = step
