"""Anytime prediction: the accuracy of every exit (Huang et al. 2018), from one pass over the data."""

from __future__ import annotations

import copy
import json
from collections import UserDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from metaweight._exit_rules import predict
from metaweight._checks import (IGNORE_INDEX, check_device_available, check_exit_outputs, check_has_values,
                                check_fit_logits, check_ignore_index, check_target, integer_value, refuse_arrays,
                                unstacked_hint)
from metaweight._modes import eval_mode
from metaweight._protocols import call_model


def to_device(inputs: Any, device: torch.device | str) -> Any:
    """Move a tensor, or every tensor inside nested mappings, lists and tuples, to ``device``.

    Containers keep their type where it can be rebuilt: a namedtuple, a ``dict`` subclass or a
    ``UserDict`` (Hugging Face's ``BatchEncoding``, with its other attributes) stays what it was;
    any other ``Mapping`` that cannot be rebuilt from a dict becomes a plain ``dict``, which
    :func:`call_model` passes as keyword arguments all the same. The given containers are not
    changed.

    An object that moves itself (a ``.to(device)`` method) and is not a plain container is moved
    by that method: a ``PackedSequence`` (a tuple whose ``batch_sizes`` must stay on the CPU), a
    graph batch of a geometry library. Modules are left as they are (their ``.to`` moves them in
    place: move the model itself).
    """
    if isinstance(inputs, (Tensor, PackedSequence)):
        return inputs.to(device)
    if not isinstance(inputs, (Mapping, list, tuple, nn.Module, str, bytes)) and callable(getattr(inputs, "to", None)):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return same_mapping(inputs, {k: to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (list, tuple)):
        moved_items = [to_device(v, device) for v in inputs]
        if type(inputs) in (list, tuple):
            return type(inputs)(moved_items)
        try:
            return type(inputs)(*moved_items) if hasattr(inputs, "_fields") else type(inputs)(moved_items)
        except Exception:  # a subclass whose constructor takes something else
            return tuple(moved_items) if isinstance(inputs, tuple) else moved_items
    return inputs


def same_mapping(original: Mapping[Any, Any], values: dict[Any, Any]) -> Mapping[Any, Any]:
    """``values`` (``original``'s keys with new values) in ``original``'s type where it can be rebuilt:
    a ``dict`` subclass or a ``UserDict`` (Hugging Face's ``BatchEncoding`` and ``ModelOutput``, with
    their other attributes and attribute access) by a copy whose items are set, another ``Mapping`` by
    its constructor; a plain ``dict`` where neither works. ``original`` is not changed."""
    if type(original) is dict:
        return values
    if isinstance(original, (dict, UserDict)):  # copy.copy gives them storage of their own
        try:
            rebuilt = copy.copy(original)
            for k, v in values.items():
                rebuilt[k] = v
            return rebuilt
        except Exception:  # a subclass that refuses copying or item assignment
            return values
    try:
        rebuilt = type(original)(values)  # type: ignore[call-arg]
    except Exception:
        return values
    return rebuilt if isinstance(rebuilt, Mapping) and list(rebuilt.keys()) == list(values) else values


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: Iterable[Sequence[Any]], *, device: torch.device | str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``loader`` once and keep every exit's logits.

    Args:
        model: a multi-exit model returning ``K`` logits tensors.
        loader: yields ``(inputs, labels)`` batches; ``inputs`` may be a tensor or tuples,
            lists and dicts of tensors (moved to ``device``; a dict whose keys the model's
            ``forward`` takes is passed as keyword arguments, as the weighter does).
        device: where the inputs go; defaults to the device of the model's parameters, and must
            be that device when given (the model is not moved: ``model.to(device)`` first).
        ignore_index: positions labelled with it (padding) are left out (an int).

    Returns:
        ``(logits, labels)``: logits of shape ``[K, N, C]`` (float32, or float64 for a float64 model; on the CPU) and labels ``[N]``;
        for token-level exits (logits ``[B, T, C]``, labels ``[B, T]``) ``N`` counts the scored
        tokens, so anytime accuracy and the budgeted curve are per token.
        Every module's own train/eval mode is restored afterwards. The labels may live on
        another device than the model (CPU labels for a GPU model).

    Raises:
        TypeError: a model that is not an ``nn.Module``, a loader that is not an iterable of
            batches, an ``ignore_index`` that is not an int (``True``, ``1.0``, ``None``).
        ValueError: a device this machine lacks, or other than the model's; a model or device on
            the meta device; batches that are not ``(inputs, labels)`` pairs, or outputs that are
            not every exit's logits; labels out of range; no batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` should be an nn.Module. Found `{type(model).__name__}`.")
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, Tensor)):
        raise TypeError(f"`loader` should be an iterable of (inputs, labels) batches (a DataLoader, a list). Found "
                        f"`{type(loader).__name__}`.")
    ignore_index = check_ignore_index(ignore_index)
    model_device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    if device is None:
        device = model_device or torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid device: {device!r}. Expected a torch.device or a name such as 'cpu' or "
                         f"'cuda:0'.") from None
    check_device_available(device)
    if device.type == "meta" or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"collect_logits (and anytime_accuracy) keep the logits' values, and "
                         f"{'device=meta' if device.type == 'meta' else 'the model is on the meta device'} has none "
                         f"(shapes only). Load the weights and pass a real device (e.g. 'cpu', 'cuda').")
    if model_device is not None and not _same_device(model_device, device):
        raise ValueError(f"collect_logits was given device='{device}', but the model's parameters are on "
                         f"'{model_device}'. The device is where the inputs go; the model is not moved (that would "
                         f"change the caller's model): call model.to('{device}') first, or leave device=None to run "
                         f"where the model is.")
    chunks, labels = [], []
    num_exits = None
    with eval_mode(model):
        for i, item in enumerate(loader):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"The loader's batch {i} should be a pair (inputs, labels). Found "
                                 f"`{type(item).__name__}`"
                                 f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}: "
                                 f"give collect_logits a loader of (inputs, labels) batches (e.g. wrap it: "
                                 f"((x, y) for x, y, *_ in loader)).")
            refuse_arrays(item, f"The loader's batch {i}")
            inputs, target = item
            outputs = call_model(model, to_device(inputs, device), "collect_logits")
            outputs = check_exit_outputs(outputs, num_exits, where=f"model output of batch {i}",
                                         expected="the first batch's had {k}",  # (for the batches after it)
                                         fix="Every batch must give one logits tensor per exit")
            num_exits = len(outputs)
            shape = outputs[0].shape
            target = check_target(target, shape[0], shape[-1], tokens=shape[1] if len(shape) == 3 else None,
                                  ignore_index=ignore_index)
            if chunks and shape[-1] != chunks[0].shape[2]:
                raise ValueError(f"Batch {i} gives {shape[-1]} classes, the first gave {chunks[0].shape[2]}.")
            logits = torch.stack(outputs)
            logits = logits if logits.dtype == torch.float64 else logits.float()  # half raised, float64 kept
            if logits.dim() == 4:  # token-level exits: every token is one scored position
                logits, target = logits.flatten(1, 2), target.flatten()
            keep = target != ignore_index  # on the labels' device (CPU labels of a GPU model are fine)
            chunks.append(logits[:, keep.to(logits.device)].cpu())
            labels.append(target[keep].cpu())
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError("The loader yielded no batch (or only ignored positions); there is nothing to evaluate.")
    return torch.cat(chunks, dim=1), torch.cat(labels)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Per exit and sample, whether the label is among the ``k`` highest logits: bool ``[K, N]``.

    Decided by ranks. Ties are broken as :func:`~metaweight.predict` breaks them (the lower class
    index ranks first; a NaN ranks above every number, as in ``torch.argmax``), so top-1 is exactly
    ``predict(logits) == labels``: the label's rank is the number of classes with a larger logit
    plus those of lower index with an equal one. One exception, classes masked with a constant: a
    label whose logit is below the row's largest and is ``-inf``, or ``-9e3`` or less and shared
    with another class (a ``finfo.min``/``-1e9``/``-1e4`` mask, ``-1e4`` being ``-9984`` in
    bfloat16), is never among the ``k`` (with
    ``k > 1``): when fewer than ``k`` classes rank above the masked ones, the tie-break would fill
    the top-k with masked classes by index, no prediction, and counting one would credit a class
    the exit rules out. Ties no mask made (ReLU'd, quantized or saturated logits, all 0 but a few)
    are ranked by the tie-break, as for top-1, and so is a mask added to the logits (``logits - 1e4``
    on the masked classes leaves them untied). So scaling or shifting the logits
    (:meth:`Calibration.apply`) changes nothing unless it moves tied classes across ``-9e3`` (a
    ``-1e4`` mask divided by a temperature above 1.1 is then ranked, not masked)."""
    if k == 1:
        return predict(logits) == labels.view(1, -1)
    z = logits.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    index = labels.view(1, -1, 1).expand(z.shape[0], -1, 1)
    z_y = z.gather(-1, index)
    lower = torch.arange(z.shape[-1], device=z.device) < labels.view(1, -1, 1)
    rank = (z > z_y).sum(-1) + ((z == z_y) & lower).sum(-1)
    largest = z.amax(-1, keepdim=True)
    tied = (z == z_y).sum(-1, keepdim=True) > 1
    masked = (torch.isneginf(z_y) | (tied & (z_y <= MASK_VALUE))) & (z_y < largest)
    return (rank < k) & ~masked.squeeze(-1)


MASK_VALUE = -9e3  # the largest constant a mask is taken to be: -1e4 (-9984 as bfloat16 stores it), -1e9, finfo.min


@dataclass
class AnytimeResult:
    """Accuracy (in %) of every exit for each requested top-k.

    Attributes:
        accuracy: ``{k: [acc of exit 1, ..., acc of exit K]}``, in percent.
        num_samples: how many samples were scored.
        extra: further fields to carry into :meth:`to_dict` (e.g. the data set's name).
    """

    accuracy: dict[int, list[float]]
    num_samples: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_exits(self) -> int:
        return len(next(iter(self.accuracy.values())))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"num_samples": N, "top1": [...], "top5": [...]}``."""
        return {"num_samples": self.num_samples, **{f"top{k}": v for k, v in self.accuracy.items()}, **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        ks = sorted(self.accuracy)
        header = "exit " + "".join(f"{'top-' + str(k):>9}" for k in ks)
        rows = [header, "-" * len(header)]
        for e in range(self.num_exits):
            rows.append(f"{e + 1:>4} " + "".join(f"{self.accuracy[k][e]:>8.2f}%" for k in ks))
        return "\n".join(rows)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (``cuda`` and ``cuda:0`` are, when 0 is the current device)."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = getattr(getattr(torch, a.type, None), "current_device", None)
        index = current() if callable(current) and a.type != "cpu" else 0
        return (a.index if a.index is not None else index) == (b.index if b.index is not None else index)
    return a.index == b.index


DEFAULT_TOPK = (1, 5)


def check_topk(topk: object, num_classes: int | None = None) -> list[int]:
    """``topk`` as a list of distinct ints >= 1 (a repeated ``k`` once, in its first place): a
    non-empty list, tuple or range of ints (not bools). ``None``: :data:`DEFAULT_TOPK`, leaving
    out a ``k`` that is not below ``num_classes``. Given explicitly, a ``k > 1`` with ``k >=
    num_classes`` is refused: every label is among the ``k`` highest logits then, and the accuracy
    would read 100% at every exit whatever the model does (top-1 is always the prediction's
    accuracy, kept)."""
    if topk is None:
        return [k for k in DEFAULT_TOPK if k == 1 or num_classes is None or k < num_classes]
    ks = list(topk) if isinstance(topk, (list, tuple, range)) else None
    if not ks or any(integer_value(k) is None or k < 1 for k in ks):
        raise ValueError(f"Invalid topk: {topk!r}. Expected a non-empty list of ints >= 1, e.g. (1, 5), or None "
                         f"(the default: top-1, and top-5 with more than 5 classes).")
    ks = list(dict.fromkeys(int(k) for k in ks))
    trivial = [k for k in ks if k > 1 and num_classes is not None and k >= num_classes]
    if trivial:
        raise ValueError(f"Invalid topk: {topk!r}. The logits have {num_classes} classes, so top-{trivial[0]} holds "
                         f"every label and would read 100% at every exit whatever the model predicts. Ask for k < "
                         f"{num_classes} (e.g. topk=(1,)), or leave topk out: the default reports top-5 only with "
                         f"more than 5 classes.")
    return ks


def anytime_accuracy_from_logits(logits: Tensor, labels: Tensor, topk: Sequence[int] | None = None) -> AnytimeResult:
    """Top-k accuracy of every exit from collected logits.

    Args:
        logits: ``[K, N, C]``, e.g. from :func:`collect_logits`.
        labels: ``[N]`` class indices.
        topk: the values of ``k`` to report (a ``k`` given twice, once). ``None`` (the default):
            top-1, and top-5 when there are more than 5 classes (with 5 or fewer it would be 100%).
            Decided by each row's ranks (:func:`topk_correct`); classes masked with a constant
            (``-inf``, or ``-9e3`` or less and shared by several classes) are never among the ``k``.

    Raises:
        ValueError: logits or labels on the meta device (no values to score), or of the wrong
            shapes; logits holding NaN (counted per exit: a NaN row has no prediction, and its
            argmax would be scored as class 0); a row with no softmax; ``topk`` not a non-empty list
            of ints >= 1, or asking for a ``k > 1`` not below the number of classes (its accuracy
            would be 100%).
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"`logits` and `labels` should be Tensors. Found `{type(logits).__name__}` and "
                        f"`{type(labels).__name__}`.{unstacked_hint(logits)}")
    if logits.dim() != 3 or labels.shape != (logits.shape[1],):
        column = logits.dim() == 3 and labels.shape == (logits.shape[1], 1)
        raise ValueError(
            f"Expected logits [K, N, C] and labels [N]. Found {tuple(logits.shape)} and {tuple(labels.shape)}."
            + (" For labels in a column, pass labels.squeeze(1)." if column else "")
        )
    check_has_values(logits, "`logits`", "anytime_accuracy_from_logits")
    if logits.shape[0] == 0 or logits.shape[1] == 0 or logits.shape[2] == 0:
        raise ValueError(f"`logits` {tuple(logits.shape)} hold no exit, sample or class: nothing to score.")
    if not logits.is_floating_point():
        raise ValueError(f"`logits` should be floating point. Found {logits.dtype}.")
    ks = check_topk(topk, logits.shape[2])
    labels = check_target(labels, logits.shape[1], logits.shape[2], name="labels").to(logits.device)
    check_fit_logits(logits, "logits", "anytime accuracy")  # a NaN row or one with no softmax has no prediction
    n = labels.shape[0]
    accuracy = {k: (topk_correct(logits, labels, k).double().mean(1) * 100).tolist() for k in ks}
    return AnytimeResult(accuracy, n)


def anytime_accuracy(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    *,
    topk: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> AnytimeResult:
    """Top-k accuracy of every exit of ``model`` over ``loader``, in one pass (eval mode); per token
    for token-level exits, positions labelled ``ignore_index`` left out.

    Args:
        model: a multi-exit model returning ``K`` logits tensors.
        loader: yields ``(inputs, labels)`` batches.
        topk: the values of ``k`` to report, as in :func:`anytime_accuracy_from_logits` (by default
            top-1, and top-5 when there are more than 5 classes).
        device: where the inputs go; the model's device by default (see :func:`collect_logits`).
        ignore_index: labels to leave out (padding).

    Raises:
        ValueError: ``topk`` not a non-empty list of ints >= 1 (refused before any batch is
            read), or asking for a ``k > 1`` not below the number of classes (refused once the
            logits are collected), and everything :func:`collect_logits` refuses.
        TypeError: as :func:`collect_logits`.

    Example:
        >>> import torch, metaweight as mw
        >>> net = mw.MultiExit([torch.nn.Identity(), torch.nn.Identity()], [torch.nn.Identity(), torch.nn.Identity()])
        >>> x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
        >>> result = mw.anytime_accuracy(net, [(x, torch.tensor([0, 1]))], topk=(1, 2))
        >>> result.accuracy
        {1: [50.0, 50.0], 2: [100.0, 100.0]}
    """
    check_topk(topk)  # before the loader is consumed
    logits, labels = collect_logits(model, loader, device=device, ignore_index=ignore_index)
    return anytime_accuracy_from_logits(logits, labels, topk)
