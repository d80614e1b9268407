"""CIFAR-10 from JPEG folders: loading, a decoded-array cache, the seeded validation split, augmentation.

The source is ``cifar-10-jpg.tar.gz`` (``train/<class>/NNNN.jpg`` and
``test/<class>/NNNN.jpg``, 60,000 32x32 JPEGs) or a folder with the same ``train/``
and ``test/`` layout. The class folders must be exactly the ten CIFAR-10 classes;
label j is ``CIFAR10_CLASSES[j]`` (the standard order), whatever order the archive
lists them in. Rows are ordered by class, then file name, so a load is deterministic.

Decoding 60,000 JPEGs takes a while (docs/results.md, "Teachers"), so the decoded uint8 arrays
are cached as an ``.npz`` in ``cache_dir`` (default ``runs/.cache``), keyed by the
source's path, size and modification time (an archive) or by every image's path,
size and modification time (a folder): a changed source is decoded again, never
served stale. The cache file is written atomically, so a crash or two runs filling
it at once never leave a torn file; an unreadable cache is decoded again.

Images stay uint8 [N, 32, 32, 3] (RGB, HWC), the teachers' wire format: scaling and
normalisation happen in each model (``services.teacher_server.images``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.teacher_server.atomic_files import write_file_atomically
from services.teacher_server.images import CIFAR10_CLASSES, CIFAR10_SIZE

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_CACHE_DIR = Path("runs/.cache")
CACHE_FORMAT = "cifar10-npz/1"
# Validation rows carved out of train by the split seed (500 per class): teachers and students hold out
# the same rows, so early stopping never sees test images.
VALID_ROWS = 5000


@dataclass(frozen=True)
class Images:
    """Labelled images as parallel arrays."""

    images: np.ndarray  # uint8 [N, 32, 32, 3], RGB, HWC
    labels: np.ndarray  # int64 [N], index into CIFAR10_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Images:
        return Images(self.images[index], self.labels[index])


@dataclass(frozen=True)
class CIFAR10:
    train: Images
    test: Images
    classes: tuple[str, ...]
    source: str  # where the images came from, for run configs and reports

    def split_validation(self, n_valid: int = VALID_ROWS, seed: int = 0) -> tuple[Images, Images]:
        """Carve a seeded, class-stratified validation set of ``n_valid`` rows out of train.

        Each class gives ``n_valid // n_classes`` rows (the remainder to the first classes),
        drawn by ``numpy.random.default_rng(seed + 1_000_003)``; both parts keep train's row order.
        """
        if not 0 < n_valid < len(self.train):
            raise ValueError(f"n_valid must be in (0, {len(self.train)}), got {n_valid}")
        rng = np.random.default_rng(seed + 1_000_003)
        n_classes = len(self.classes)
        chosen = []
        for c in range(n_classes):
            rows = np.flatnonzero(self.train.labels == c)
            want = n_valid // n_classes + (1 if c < n_valid % n_classes else 0)
            if want > len(rows):
                raise ValueError(f"class {self.classes[c]!r} has {len(rows)} training images; cannot hold out {want}")
            chosen.append(rng.permutation(rows)[:want])
        valid = np.sort(np.concatenate(chosen))
        keep = np.ones(len(self.train), bool)
        keep[valid] = False
        return self.train.take(np.flatnonzero(keep)), self.train.take(valid)


class LayoutError(ValueError):
    """The source is not laid out as train/<class>/*.jpg and test/<class>/*.jpg with the CIFAR-10 classes."""


def load_cifar10(source: str | Path, *, cache_dir: str | Path | None = DEFAULT_CACHE_DIR) -> CIFAR10:
    """Load CIFAR-10 from a tar(.gz) archive or a folder; ``cache_dir=None`` decodes without caching."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: {source} (a cifar-10-jpg.tar.gz or a folder)")
    if source.is_dir():
        for split in SPLITS:
            if not (source / split).is_dir():
                raise LayoutError(
                    f"{source} has no {split}/ folder: expected train/<class>/*.jpg and test/<class>/*.jpg"
                )
    elif not tarfile.is_tarfile(source):
        raise LayoutError(f"{source} is neither a folder nor a tar archive")
    description = f"{source.name}: CIFAR-10 JPEGs (train/test folders per class)"
    cache = None if cache_dir is None else Path(cache_dir) / f"cifar10-{_cache_key(source)}.npz"
    if cache is not None and cache.is_file():
        arrays = _read_cache(cache)
        if arrays is not None:
            return _build(arrays, description)
    start = time.perf_counter()
    arrays = _decode(source)
    log.info("decoded %d CIFAR-10 images from %s in %.1f s", sum(len(arrays[f"{s}_labels"]) for s in SPLITS),
             source, time.perf_counter() - start)
    if cache is not None:
        write_file_atomically(cache, lambda f: np.savez(f, format=np.array(CACHE_FORMAT), **arrays))
    return _build(arrays, description)


def _build(arrays: dict[str, np.ndarray], source: str) -> CIFAR10:
    train, test = (Images(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS)
    return CIFAR10(train, test, CIFAR10_CLASSES, source)


def _cache_key(source: Path) -> str:
    """A digest of what the decoded arrays depend on: the source's identity and its files' size and mtime."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(str(source.resolve()).encode())
    if source.is_dir():
        for path in sorted(p for split in SPLITS for p in (source / split).rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"\0{path.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    else:
        stat = source.stat()
        digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["format"]) != CACHE_FORMAT:
                return None
            arrays = {k: f[k] for k in f.files if k != "format"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable CIFAR-10 cache %s (%s); decoding again", path, err)
        return None
    return arrays


def _decode(source: Path) -> dict[str, np.ndarray]:
    """Decode every image into per-split arrays, checking the layout and the class set."""
    from PIL import Image

    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {s: {} for s in SPLITS}
    for parts, data in _image_files(source):
        if len(parts) < 3 or parts[-3] not in SPLITS:
            raise LayoutError(f"{source}: {'/'.join(parts)} is not under train/<class>/ or test/<class>/")
        found[parts[-3]].setdefault(parts[-2], []).append((parts[-1], data))
    for split in SPLITS:
        got = set(found[split])
        if got != set(CIFAR10_CLASSES):
            missing, extra = sorted(set(CIFAR10_CLASSES) - got), sorted(got - set(CIFAR10_CLASSES))
            raise LayoutError(
                f"{source}: {split}/ class folders differ from the CIFAR-10 classes "
                f"(missing {missing or 'none'}, unexpected {extra or 'none'}); expected {list(CIFAR10_CLASSES)}"
            )
    arrays = {}
    for split in SPLITS:
        images, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            for file_name, data in sorted(found[split][name]):
                with Image.open(io.BytesIO(data)) as image:
                    pixels = np.asarray(image.convert("RGB"))
                if pixels.shape != (CIFAR10_SIZE, CIFAR10_SIZE, 3):
                    raise LayoutError(f"{source}: {split}/{name}/{file_name} is {pixels.shape[1]}x{pixels.shape[0]}, "
                                      f"CIFAR-10 images are {CIFAR10_SIZE}x{CIFAR10_SIZE}")
                images.append(pixels)
                labels.append(label)
        arrays[f"{split}_images"] = np.stack(images).astype(np.uint8, copy=False)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    return arrays


def _image_files(source: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """(path parts relative to the source, file bytes) of every image file, folder or archive."""
    if source.is_dir():
        for split in SPLITS:
            for path in (source / split).rglob("*"):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    yield path.relative_to(source).parts, path.read_bytes()
        return
    with tarfile.open(source, "r:*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
            yield parts, archive.extractfile(member).read()


# -- augmentation ---------------------------------------------------------------------------------


def augment_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one training step: the same (seed, step) gives the same crops and flips."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip (the standard CIFAR recipe) on uint8 [N, H, W, C].

    Each image is padded by ``padding`` pixels per side, cropped back to H x W at a uniform random
    offset, and mirrored left-right with probability 1/2. The random numbers come from
    ``generator`` (a CPU generator) only, so a step is reproducible wherever the images live.
    """
    n, h, w, _ = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    device = images.device
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h)  # [N, H]
    cols = offsets[:, 1:] + torch.arange(w)  # [N, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    return padded[batch.to(device), rows[:, :, None].to(device), cols[:, None, :].to(device)]
