"""Logging hooks: a weighter or weighting calls each callback with a record after every meta step."""

from __future__ import annotations

import csv
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


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


def _step_of(line: str) -> float | None:
    """The iteration a logged CSV row reports (its first column), or ``None`` if it cannot be read."""
    try:
        return float(next(csv.reader([line]))[0])
    except (StopIteration, IndexError, ValueError):
        return None


def _before(lines: list[str], step: float) -> list[str]:
    """The rows logged before ``step``; a row whose step cannot be read is kept, not ours to judge."""
    return [line for line in lines if (s := _step_of(line)) is None or s < step]


class CSVLogger:
    """Writes one row per meta step to a CSV file, with one header; resumes where the run resumes.

    The column ``iteration`` is the step. A file that already exists is continued under the
    header it has (a file whose header names other columns is refused, changing nothing), as
    TensorBoard's ``SummaryWriter(purge_step=...)`` continues an event log:

    * the first record this logger gets says where the run stands: rows of the file at or after
      its iteration were logged after the checkpoint the run resumed from, by steps that were
      undone, and are dropped (a run that logged iterations 1-5 and resumes from its checkpoint
      at 3 logs 4 and 5 again: the file holds 1-5 once); the same holds for any later record
      whose iteration is not past the last row (a weighter rolled back in the same process);
    * a last line without its newline is what a crash in the middle of a write leaves: an
      incomplete record, dropped;
    * a file whose every row would be dropped (a new run from iteration 1 on an old log) is
      refused with a ``ValueError``, changing nothing: pass ``overwrite=True`` to replace it.

    Dropping rewrites the file whole: a temporary file beside it, then ``os.replace`` (atomic),
    so an interruption leaves the old log or the new one, never a mix. Without anything to drop
    a row is appended. ``overwrite=True`` starts the file afresh at the first record. Nothing is
    written (no folder, no file) until the first record: the weighter calls its hooks only for
    meta steps that stand.

    Args:
        path: the CSV file; created (with its folder) at the first record.
        overwrite: start a new file at the first record instead of continuing an existing one.

    Raises:
        ValueError: at the first record, for a file whose header differs from the record's
            columns, or whose every row is at or after the record's iteration (unless
            ``overwrite``).

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

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        if not isinstance(path, (str, Path)) or not str(path):
            raise TypeError(f"`path` should be a file path (str or Path). Found {path!r}.")
        if not isinstance(overwrite, bool):
            raise TypeError(f"`overwrite` should be a bool. Found {overwrite!r}.")
        self.path = Path(path)
        self.overwrite = overwrite
        self._fields: list[str] | None = None
        self._last_step: float | None = None  # the iteration of the last row this logger wrote

    def _existing(self) -> tuple[list[str] | None, list[str], bool]:
        """The file's header, its complete rows (raw lines) and whether its last line was torn."""
        if not self.path.is_file():
            return None, [], False
        with self.path.open(newline="") as f:
            lines = f.read().splitlines(keepends=True)
        torn = bool(lines) and not lines[-1].endswith("\n")
        if torn:
            lines.pop()
        if not lines:
            return None, [], torn
        return next(csv.reader([lines[0]])), lines[1:], torn

    def _rewrite(self, fields: list[str], kept: list[str], row: dict[str, float]) -> None:
        """Write the header, the kept rows and ``row`` to a temporary file, then put it in place of the
        log (a new log is simply written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():  # nothing to keep safe: a new file, with the permissions open() gives
            with self.path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerow(row)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            os.chmod(tmp, stat.S_IMODE(self.path.stat().st_mode))  # the log's own (mkstemp's are owner-only)
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                f.writelines(kept)
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __call__(self, record: dict[str, Any]) -> None:
        row = flatten_record(record)
        fields, step = list(row), float(row["iteration"])
        if self._fields is None:  # the first record: a new file, or continue the one there
            header, lines, torn = (None, [], False) if self.overwrite else self._existing()
            if header is not None and header != fields:
                raise ValueError(f"The log {self.path} has the columns {header}, but this run records {fields}; "
                                 f"appending would mix them. Log to another path, or pass overwrite=True to start "
                                 f"{self.path.name} afresh.")
            kept = _before(lines, step)
            if lines and not kept:
                logged = [s for s in map(_step_of, lines) if s is not None]
                raise ValueError(f"The log {self.path} holds iterations {min(logged):g} to {max(logged):g}, and this "
                                 f"run's first record is iteration {step:g}: every row would be dropped as undone, "
                                 f"so this is a new run, not one resumed from a checkpoint. Pass overwrite=True "
                                 f"to replace the log, or log to another path.")
            if header is None or torn or len(kept) < len(lines):
                self._rewrite(fields, kept, row)
            else:
                self._append(fields, row)
            self._fields, self._last_step = fields, step
            return
        if self._last_step is not None and step <= self._last_step:  # rolled back in this process
            _, lines, _ = self._existing()
            self._rewrite(self._fields, _before(lines, step), row)
        else:
            self._append(self._fields, row)
        self._last_step = step

    def _append(self, fields: list[str], row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(row)


class TensorBoardLogger:
    """Writes every scalar of a meta-step record to TensorBoard (needs the ``tensorboard`` package).

    The step of every scalar is the record's ``iteration``. Given a folder, the writer (and the
    folder) is created at the first record, not before, as
    ``SummaryWriter(log_dir, purge_step=iteration of that record)``: a run resumed from its
    checkpoint hides the events an earlier attempt logged at or after that iteration (steps that
    were undone), as :class:`CSVLogger` drops those rows. TensorBoard hides them, it deletes no
    file. Given a writer, nothing is purged: create it with ``purge_step`` yourself when you
    resume.

    Args:
        log_dir_or_writer: a log folder, or an existing ``torch.utils.tensorboard.SummaryWriter``
            (anything with ``add_scalar(tag, value, step)``).
        prefix: prepended to every tag.

    Raises:
        TypeError: ``log_dir_or_writer`` is neither a folder nor a writer, or ``prefix`` is not a str.
        ImportError: a folder is given and ``tensorboard`` is not installed.
    """

    def __init__(self, log_dir_or_writer: Any, prefix: str = "metaweight/") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` should be a str. Found {prefix!r}.")
        self._log_dir: str | None = None
        self._writer: Any = None
        if isinstance(log_dir_or_writer, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (fail here, not at the first record)
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from exc
            self._log_dir = str(log_dir_or_writer)  # the folder is created with the writer, at the first record
        elif callable(getattr(log_dir_or_writer, "add_scalar", None)):
            self._writer = log_dir_or_writer
        else:
            raise TypeError(f"`log_dir_or_writer` should be a log folder (str or Path) or a SummaryWriter. Found "
                            f"`{type(log_dir_or_writer).__name__}`.")
        self.prefix = prefix

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``: the one given, or the one made on ``log_dir`` at the first record
        (made here without ``purge_step`` if asked for before any record)."""
        return self._writer_from(None)

    def _writer_from(self, purge_step: int | None) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._log_dir, purge_step=purge_step)
        return self._writer

    def __call__(self, record: dict[str, Any]) -> None:
        flat = flatten_record(record)
        step = int(flat.pop("iteration"))
        writer = self._writer_from(step)  # the first record's iteration: where a resumed run continues
        for tag, value in flat.items():
            writer.add_scalar(self.prefix + tag, value, step)
