"""MSDNet (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification",
ICLR 2018) as a metaweight multi-exit model: ``forward`` returns the list of exit logits.

Two configurations, as in the paper and its public PyTorch release:

* :func:`msdnet_cifar`: 32x32 inputs, 3 scales, growth rate 6, a base block of 4 layers then
  blocks of ``step`` layers, one exit after each block (8 exits for the anytime setting).
* :func:`msdnet_imagenet`: 224x224 inputs, 4 scales, growth rate 16, 5 exits.

Both keep the "max" pruning and the 0.5-compression transition layers of the reference
implementation. ``width`` scales every channel count for quick CPU runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DenseConv(nn.Module):
    """Optional 1x1 bottleneck, then a 3x3 conv (stride 1, or 2 to go one scale coarser)."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        inner = c_in
        if bottleneck:
            inner = min(c_in, bn_width * c_out)
            layers.append(conv_bn_relu(c_in, inner, kernel=1))
        layers.append(conv_bn_relu(inner, c_out, kernel=3, stride=stride))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ScaleUnit(nn.Module):
    """One scale of one MSDNet layer: keep the input, append new features (dense connection).

    At the finest scale kept, the new features come from the same scale; at coarser ones half
    come from the finer scale (strided conv) and half from the same scale.
    """

    def __init__(self, c_finer: int | None, c_same: int, growth: int, bottleneck: bool,
                 bn_finer: int, bn_same: int) -> None:
        super().__init__()
        if c_finer is None:
            self.down = None
            self.same = DenseConv(c_same, growth, 1, bottleneck, bn_same)
        else:
            self.down = DenseConv(c_finer, growth // 2, 2, bottleneck, bn_finer)
            self.same = DenseConv(c_same, growth // 2, 1, bottleneck, bn_same)

    def forward(self, finer: Tensor | None, same: Tensor) -> Tensor:
        parts = [same, self.same(same)]
        if self.down is not None:
            parts.insert(1, self.down(finer))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """A layer over the scales ``[offset, num_scales)``; drops the finest input scale if asked."""

    def __init__(self, c_in: int, growth: int, in_scales: int, out_scales: int,
                 gr: Sequence[int], bn: Sequence[int], bottleneck: bool) -> None:
        super().__init__()
        n = len(gr)
        self.discard = in_scales - out_scales
        offset = n - out_scales
        units = []
        for s in range(offset, n):
            finer = c_in * gr[s - 1] if (s > offset or self.discard > 0) else None
            units.append(ScaleUnit(finer, c_in * gr[s], growth * gr[s], bottleneck, bn[max(s - 1, 0)], bn[s]))
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for k, unit in enumerate(self.units):
            same = xs[k + self.discard]
            finer = xs[k + self.discard - 1] if (k > 0 or self.discard > 0) else None
            out.append(unit(finer, same))
        return out


class Transition(nn.Module):
    """1x1 compression at each remaining scale."""

    def __init__(self, c_in: int, c_out: int, out_scales: int, gr: Sequence[int]) -> None:
        super().__init__()
        offset = len(gr) - out_scales
        self.convs = nn.ModuleList(
            conv_bn_relu(c_in * gr[offset + i], c_out * gr[offset + i], kernel=1) for i in range(out_scales)
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class FirstLayer(nn.Module):
    """The stem: features at every scale, each from the previous one by a strided conv."""

    def __init__(self, c_in: int, channels: int, gr: Sequence[int], imagenet: bool) -> None:
        super().__init__()
        if imagenet:
            stem: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, channels * gr[0], 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(channels * gr[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            stem = conv_bn_relu(c_in, channels * gr[0])
        layers = [stem] + [conv_bn_relu(channels * gr[s - 1], channels * gr[s], stride=2) for s in range(1, len(gr))]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class Classifier(nn.Module):
    """Exit head on the coarsest scale: two strided convs, average pooling, a linear layer."""

    def __init__(self, c_in: int, inner: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(c_in, inner, stride=2), conv_bn_relu(inner, inner, stride=2),
                                      nn.AdaptiveAvgPool2d(1))
        self.linear = nn.Linear(inner, num_classes)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.linear(self.features(xs[-1]).flatten(1))


class MSDNet(nn.Module):
    """Multi-scale dense network with one exit after each block.

    Args:
        num_classes: classes of every exit.
        num_exits: number of blocks, one exit each.
        base: layers in the first block; ``step``: layers in each later block (``step_mode="even"``),
            or block ``i`` has ``step * i + 1`` layers (``step_mode="lin_grow"``).
        channels: stem channels at the finest scale; ``growth_rate``: new channels per layer.
        gr_factor / bn_factor: per-scale channel and bottleneck factors (their length is the
            number of scales).
        reduction: transition compression (0 for none); ``bottleneck``: 1x1 bottlenecks.
        imagenet: the ImageNet stem (7x7 conv + max-pool) and heads instead of CIFAR's.
        in_channels: input channels.
        head_width: channels of the CIFAR heads' convolutions (128, as the public code); the ImageNet
            heads keep the last block's width.
    """

    def __init__(self, num_classes: int, num_exits: int, *, base: int, step: int, channels: int,
                 growth_rate: int, gr_factor: Sequence[int], bn_factor: Sequence[int],
                 reduction: float = 0.5, bottleneck: bool = True, imagenet: bool = False,
                 in_channels: int = 3, step_mode: str = "even", head_width: int = 128) -> None:
        super().__init__()
        gr, bn, n_scales = list(gr_factor), list(bn_factor), len(gr_factor)
        if step_mode == "even":
            steps = [base] + [step] * (num_exits - 1)
        elif step_mode == "lin_grow":
            steps = [base] + [step * i + 1 for i in range(1, num_exits)]
        else:
            raise ValueError(f"Invalid step_mode: {step_mode!r}. Expected 'even' or 'lin_grow'.")
        n_layers = sum(steps)
        interval = math.ceil(n_layers / n_scales)
        self.blocks = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        c_in, layer_idx = channels, 0
        for b, n_step in enumerate(steps):
            layers: list[nn.Module] = [FirstLayer(in_channels, channels, gr, imagenet)] if b == 0 else []
            for _ in range(n_step):
                layer_idx += 1
                in_scales = n_scales - math.floor(max(0, layer_idx - 2) / interval)
                out_scales = n_scales - math.floor((layer_idx - 1) / interval)
                layers.append(MSDLayer(c_in, growth_rate, in_scales, out_scales, gr, bn, bottleneck))
                c_in += growth_rate
                if in_scales > out_scales and reduction > 0:
                    c_out = math.floor(reduction * c_in)
                    layers.append(Transition(c_in, c_out, out_scales, gr))
                    c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
            c_last = c_in * gr[-1]
            self.classifiers.append(Classifier(c_last, c_last if imagenet else head_width, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def num_exits(self) -> int:
        return len(self.classifiers)

    def exit_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """Blocks and classifiers as metaweight's multi-exit protocol names them, for real early exit."""
        return list(self.blocks), list(self.classifiers)

    def iter_exits(self, x: Tensor) -> Iterator[Tensor]:
        """Yield the exit logits one at a time, computing each block only when needed."""
        for block, classifier in zip(self.blocks, self.classifiers):
            x = block(x)
            yield classifier(x)

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.iter_exits(x))


def msdnet_cifar(num_classes: int = 100, num_exits: int = 8, *, step: int = 2, base: int = 4,
                 channels: int = 16, growth_rate: int = 6, in_channels: int = 3, **kwargs) -> MSDNet:
    """The CIFAR MSDNet (3 scales, growth rate 6): by default 8 exits with blocks of 4, 2, 2, ...
    layers (3.6 M parameters, the anytime model of the public MSDNet code).

    The HDKD paper's CIFAR model ("36 layers, 8 exits", Table 2's FLOPs) grows the blocks
    linearly, 1 + 2 + ... + 8 = 36 layers: ``msdnet_cifar(100, 8, base=1, step=1,
    step_mode="lin_grow")``; with 4, 5, 6 exits the same gives the budgeted models of depth
    10, 15, 21.
    """
    return MSDNet(num_classes, num_exits, base=base, step=step, channels=channels, growth_rate=growth_rate,
                  gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), in_channels=in_channels, **kwargs)


def msdnet_imagenet(num_classes: int = 1000, num_exits: int = 5, *, step: int = 4, base: int = 4,
                    channels: int = 32, growth_rate: int = 16, **kwargs) -> MSDNet:
    """The ImageNet MSDNet of the anytime-prediction experiments (5 exits, 4 scales)."""
    return MSDNet(num_classes, num_exits, base=base, step=step, channels=channels, growth_rate=growth_rate,
                  gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), imagenet=True, **kwargs)
