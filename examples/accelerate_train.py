"""HDKD with Hugging Face Accelerate, on a non-vision model: a transformer encoder with an exit
after every layer (examples/transformer.py) on a synthetic counting task.

    pip install accelerate
    python examples/accelerate_train.py --method hdkd --max-steps 300
    python examples/accelerate_train.py --mode fast --accumulate 4 --max-grad-norm 1.0
    accelerate launch examples/accelerate_train.py        # several GPUs / processes: same script

`accelerator.prepare` may wrap the model in DistributedDataParallel and the optimizer in
AcceleratedOptimizer; HarmonizedWeighter accepts both (it looks ahead on the inner module and
optimizer and averages the meta-gradient over processes).

With ``--accumulate N`` (``accelerator.accumulate``) the optimizer steps at every N-th micro-batch,
where ``accelerator.sync_gradients`` is true; ``--max-grad-norm`` clips there
(``accelerator.clip_grad_norm_``). ``--mode fast`` scores that step as taken: its ``meta_step``
comes after it, on the N micro-batches concatenated, and the clipping is declared to the weighter
(``clip_grad_norm=``). ``--mode exact`` looks ahead before the step, with the optimizer's own
unclipped step (the loop guide), on one batch: so it takes no ``--accumulate`` here, whose micro-
batches are not all known before the first one's forward.
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
    p.add_argument("--mode", default="exact", choices=["exact", "fast"],
                   help="exact: the meta step before each step (the paper's order); fast: after it, scoring it")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (with --mode fast)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradients' total 2-norm to this before each optimizer step")
    p.add_argument("--cpu", action="store_true", help="force the CPU even with a GPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.accumulate < 1:
        p.error(f"--accumulate should be at least 1. Found {args.accumulate}.")
    if args.accumulate > 1 and args.mode == "exact":
        p.error("--accumulate needs --mode fast here: mode='exact' looks ahead before the step on the step's whole "
                "batch, and accelerator.accumulate hands the micro-batches over one by one.")

    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.accumulate)
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
    clip = args.max_grad_norm if args.mode == "fast" else None  # (declared: the step scored is the clipped one)
    weighter = method.weighter(model, optimizer, gamma_lr=0.01, mode=args.mode, clip_grad_norm=clip)
    val_batches = iter(())

    def held_out():
        nonlocal val_batches
        try:
            return next(val_batches)
        except StopIteration:
            val_batches = iter(val_loader)
            return next(val_batches)

    step, meta_steps = 0, 0
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # the micro-batches of the step under way
    model.train()
    while step < args.max_steps:
        for x, y in train_loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    if args.mode == "exact":  # the paper's order: gamma first, on this step's batch
                        meta_steps += weighter.meta_step((x, y), held_out()).ran
                    loss = weighter.loss(model(x), y)
                accelerator.backward(loss)  # (divided by --accumulate, as Accelerate does)
                parts.append((x, y))
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()  # (Accelerate steps only where sync_gradients)
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if args.mode == "fast":  # the step just taken, on its whole batch
                whole = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
                with accelerator.autocast():
                    meta_steps += weighter.meta_step(whole, held_out()).ran
            parts = []
            step += 1
            if step % 50 == 0:
                accelerator.print(f"step {step}: loss {loss.item():.3f}")
            if step >= args.max_steps:
                break

    test = [(test_ids[i:i + 256], test_labels[i:i + 256]) for i in range(0, len(test_labels), 256)]
    result = mw.anytime_accuracy(accelerator.unwrap_model(model), test, topk=(1,), device=accelerator.device)
    accelerator.print(f"\nper-exit test accuracy ({args.method}, transformer, {len(test_labels)} sequences):")
    accelerator.print(result)
    return {"test": result.to_dict(), "gamma": weighter.gamma_dict(), "steps": step, "meta_steps": meta_steps}


if __name__ == "__main__":
    main()
