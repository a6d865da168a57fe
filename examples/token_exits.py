"""Token-level exits: a transformer tagger with an exit after every layer, trained with HDKD.

Each exit gives logits ``[batch, tokens, classes]``; labels ``[batch, tokens]`` mark padding with
-100 (``ignore_index``), which every loss term, the balanced objective and the per-token
evaluation leave out. The task is synthetic: each token's tag is how many times that token has
occurred so far in the sequence (0, 1, 2 or more), which needs attention to earlier tokens.

    python examples/token_exits.py          # 300 steps: about 20 s of CPU time on one thread

It runs on one CPU thread, with PyTorch's math attention kernel (``sdpa_kernel(SDPBackend.MATH)``:
CPU's flash kernel has no forward-mode derivative, which the exact meta-gradient needs), and gives
the same numbers at every run. Measured on this project's 2-core machine (torch 2.13): 18.8 s of
CPU time for the 300 steps, 63 s of wall clock while other jobs kept both cores busy.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from transformer import Embedding  # noqa: E402

PAD = -100


def tagging_task(n: int, seed: int, vocab: int = 8, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    earlier = (ids[:, :, None] == ids[:, None, :]).tril(-1).sum(-1)  # occurrences before each position
    tags = earlier.clamp(max=2)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    padding = torch.arange(length)[None] >= lengths[:, None]
    ids[padding] = 0
    tags[padding] = PAD
    return ids, tags


def tagger(vocab: int = 8, classes: int = 3, layers: int = 4, d_model: int = 32) -> mw.MultiExit:
    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, 0.0, batch_first=True, norm_first=True)

    stages = [nn.Sequential(Embedding(vocab, d_model, 64, 0.0), layer())] + [layer() for _ in range(layers - 1)]
    heads = [nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, classes)) for _ in range(layers)]
    return mw.MultiExit(stages, heads)


def main(argv: list[str] | None = None) -> mw.AnytimeResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training iterations (default: %(default)s)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    # One thread: on a small model more threads only wait for each other (and on a busy machine
    # many times over); the same result at every run. The math attention kernel: CPU's flash
    # kernel has no forward-mode derivative, which the exact meta-gradient (backend="jvp") takes.
    torch.set_num_threads(1)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            torch.manual_seed(0)
            model = tagger()
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            weighter = mw.preset("hdkd", 4).weighter(model, optimizer)
            held_out = itertools.cycle([tagging_task(64, 10_000 + i) for i in range(4)])
            for step in range(args.steps):
                weighter.step(tagging_task(32, step), next(held_out))
            result = mw.anytime_accuracy(model, [tagging_task(256, 20_000)], topk=(1,))
    finally:
        torch.set_num_threads(threads)
    print("per-token accuracy (padding left out):")
    print(result)
    return result


if __name__ == "__main__":
    main()
