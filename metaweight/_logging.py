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
    """Appends one row per meta step to a CSV file (header written once).

    Args:
        path: the CSV file; created (with its folder) at the first record.

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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        row = flatten_record(record)
        new = self._fields is None
        if new:
            self._fields = list(row)
        with self.path.open("w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


class TensorBoardLogger:
    """Writes every scalar of a meta-step record to TensorBoard (needs the ``tensorboard`` package).

    Args:
        log_dir_or_writer: a log folder, or an existing ``torch.utils.tensorboard.SummaryWriter``.
        prefix: prepended to every tag.
    """

    def __init__(self, log_dir_or_writer: Any, prefix: str = "metaweight/") -> None:
        if isinstance(log_dir_or_writer, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from exc
            log_dir_or_writer = SummaryWriter(str(log_dir_or_writer))
        self.writer = log_dir_or_writer
        self.prefix = prefix

    def __call__(self, record: dict[str, Any]) -> None:
        flat = flatten_record(record)
        step = int(flat.pop("iteration"))
        for tag, value in flat.items():
            self.writer.add_scalar(self.prefix + tag, value, step)
