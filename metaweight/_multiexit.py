"""Turn a plain backbone into a multi-exit network by attaching heads after chosen stages."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def declared_classes(head: nn.Module) -> int | None:
    """The number of classes a head declares, where its type says so: an ``nn.Linear`` (its
    ``out_features``), or an ``nn.Sequential`` ending in one; ``None`` where it cannot be known
    before it runs."""
    while isinstance(head, nn.Sequential) and len(head):
        head = head[-1]
    return head.out_features if isinstance(head, nn.Linear) else None


def check_head_classes(heads: Sequence[nn.Module], where: str) -> None:
    """Refuse heads that declare different numbers of classes (see :func:`declared_classes`)."""
    declared = {k: c for k, c in enumerate(declared_classes(h) for h in heads) if c is not None}
    if len(set(declared.values())) > 1:
        raise ValueError(f"The heads of {where} give different numbers of classes: "
                         f"{ {f'exit {k + 1}': c for k, c in declared.items()} }. Every exit must predict the same "
                         f"classes; make every head output the model's classes.")


def check_exit_classes(logits: Sequence[Tensor], where: str) -> None:
    """Refuse exit logits whose last dimension (the classes) differs, naming each exit's."""
    counts = [z.shape[-1] for z in logits]
    if torch.jit.is_tracing():  # (torch.jit.trace, and so the TorchScript-based torch.onnx.export: a size is a 0-d
        # tensor, each its own object in a set; the classes are a constant of the heads, read as one without a warning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            counts = [int(c) for c in counts]
    if len(set(counts)) > 1:
        raise ValueError(f"The exits of {where} give different numbers of classes: "
                         f"{ {f'exit {k + 1}': c for k, c in enumerate(counts)} }. Every exit must predict the "
                         f"same classes; make every head output the model's classes.")


def head_logits(logits: Any, k: int, head: nn.Module, where: str) -> Tensor:
    """What head ``k`` returned, refused unless it is a tensor (the exit's logits): a head reused
    from other code that returns ``(logits, features)`` or ``{"logits": ...}`` would otherwise meet
    a bare ``AttributeError`` deep inside. Every caller of a head goes through here."""
    if isinstance(logits, Tensor):
        return logits
    if isinstance(logits, Mapping):
        found = f"a `{type(logits).__name__}` with keys {list(logits.keys())[:6]}"
        fix = "head(h)['logits']"
    elif isinstance(logits, (tuple, list)):
        shown = ", ".join(f"Tensor {tuple(v.shape)}" if isinstance(v, Tensor) else f"`{type(v).__name__}`"
                          for v in logits[:4]) + (", ..." if len(logits) > 4 else "")
        found = f"a `{type(logits).__name__}` of {len(logits)} ({shown})"
        fix = "head(h)[0]"
    else:
        found, fix = f"a `{type(logits).__name__}`", "the logits tensor"
    raise TypeError(f"The head of exit {k + 1} of {where} (`{type(head).__name__}`) returned {found}, and a head "
                    f"must return one logits tensor [batch, classes]. Wrap the head in a module whose forward "
                    f"returns only the logits (e.g. {fix}).")


class MultiExit(nn.Module):
    """A backbone cut into ``K`` stages, with an exit head after each stage.

    ``forward(x)`` runs stage 1, head 1, stage 2 (on stage 1's features), head 2, ...
    and returns the list of the ``K`` exit logits, shallow to deep: the form every
    part of metaweight expects. Group several backbone blocks into one stage with
    ``nn.Sequential`` where no exit is wanted between them.

    Args:
        stages: ``K`` modules; stage ``k`` takes stage ``k-1``'s output (stage 1 the input).
        heads: ``K`` modules; head ``k`` maps stage ``k``'s output to logits ``[B, C]``, ``C``
            the same for every head (refused at construction where the heads declare it, e.g.
            ``nn.Linear``, else at the first forward).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import metaweight as mw
        >>> net = mw.MultiExit(
        ...     stages=[nn.Sequential(nn.Linear(4, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU())],
        ...     heads=[nn.Linear(16, 3), nn.Linear(16, 3)])
        >>> [tuple(z.shape) for z in net(torch.randn(5, 4))]
        [(5, 3), (5, 3)]
    """

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module]) -> None:
        super().__init__()
        stages, heads = list(stages), list(heads)
        if not stages:
            raise ValueError("`stages` is empty: a multi-exit network needs at least one stage and head.")
        if len(stages) != len(heads):
            raise ValueError(
                f"Got {len(stages)} stages and {len(heads)} heads; give one head per stage "
                f"(group blocks without an exit into one stage with nn.Sequential)."
            )
        for name, modules in (("stages", stages), ("heads", heads)):
            for k, m in enumerate(modules):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"`{name}[{k}]` should be an nn.Module. Found `{type(m).__name__}`.")
        check_head_classes(heads, "MultiExit")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        """The number of exits ``K``."""
        return len(self.heads)

    def exit_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The stages and heads, for :class:`EarlyExit` (metaweight's multi-exit protocol)."""
        return list(self.stages), list(self.heads)

    def iter_exits(self, x: Tensor) -> Iterator[Tensor]:
        """Yield the exit logits one by one, computing each stage only when asked for the next exit."""
        for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
            x = stage(x)
            yield head_logits(head(x), k, head, "MultiExit")

    def forward(self, x: Tensor) -> list[Tensor]:
        """The logits of every exit, shallow to deep; exits of different numbers of classes are refused."""
        logits = list(self.iter_exits(x))
        check_exit_classes(logits, "MultiExit")
        return logits
