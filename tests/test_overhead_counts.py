"""The profiler counts of benchmarks/overhead.py on calls whose ops and host reads are known."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead  # noqa: E402


def test_count_gives_leaf_ops_and_host_reads_per_call():
    x, w = torch.ones(3), torch.ones(3, 2)

    def iterate():
        y = x + 1
        with torch.profiler.record_function("a block"):  # not an ATen op, and not a leaf
            float(y.sum())  # one host read
        torch.mm(x[None], w)

    counts = overhead.count(iterate, "cpu", iterations=3)
    with torch.profiler.profile() as prof:
        iterate()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    # here every child of an ATen op is an ATen op: the leaves are the ATen ops without children
    assert all(c.name.startswith("aten::") for e in aten for c in e.cpu_children)
    assert counts["leaf_ops"] == sum(not e.cpu_children for e in aten) > 3
    assert counts["host_reads"] == 1
    assert counts == overhead.count(iterate, "cpu", iterations=2)  # per call, exact


def test_the_users_loop_is_the_baseline_and_comes_first():
    assert overhead.BASELINE == next(iter(overhead.VARIANTS))
    assert overhead.VARIANTS[overhead.BASELINE][0] == {"loop": "own"}


def test_the_breakdown_names_the_launch_equivalent_ops_it_counts():
    x = torch.ones(3)

    def iterate():
        y = torch.exp(x).view(3)  # a view launches nothing
        torch._foreach_mul([y, y, y], 2.0)  # one launch on a GPU, whatever the number of tensors
        torch.neg(y)
        torch.mm(y[None], w)  # below it only aten::resolve_conj, which describes memory: mm itself launches

    w = torch.ones(3, 2)
    counts = overhead.count(iterate, "cpu", iterations=2, breakdown=True)
    assert counts["by_op"] == {"aten::exp": 1, "aten::_foreach_mul": 1, "aten::neg": 1, "aten::mm": 1}
    assert sum(counts["by_op"].values()) == counts["kernel_ops"] == 4


def test_composites_that_only_describe_memory_launch_nothing_and_a_copy_below_one_counts_once():
    m = torch.ones(2, 3)

    def iterate():
        torch.empty_like(m)  # aten::empty_like -> aten::empty_strided: an allocation
        m.reshape(3, 2)  # aten::reshape -> aten::view
        m.flatten()
        m.t().reshape(6)  # not viewable: reshape -> clone -> copy_, the one kernel
        m.contiguous()  # already contiguous: no op below it

    with torch.profiler.profile() as prof:
        iterate()
    names = {e.name for e in prof.events()}
    assert {"aten::empty_like", "aten::reshape", "aten::flatten", "aten::copy_"} <= names  # what the count walks
    counts = overhead.count(iterate, "cpu", iterations=2, breakdown=True)
    assert counts["by_op"] == {"aten::copy_": 1}
    assert counts["kernel_ops"] == 1
