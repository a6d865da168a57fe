"""A Hugging Face BERT-style classifier made multi-exit by module name, trained with HDKD.

The model is built from a small ``BertConfig`` with random weights (nothing is downloaded); an
exit reads the [CLS] token after each encoder layer but the last, whose exit is the model's own
classifier. Batches are dicts (``input_ids``, ``attention_mask``) passed to the model as keyword
arguments. The task is synthetic: the label is the token at position 1 modulo 3, which the
[CLS] position has to attend to.

    pip install "metaweight[huggingface]"
    python examples/huggingface.py          # about 30 seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

import metaweight as mw


class FirstToken(nn.Module):
    """An exit head on a layer's hidden states ``[B, T, H]``: the [CLS] token, then a linear layer."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, classes)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states[:, 0])


def task(n: int, seed: int, vocab: int = 20, length: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 4, length - 2:] = 0  # a quarter of the batch padded
    return {"input_ids": ids, "attention_mask": mask}, ids[:, 1] % 3


def main(argv: list[str] | None = None) -> mw.AnytimeResult:
    from transformers import BertConfig, BertForSequenceClassification

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=16, num_labels=3)
    bert = BertForSequenceClassification(config)
    layers = [f"bert.encoder.layer.{i}" for i in range(config.num_hidden_layers - 1)]
    model = mw.attach_exits(bert, layers, lambda name, f: FirstToken(f.shape[-1], 3), example_input=task(2, 0)[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    weighter = mw.preset("hdkd", model.num_exits).weighter(model, optimizer)
    held_out = itertools.cycle([task(64, 10_000 + i) for i in range(4)])
    for step in range(args.steps):
        weighter.step(task(32, step), next(held_out))
    test = [task(256, 20_000 + i) for i in range(4)]
    result = mw.anytime_accuracy(model, test, topk=(1,))
    print(result)
    print({k: round(v, 3) for k, v in weighter.gamma_dict().items()})
    return result


if __name__ == "__main__":
    main()
