"""HDKD with Hugging Face Accelerate, on a non-vision model: a transformer encoder with an exit
after every layer (examples/transformer.py) on a synthetic counting task.

    pip install accelerate
    python examples/accelerate_train.py --method hdkd --max-steps 300
    accelerate launch examples/accelerate_train.py        # several GPUs / processes: same script

`accelerator.prepare` may wrap the model in DistributedDataParallel and the optimizer in
AcceleratedOptimizer; HarmonizedWeighter accepts both (it looks ahead on the inner module and
optimizer and averages the meta-gradient over processes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from transformer import counting_task, transformer_multi_exit  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="hdkd", choices=list(mw.METHODS))
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--cpu", action="store_true", help="force the CPU even with a GPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    ids, labels = counting_task(4096, seed=args.seed)
    val_ids, val_labels = counting_task(512, seed=args.seed + 1)
    test_ids, test_labels = counting_task(1024, seed=args.seed + 2)
    model = transformer_multi_exit(16, 4, num_layers=args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_loader = DataLoader(TensorDataset(ids, labels), batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(TensorDataset(val_ids, val_labels), batch_size=args.batch_size, shuffle=True)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    method = mw.preset(args.method, args.layers)
    weighter = method.weighter(model, optimizer, gamma_lr=0.01)
    val_batches = iter(())
    step = 0
    model.train()
    while step < args.max_steps:
        for x, y in train_loader:
            try:
                val_batch = next(val_batches)
            except StopIteration:
                val_batches = iter(val_loader)
                val_batch = next(val_batches)
            with accelerator.autocast():
                weighter.meta_step((x, y), val_batch)
                loss = weighter.loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 50 == 0:
                accelerator.print(f"step {step}: loss {loss.item():.3f}")
            if step >= args.max_steps:
                break

    test = [(test_ids[i:i + 256], test_labels[i:i + 256]) for i in range(0, len(test_labels), 256)]
    result = mw.anytime_accuracy(accelerator.unwrap_model(model), test, topk=(1,), device=accelerator.device)
    accelerator.print(f"\nper-exit test accuracy ({args.method}, transformer, {len(test_labels)} sequences):")
    accelerator.print(result)
    return {"test": result.to_dict(), "gamma": weighter.gamma_dict(), "steps": step}


if __name__ == "__main__":
    main()
