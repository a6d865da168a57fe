"""What the library keeps between calls never outlives the user's objects: once the user lets go of a model,
its optimizer and the library's objects built on them (a weighter of any mode, backend or method, early exit,
loggers, a checkpoint round trip), the model is freed with its parameters and buffers. A cache keyed weakly by
the model whose value held the model (the look-ahead's buffer storage) kept every model ever stepped alive:
a loop over folds or a second Lightning fit grew by a model each time. Reference: ``weakref`` and the
garbage collector."""

import gc
import warnings
import weakref

import pytest
import torch

import metaweight as mw
from conftest import batch, tiny_net


def _harmonized(**options):
    def run(model, optimizer, tmp_path):
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), **options)
        for _ in range(2):
            w.step(batch(), batch())
        return w
    return run


def _two_calls(mode):
    def run(model, optimizer, tmp_path):
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode=mode)
        for _ in range(2):
            train = batch()
            optimizer.zero_grad()
            if mode == "exact":
                w.meta_step(train, batch())
            w.loss(model(train[0]), train[1]).backward()
            optimizer.step()
            if mode == "fast":
                w.meta_step(train, batch())
        return w
    return run


def _weighting(name):
    def run(model, optimizer, tmp_path):
        options = {"dwa": {"window": 2}, "sdn": {"epochs": 3, "steps_per_epoch": 2},
                   "gradnorm": {"shared_parameters": list(model.stages[0].parameters())}}.get(name, {})
        w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), **options)
        for _ in range(3):
            w.step(batch())
        return w
    return run


def _logged(model, optimizer, tmp_path):
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast",
                              callbacks=[mw.CSVLogger(tmp_path / "log.csv"),
                                         mw.TensorBoardLogger(tmp_path / "tb")])
    for _ in range(2):
        w.step(batch(), batch())
    return w


def _checkpointed(model, optimizer, tmp_path):
    w = _harmonized()(model, optimizer, tmp_path)
    mw.save_checkpoint({"model": model.state_dict(), "weighter": w.state_dict()}, tmp_path / "c.pt")
    w.load_state_dict(mw.load_checkpoint(tmp_path / "c.pt")["weighter"])
    w.step(batch(), batch())
    return w


def _early_exit(model, optimizer, tmp_path):
    predictor = mw.EarlyExit(model.eval(), [0.5, 0.5, 0.0])
    predictor(batch()[0])
    return predictor


FORMS = {"jvp": _harmonized(), "finite_difference": _harmonized(backend="finite_difference"),
         "higher": _harmonized(backend="higher"), "reuse_forward": _harmonized(reuse_forward=True),
         "fast": _harmonized(mode="fast"), "learn=False": _harmonized(learn=False),
         "two calls, exact": _two_calls("exact"), "two calls, fast": _two_calls("fast"),
         "loggers": _logged, "checkpoint": _checkpointed, "early exit": _early_exit,
         **{f"weighting {name}": _weighting(name) for name in mw.WEIGHTINGS}}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_model_let_go_is_freed_whatever_the_library_built_on_it(form, tmp_path):
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (validation batches drawn like the training ones)
        built = FORMS[form](model, optimizer, tmp_path)
    refs = [weakref.ref(model), weakref.ref(built), *(weakref.ref(p) for p in model.parameters())]
    del model, optimizer, built
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs), f"{form}: kept alive after the user let go"
