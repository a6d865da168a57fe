"""The loss-weighting methods under DistributedDataParallel: 2 processes (gloo, CPU), different data per rank.
Every rank must hold the same weights and parameters; where the method's model step is a weighted sum of the
terms, both equal one process on the concatenated batches."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metaweight as mw
from test_distributed import global_batches, make_model

NAMES = list(mw.WEIGHTINGS)


def train(name, model, batches):
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    extra = {"dwa": {"window": 1}, "sdn": {"epochs": 2, "steps_per_epoch": 1},
             "gradnorm": {"shared_parameters": list(module.stages[0].parameters()), "lr": 0.1},
             "uw": {"lr": 0.1}, "famo": {"lr": 0.5}}.get(name, {})
    w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), **extra)
    for train_batch, _ in batches:
        w.step(train_batch)
    return w


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = []
        for (x, y), (xv, yv) in global_batches():
            t = len(y) // world
            local.append(((x[rank * t:(rank + 1) * t], y[rank * t:(rank + 1) * t]), None))
        results = {}
        for name in NAMES:
            model = nn.parallel.DistributedDataParallel(make_model())
            w = train(name, model, local)
            results[name] = {"gamma": w.gamma.clone(),
                             "params": [p.detach().clone() for p in model.module.parameters()]}
            del w, model
            gc.collect()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_the_same_weights_as_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in NAMES:
        a, b = ranks[0][name], ranks[1][name]
        assert torch.equal(a["gamma"], b["gamma"]), name
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), name
        single = train(name, make_model(), [(tb, None) for tb, _ in global_batches()])
        if name == "famo":  # its step divides by c = sum z/D of each rank's own terms: close, not equal
            assert torch.allclose(a["gamma"], single.gamma, atol=1e-3), (name, a["gamma"], single.gamma)
            continue
        assert torch.allclose(a["gamma"], single.gamma, rtol=1e-5, atol=1e-6), (name, a["gamma"], single.gamma)
        for p, q in zip(a["params"], single.model.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), name
