"""Offline image data for the examples: nothing is ever downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).
* ``fashion-mnist``: the original idx files, e.g. from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``).
* ``cifar10`` / ``cifar100``: the standard python release (``cifar-10-batches-py`` or
  ``cifar-100-python``) in a directory you give, or the CIFAR-10 JPEG tree
  (``{train,test}/<class>/*.jpg``) as a folder or ``.tar.gz``.

Every loader returns float32 image tensors ``[N, C, H, W]`` normalised per channel with the
training set's statistics, and int64 labels.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
CIFAR10_JPEG_CANDIDATES = ("../shared/data/cifar10-jpg.tar.gz", "../../shared/data/cifar10-jpg.tar.gz")


@dataclass
class Split:
    """Train / held-out validation / test tensors of one data set."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str
    x_select: Tensor | None = None  # model selection: training-set images outside the CIFAR(X) pool
    y_select: Tensor | None = None

    def describe(self) -> str:
        select = f", {len(self.y_select)} selection" if self.y_select is not None else ""
        return (f"{self.name}: {len(self.y_train)} train, {len(self.y_val)} validation (held out for the meta "
                f"step){select}, {len(self.y_test)} test, {self.num_classes} classes, "
                f"images {tuple(self.x_train.shape[1:])}")


def per_class_subset(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class (all, shuffled, if None): CIFAR(X)."""
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        idx.append(members if per_class is None else members[:per_class])
    out = np.concatenate(idx)
    rng.shuffle(out)
    return out


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, held-out) with ``fraction`` of every class held out (at least one)."""
    train, held = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        n = max(1, int(round(fraction * len(members)))) if fraction > 0 else 0
        held.append(members[:n])
        train.append(members[n:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(held))


def _normalise(x_train: np.ndarray, *others: np.ndarray) -> list[Tensor]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (x_train, *others)]


def _make_split(name: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                num_classes: int, per_class: int | None, val_fraction: float, seed: int,
                select_per_class: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    pool = per_class_subset(y, per_class, rng)
    tr, va = stratified_holdout(y[pool], val_fraction, rng)
    tr, va = pool[tr], pool[va]
    label = name if per_class is None else f"{name}({per_class})"
    if select_per_class:
        # a third split for choosing settings, from training images outside the pool: never trained
        # on, never seen by the meta step, and not the test set (its own generator: the pool is unchanged)
        rest = np.setdiff1d(np.arange(len(y)), pool)
        if len(rest) == 0:
            raise ValueError("select_per_class needs training images outside the pool; pass per_class.")
        chosen = per_class_subset(y[rest], select_per_class, np.random.default_rng(seed + 7919))
        se = rest[chosen]
        xt, xv, xs, xe = _normalise(x[tr], x[va], x_test, x[se])
        return Split(xt, torch.from_numpy(y[tr]).long(), xv, torch.from_numpy(y[va]).long(), xs,
                     torch.from_numpy(y_test).long(), num_classes, label, xe, torch.from_numpy(y[se]).long())
    xt, xv, xs = _normalise(x[tr], x[va], x_test)
    return Split(xt, torch.from_numpy(y[tr]).long(), xv, torch.from_numpy(y[va]).long(), xs,
                 torch.from_numpy(y_test).long(), num_classes, label)


def load_digits(*, val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's digits, 8x8 grey; a stratified ``test_fraction`` is the test set."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(1234)  # the test split does not move with the training seed
    rest, test = stratified_holdout(y, test_fraction, rng)
    return _make_split("digits", x[rest], y[rest], x[test], y[test], 10, None, val_fraction, seed)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {root}.")


def load_fashion_mnist(root: str | None = None, *, per_class: int | None = None, val_fraction: float = 0.1,
                       seed: int = 0) -> Split:
    """Fashion-MNIST from its idx files (``apt-get install dataset-fashion-mnist`` puts them in
    ``/usr/share/datasets/fashion-mnist``)."""
    candidates = [root] if root else list(FASHION_MNIST_DIRS)
    for c in candidates:
        if c and Path(c).is_dir():
            r = Path(c)
            break
    else:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {candidates}. Install Debian's dataset-fashion-mnist "
            f"or pass --data-dir with train-images-idx3-ubyte[.gz] and friends.")
    x = _read_idx(_find(r, "train-images-idx3-ubyte")).astype(np.float32)[:, None] / 255.0
    y = _read_idx(_find(r, "train-labels-idx1-ubyte")).astype(np.int64)
    xs = _read_idx(_find(r, "t10k-images-idx3-ubyte")).astype(np.float32)[:, None] / 255.0
    ys = _read_idx(_find(r, "t10k-labels-idx1-ubyte")).astype(np.int64)
    return _make_split("fashion-mnist", x, y, xs, ys, 10, per_class, val_fraction, seed)


def _cifar_python(root: Path, hundred: bool) -> tuple[np.ndarray, ...]:
    def unpickle(p: Path) -> dict:
        with open(p, "rb") as f:
            return pickle.load(f, encoding="latin1")

    if hundred:
        base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
        tr, te = unpickle(base / "train"), unpickle(base / "test")
        key = "fine_labels"
        x, y, xs, ys = tr["data"], tr[key], te["data"], te[key]
    else:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        parts = [unpickle(base / f"data_batch_{i}") for i in range(1, 6)]
        te = unpickle(base / "test_batch")
        x = np.concatenate([p["data"] for p in parts])
        y = sum((list(p["labels"]) for p in parts), [])
        xs, ys = te["data"], te["labels"]
    f = lambda a: np.asarray(a, dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0  # noqa: E731 (uint8 rows)
    return f(x), np.asarray(y, dtype=np.int64), f(xs), np.asarray(ys, dtype=np.int64)


def _cifar_jpeg(source: Path) -> tuple[np.ndarray, ...]:
    from PIL import Image

    images: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}

    def add(path: str, data: bytes) -> None:
        parts = path.strip("./").split("/")
        if len(parts) >= 3 and parts[-3] in images and path.endswith(".jpg"):
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
            images[parts[-3]].append((parts[-2], img))

    if source.is_dir():
        for split in images:
            for p in sorted((source / split).glob("*/*.jpg")):
                add(f"{split}/{p.parent.name}/{p.name}", p.read_bytes())
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                if member.isfile():
                    add(member.name, tar.extractfile(member).read())  # type: ignore[union-attr]
    classes = sorted({c for c, _ in images["train"]})
    out = []
    for split in ("train", "test"):
        xs = np.stack([img for _, img in images[split]]).transpose(0, 3, 1, 2)  # uint8: 4x smaller to cache
        ys = np.array([classes.index(c) for c, _ in images[split]], dtype=np.int64)
        out += [xs, ys]
    return tuple(out)


def load_cifar(root: str | None = None, *, hundred: bool = False, per_class: int | None = None,
               val_fraction: float = 0.1, seed: int = 0, cache: bool = True, select_per_class: int = 0) -> Split:
    """CIFAR-10/100 from the python release in ``root``, or CIFAR-10 from the JPEG tree/tarball.

    ``per_class`` draws CIFAR(X) with a fixed seed; ``val_fraction`` of that pool is held out.
    ``select_per_class`` adds a selection split of that many images per class from the
    training images outside the pool (for choosing settings without the test set).
    Images decoded from the CIFAR-10 JPEG folder/tarball are cached in ``runs/cache/SOURCE.npz``
    under the working folder (about 176 MiB: 60,000 images of 3,072 bytes), and the path is
    printed when it is written; ``cache=False`` writes nothing. The python release is read as it is.
    """
    name = "cifar100" if hundred else "cifar10"
    candidates = [root] if root else [os.environ.get("CIFAR_ROOT", "")] + list(CIFAR10_JPEG_CANDIDATES)
    source = next((Path(c) for c in candidates if c and Path(c).exists()), None)
    if source is None:
        raise FileNotFoundError(
            f"No {name} data found in {[c for c in candidates if c]}. Pass --data-dir with the python release "
            f"(cifar-10-batches-py / cifar-100-python) or, for CIFAR-10, the JPEG folder or .tar.gz.")
    if source.is_dir() and any((source / d).exists() for d in ("cifar-10-batches-py", "cifar-100-python",
                                                                "data_batch_1", "train")) and not (source / "train").is_dir():
        x, y, xs, ys = _cifar_python(source, hundred)
    elif hundred:
        raise FileNotFoundError(f"CIFAR-100 needs the python release (cifar-100-python); {source} is not it.")
    else:
        cache_file = Path("runs") / "cache" / f"{source.name}.npz"
        if cache and cache_file.exists():
            with np.load(cache_file) as d:
                x, y, xs, ys = d["x"], d["y"], d["xs"], d["ys"]
        else:
            x, y, xs, ys = _cifar_jpeg(source)
            if cache:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache_file, x=x, y=y, xs=xs, ys=ys)
                print(f"cached the decoded images in {cache_file} ({cache_file.stat().st_size / 2**20:.0f} MiB; "
                      f"delete it to reclaim the space)")
        x, xs = x.astype(np.float32) / 255.0, xs.astype(np.float32) / 255.0
    return _make_split(name, x, y, xs, ys, 100 if hundred else 10, per_class, val_fraction, seed, select_per_class)


def augment(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per image, with torch ops (CIFAR's
    standard augmentation, He et al. 2016)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * padding)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)
