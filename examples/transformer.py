"""A transformer encoder with an exit after every layer (DeeBERT / PABEE style), randomly
initialised, and a synthetic sequence task that needs no download: the same metaweight serves a
non-vision model.

The task: sequences of random tokens; the label is which of the tokens 1..C occurs most often
(ties to the smallest). Counting needs attention over the whole sequence, so later layers can
do better than early ones: ``python examples/accelerate_train.py`` trains it and prints each
exit's test accuracy (``python examples/transformer.py`` prints the model's exits' costs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import metaweight as mw


class Embedding(nn.Module):
    """Token and learned position embeddings."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.positions, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        return self.dropout(self.tokens(ids) + self.positions[:, : ids.shape[1]])


class PoolHead(nn.Module):
    """Mean over the tokens, LayerNorm, a linear classifier."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear = nn.Linear(d_model, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.norm(h.mean(dim=1)))


def transformer_multi_exit(vocab_size: int, num_classes: int, *, num_layers: int = 4, d_model: int = 64,
                           nhead: int = 4, dim_feedforward: int = 128, max_len: int = 64,
                           dropout: float = 0.1) -> mw.MultiExit:
    """``num_layers`` pre-norm encoder layers, an exit head after each."""
    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                          norm_first=True)

    stages = [nn.Sequential(Embedding(vocab_size, d_model, max_len, dropout), layer())]
    stages += [layer() for _ in range(num_layers - 1)]
    return mw.MultiExit(stages, [PoolHead(d_model, num_classes) for _ in range(num_layers)])


def counting_task(n: int, *, seq_len: int = 32, vocab_size: int = 16, num_classes: int = 4,
                  seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` token sequences and the most frequent of the tokens ``1..num_classes`` in each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    counts = torch.stack([(ids == c + 1).sum(1) for c in range(num_classes)], dim=1)
    return ids, counts.argmax(dim=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers, one exit after each (default: "
                                                               "%(default)s)")
    args = parser.parse_args()
    net = transformer_multi_exit(16, 4, num_layers=args.layers)
    print(mw.exit_costs(net, counting_task(1)[0], executed=True))
