"""DistributedDataParallel: 2 processes (gloo, CPU), different data per rank, against one process on the
concatenated batches. Every rank must hold the same gamma and parameters, equal to the single run's."""

import copy
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metaweight as mw
from conftest import fast_two_calls, quiet

STEPS = 3


def make_model():
    torch.manual_seed(0)
    return mw.MultiExit([nn.Sequential(nn.Linear(6, 10), nn.Tanh()), nn.Sequential(nn.Linear(10, 10), nn.Tanh()),
                         nn.Sequential(nn.Linear(10, 10), nn.Tanh())],
                        [nn.Linear(10, 5) for _ in range(3)]).double()


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)),
             (torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (12,), generator=g)))
            for _ in range(STEPS)]


def train(model, backend, batches, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3),
                              gamma_lr=0.5, **_options(backend), **options)
    for train_batch, val_batch in batches:
        if backend == "fast, two calls":
            fast_two_calls(w, model, optimizer, train_batch, val_batch)
        else:
            w.step(train_batch, val_batch)
    return w


def _options(backend):
    return {"mode": "fast"} if backend.startswith("fast") else {"backend": backend}


def _worker(rank, world, init_file, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        local = []
        for (x, y), (xv, yv) in global_batches():
            t, v = len(y) // world, len(yv) // world
            local.append(((x[rank * t:(rank + 1) * t], y[rank * t:(rank + 1) * t]),
                          (xv[rank * v:(rank + 1) * v], yv[rank * v:(rank + 1) * v])))
        w = train(model, backend, local)
        torch.save({"gamma": w.gamma, "params": [p.detach() for p in model.module.parameters()],
                    "expected": w.validation.expected},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        del w, model
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
@pytest.mark.parametrize("backend", ["jvp", "finite_difference", "fast", "fast, two calls"])
def test_ddp_two_ranks_match_each_other_and_a_single_process(backend, tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), backend, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train(make_model(), backend, global_batches())
    assert torch.equal(ranks[0]["gamma"], ranks[1]["gamma"])
    assert torch.equal(ranks[0]["expected"], ranks[1]["expected"])
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert not torch.equal(single.gamma, torch.ones(6))  # gamma moved
    # one-sided differences (fast) amplify the rounding of per-rank sums more than the others
    assert torch.allclose(ranks[0]["gamma"], single.gamma, rtol=0, atol=1e-4 if backend.startswith("fast") else 1e-6)
    assert torch.allclose(ranks[0]["expected"], single.validation.expected, rtol=1e-6)
    for a, b in zip(ranks[0]["params"], single.model.parameters()):
        # (fast: gamma is float32 and its one-sided difference is 2.4e-6 from the single run's, measured; the steps
        # it weighs, at lr 0.2, move the parameters 6e-8 apart: within what gamma's tolerance allows)
        assert torch.allclose(a, b, **({"rtol": 1e-6, "atol": 1e-6} if backend.startswith("fast") else {"rtol": 1e-9, "atol": 1e-11}))


def test_ddp_refuses_higher_and_forward_reuse():
    # a single-rank process group is enough to build a DDP model
    import tempfile
    path = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="backend='jvp'"):
            mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), backend="higher")
        with pytest.raises(ValueError, match="reuse_forward"):
            mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), reuse_forward=True)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3))
        assert w.module is model.module
    finally:
        dist.destroy_process_group()


def _faulty_worker(rank, world, init_file, mode, learn, out_dir, form="exact"):
    """Rank 1 gets a NaN training batch at the second step; the ranks must agree and lose nothing."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), gamma_lr=0.5, nonfinite=mode,
                                  learn=learn, mode=form)
        outcome = []
        for step, ((x, y), (xv, yv)) in enumerate(global_batches()):
            x, y, xv, yv = x[rank::world].clone(), y[rank::world], xv[rank::world], yv[rank::world]
            if step == 1 and rank == 1:
                x[0, 0] = float("nan")
            before = [p.detach().clone() for p in model.module.parameters()]
            state = copy.deepcopy(optimizer.state_dict())
            try:
                with quiet():
                    metrics = w.step((x, y), (xv, yv))
                outcome.append("skipped" if metrics.get("model_step_skipped") else "ok")
            except ValueError:
                outcome.append("raised")
            if outcome[-1] != "ok":  # (mode='fast' took the step before deciding it: put back bit for bit)
                assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters()))
                assert str(state) == str(optimizer.state_dict())
        torch.save({"outcome": outcome, "gamma": w.gamma.clone(), "skipped": w.num_skipped,
                    "params": [p.detach().clone() for p in model.module.parameters()]},
                   os.path.join(out_dir, f"f{rank}.pt"))
        dist.barrier()
        del w, model, optimizer  # free DDP's reducer before its process group (gloo aborts otherwise, at times)
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("learn, form", [(True, "exact"), (False, "exact"), (True, "fast")])
def test_ddp_one_faulty_rank_neither_hangs_nor_diverges(mode, learn, form, tmp_path):
    ctx = mp.start_processes(_faulty_worker, args=(2, str(tmp_path / "init"), mode, learn, str(tmp_path), form),
                             nprocs=2, join=False, start_method="spawn")
    deadline = 120
    import time
    start = time.time()
    while not ctx.join(timeout=5):
        if time.time() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP with a faulty rank hung for {deadline}s")
    ranks = [torch.load(tmp_path / f"f{r}.pt") for r in range(2)]
    expected = ["ok", "raised" if mode == "raise" else "skipped", "ok"]
    assert ranks[0]["outcome"] == ranks[1]["outcome"] == expected
    assert torch.equal(ranks[0]["gamma"], ranks[1]["gamma"]) and torch.isfinite(ranks[0]["gamma"]).all()
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == (1 if mode == "skip" else 0)


def _record(iteration):
    return {"iteration": iteration, "meta_step": iteration, "val_objective": 1.0 / iteration,
            "gamma": {"ce[1]": 0.5, "ce[2]": 0.5}, "terms": {"ce[1]": 2.0, "ce[2]": 1.0}}


def _logging_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loggers = [mw.CSVLogger(os.path.join(out_dir, "log.csv")), mw.TensorBoardLogger(os.path.join(out_dir, "tb")),
                   mw.CSVLogger(os.path.join(out_dir, f"log-{rank}.csv"), all_ranks=True)]
        for iteration in (1, 2, 3):
            for logger in loggers:
                logger(_record(iteration))
            dist.barrier()
        for logger in loggers:
            logger.close()
    finally:
        dist.destroy_process_group()


def test_loggers_on_every_rank_write_one_log_once(tmp_path):
    """The same CSVLogger and TensorBoardLogger built on every rank (as a weighter's callbacks are)
    on one path: rank 0 writes, each row once, one event file, no second log; all_ranks=True writes
    on every rank."""
    mp.spawn(_logging_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # before: rank 1 found rank 0's rows, took its run for another and wrote log-2.csv and tb-2 beside
    # (the test's own rendezvous file, "init", is removed by torch's FileStore when its last user goes, which may
    # come after join: not the library's)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "init") == ["log-0.csv", "log-1.csv", "log.csv",
                                                                              "tb"]
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,meta_step") and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
    for rank in (0, 1):
        assert [line.split(",")[0] for line in (tmp_path / f"log-{rank}.csv").read_text().splitlines()[1:]] == \
            ["1", "2", "3"]
    events = list((tmp_path / "tb").glob("*tfevents*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = sorted(e.step for e in EventFileLoader(str(events[0])).Load()
                   if e.HasField("summary") and e.summary.value[0].tag == "metaweight/gamma/ce[1]")
    assert steps == [1, 2, 3]


BAD_LABEL_FORMS = ["jvp", "fast", "uw"]  # (the two-call loss() is the loop's own: no collective there)


def _bad_labels_worker(rank, world, init_file, out_dir):
    """Rank 1's training labels are all padding at step 1, out of range at step 2 and sparse at step 4, its
    validation labels (made under inference mode) all padding at step 3 (the weightings read none): rank 1's
    refusal must be every rank's, before any collective."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for form in BAD_LABEL_FORMS:
            model = nn.parallel.DistributedDataParallel(make_model())
            optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
            if form == "uw":
                w = mw.UW(model, optimizer, mw.DenseDistillLoss(3))
            else:
                w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), gamma_lr=0.5,
                                          **_options(form))
            outcome = []
            for step, ((x, y), (xv, yv)) in enumerate(global_batches() + global_batches()[:2]):
                x, y, xv, yv = x[rank::world], y[rank::world].clone(), xv[rank::world], yv[rank::world].clone()
                if rank == 1 and step == 1:
                    y[:] = -100
                if rank == 1 and step == 2:
                    y[0] = 9
                if rank == 1 and step == 3:
                    yv[:] = -100
                if step == 3:  # labels made under inference mode (no version to key a summary on)
                    with torch.inference_mode():
                        yv = yv.clone()
                if rank == 1 and step == 4:  # no values to summarise: the other rank must refuse too
                    y = y.to_sparse()
                before = [p.detach().clone() for p in model.module.parameters()] + [w.gamma.clone()]
                try:
                    with quiet():
                        w.step((x, y), (xv, yv) if form != "uw" else None)
                    outcome.append("ok")
                except ValueError as exc:
                    outcome.append("another rank" if "another rank" in str(exc) else "raised")
                    after = [p.detach() for p in model.module.parameters()] + [w.gamma]
                    assert all(torch.equal(a, b) for a, b in zip(before, after)), (form, step)
            results[form] = {"outcome": outcome, "gamma": w.gamma.clone(),
                             "params": [p.detach().clone() for p in model.module.parameters()]}
            del w, model, optimizer
            gc.collect()
        torch.save(results, os.path.join(out_dir, f"labels{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_one_ranks_bad_labels_are_refused_by_every_rank_at_once(tmp_path):
    """An all-padding or out-of-range label batch on one rank was refused on that rank only, before the
    collectives: the other rank went on into them (gloo: 'Is there a distributed collective mismatch', or two
    iterations mixed; NCCL: a hang). Now every rank refuses that step, naming the other rank, and none changes."""
    ctx = mp.start_processes(_bad_labels_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    import time
    start = time.time()
    while not ctx.join(timeout=5):
        if time.time() - start > 150:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP with one rank's bad labels hung for 150 s")
    ranks = [torch.load(tmp_path / f"labels{r}.pt") for r in range(2)]
    for form in BAD_LABEL_FORMS:
        a, b = ranks[0][form], ranks[1][form]
        last = "ok" if form == "uw" else "another rank"  # (the weightings read no validation batch)
        assert a["outcome"] == ["ok", "another rank", "another rank", last, "another rank"], form
        assert b["outcome"] == ["ok", "raised", "raised", "ok" if form == "uw" else "raised", "raised"], form
        assert torch.equal(a["gamma"], b["gamma"]), form
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), form


def test_early_exit_and_costs_take_a_model_wrapped_for_data_parallel_training(tmp_path):
    """The model as trained, wrapped in DistributedDataParallel or nn.DataParallel (the README passes it to the
    weighter as it is): EarlyExit and exit_costs(executed=True) refused it as exposing no stages, saying to build it
    with MultiExit (it is one), and exit_costs warned that DDP's profiler markers went uncounted, calling the costs
    lower bounds (helper-166). They run the module it wraps, with its results; the markers cost nothing."""
    import warnings

    torch.manual_seed(0)
    model = make_model().eval()
    x = torch.randn(12, 6, dtype=torch.float64)
    with torch.no_grad():
        confidence = torch.stack(model(x)).softmax(-1).amax(-1)
    thresholds = [float(confidence[0].median()), float(confidence[1].median()), 0.0]
    alone = mw.EarlyExit(model, thresholds)(x)
    costs = mw.exit_costs(model, x[:1], executed=True).macs, mw.exit_costs(model, x[:1]).macs
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for wrapped in (nn.parallel.DistributedDataParallel(model), nn.DataParallel(model)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                result = mw.EarlyExit(wrapped, thresholds)(x)
                assert (mw.exit_costs(wrapped, x[:1], executed=True).macs, mw.exit_costs(wrapped, x[:1]).macs) == costs
            assert torch.equal(result.exits, alone.exits) and torch.equal(result.predictions, alone.predictions)
    finally:
        dist.destroy_process_group()
    assert 0 < int((alone.exits == 0).sum()) < 12  # (a mix of exits)
