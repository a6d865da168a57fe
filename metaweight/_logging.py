"""Logging hooks: a weighter or weighting calls each callback with a record after every meta step."""

from __future__ import annotations

import csv
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


class CSVLogger:
    """Appends one row per meta step to a CSV file, with one header.

    A file that already exists is appended to, never truncated: a run resumed from its
    checkpoint with a new ``CSVLogger`` on the same path continues the log under the header it
    has (a file whose header names other columns is refused, changing nothing). Pass
    ``overwrite=True`` to start the file afresh; that happens at the first record, not before.
    Nothing is written (no folder, no file) until the first record: the weighter calls its hooks
    only for meta steps that stand.

    Args:
        path: the CSV file; created (with its folder) at the first record.
        overwrite: start a new file at the first record instead of appending to an existing one.

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

    def _existing_header(self) -> list[str] | None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        with self.path.open(newline="") as f:
            return next(csv.reader(f), None)

    def __call__(self, record: dict[str, Any]) -> None:
        row = flatten_record(record)
        if self._fields is None:  # the first record: a new file, or append under the header it has
            header = None if self.overwrite else self._existing_header()
            if header is not None and header != list(row):
                raise ValueError(f"The log {self.path} has the columns {header}, but this run records {list(row)}; "
                                 f"appending would mix them. Log to another path, or pass overwrite=True to start "
                                 f"{self.path.name} afresh.")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a" if header is not None else "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if header is None:
                    writer.writeheader()
                writer.writerow(row)
            self._fields = list(row)
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._fields).writerow(row)


class TensorBoardLogger:
    """Writes every scalar of a meta-step record to TensorBoard (needs the ``tensorboard`` package).

    Given a folder, the writer (and the folder) is created at the first record, not before.

    Args:
        log_dir_or_writer: a log folder, or an existing ``torch.utils.tensorboard.SummaryWriter``.
        prefix: prepended to every tag.
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
        """The ``SummaryWriter``: the one given, or one made on ``log_dir`` when first needed."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._log_dir)
        return self._writer

    def __call__(self, record: dict[str, Any]) -> None:
        flat = flatten_record(record)
        step = int(flat.pop("iteration"))
        for tag, value in flat.items():
            self.writer.add_scalar(self.prefix + tag, value, step)
