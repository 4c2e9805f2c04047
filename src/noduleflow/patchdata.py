"""Training patches read from disk on demand, and the batches of one epoch.

A patches file (``patches.h5``, :mod:`noduleflow.sampling`) holds ``image`` int16 HU (n, c, h, w),
``mask`` and ``roi`` uint8 (n, h, w), one patch per chunk, and a small table (``seriesuid``,
``kind``, ...). :class:`PatchFile` keeps only the table in memory and reads the patches a batch
needs when it needs them, so the memory of a training job does not grow with the number of scans
(nnU-Net's loaders work the same way); the h5 file is opened once per process, so DataLoader
workers each read on their own handle. :class:`ArrayPatches` is the same interface over arrays
already in memory (tests, benchmarks).

:class:`PatchBatches` is one epoch's batches over such a source: batch order and augmentation are
pure functions of ``(seed, epoch, batch index)``, so the batches (and the trained weights on CPU)
are the same whether patches come from memory or disk and with any number of workers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from noduleflow.augment import augment_batch
from noduleflow.intensity import normalize_intensity, with_lung_channel
from noduleflow.io import InputError, open_h5
from noduleflow.model import build_targets
from noduleflow.sampling import PATCH_DATASETS, index_runs

#: patches read at once by the streaming passes over a file (statistics, digests): ~60 MB of
#: 7-channel 64 x 64 int16 images
BLOCK = 1024


def seed_of(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1


class Patches(Protocol):
    """What batches are drawn from: ``len()`` patches, ``take(index, names)`` -> the arrays ``names``
    (default image, mask, roi) in the order of ``index`` (image int16 HU (n, c, h, w), mask and roi
    uint8 (n, h, w))."""

    def __len__(self) -> int: ...

    def take(self, index: np.ndarray, names: Sequence[str] = PATCH_DATASETS) -> tuple[np.ndarray, ...]: ...


class ArrayPatches:
    """:class:`Patches` over arrays in memory (``seriesuid``: each patch's scan, when known; ``draw``:
    each patch's draw, :mod:`noduleflow.sampling`, default all 0)."""

    def __init__(self, image: np.ndarray, mask: np.ndarray, roi: np.ndarray, seriesuid: np.ndarray | None = None,
                 draw: np.ndarray | None = None):
        self.image, self.mask, self.roi = image, mask, roi
        self.seriesuid = seriesuid
        self.draw = np.zeros(len(image), dtype=np.int32) if draw is None else np.asarray(draw, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.image)

    def take(self, index: np.ndarray, names: Sequence[str] = PATCH_DATASETS) -> tuple[np.ndarray, ...]:
        index = np.asarray(index, dtype=np.int64)
        arrays = {"image": self.image, "mask": self.mask, "roi": self.roi}
        return tuple(arrays[name][index] for name in names)


class PatchFile:
    """Patches files read on demand, as one sequence: one ``patches.h5`` or the per-scan files of
    the pipeline (``patches/scans/{seriesuid}.h5``), given as a list or a folder of ``*.h5``, in
    the order given (a folder: sorted by name, i.e. by seriesuid). In memory: the table
    (``seriesuid``; ``draw``, 0 for files written before draws existed), the attributes and the
    shapes; patches are read by :meth:`take`. Raises InputError naming the file when one is
    missing, is not a patches file, or was sampled with other settings than the first."""

    #: open files kept per process (a LUNA16 cohort has 888 per-scan files)
    MAX_OPEN = 64

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        if isinstance(paths, (str, Path)):
            paths = sorted(Path(paths).glob("*.h5")) if Path(paths).is_dir() else [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise InputError("no patches files given")
        uids, draws, sizes, self.attrs, self.image_shape = [], [], [], None, None
        for path in self.paths:
            if not path.is_file():
                raise InputError(f"{path}: patches file not found")
            with open_h5(path) as store:
                missing = [n for n in PATCH_DATASETS + ("seriesuid",) if n not in store]
                if missing:
                    raise InputError(f"{path}: not a patches file (missing {', '.join(missing)})")
                image, mask, roi = (store[n].shape for n in PATCH_DATASETS)
                if len(image) != 4 or mask != (image[0],) + image[2:] or roi != mask:
                    raise InputError(f"{path}: image {image}, mask {mask} and roi {roi} must be (n, c, h, w), "
                                     f"(n, h, w), (n, h, w)")
                seriesuid = store["seriesuid"][()].astype(str)
                if len(seriesuid) != image[0]:
                    raise InputError(f"{path}: {len(seriesuid)} seriesuids for {image[0]} patches")
                draw = store["draw"][()].astype(np.int32) if "draw" in store else np.zeros(image[0], np.int32)
                if len(draw) != image[0]:
                    raise InputError(f"{path}: {len(draw)} draw indices for {image[0]} patches")
                attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in store.attrs.items()}
            if self.attrs is None:
                self.attrs, self.image_shape = attrs, tuple(int(v) for v in image)
            elif attrs != self.attrs or tuple(image[1:]) != self.image_shape[1:]:
                differ = sorted(k for k in set(attrs) | set(self.attrs) if attrs.get(k) != self.attrs.get(k))
                raise InputError(f"{path}: sampled with other settings than {self.paths[0]} "
                                 f"({', '.join(differ) or 'patch shape'})")
            uids.append(seriesuid)
            draws.append(draw)
            sizes.append(int(image[0]))
        self.seriesuid = np.concatenate(uids)
        self.draw = np.concatenate(draws)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.image_shape = (int(self.offsets[-1]),) + tuple(self.image_shape[1:])
        self._handles: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return self.image_shape[0]

    def __getstate__(self) -> dict:  # DataLoader workers get a copy without the open handles
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def meta(self) -> dict[str, Any]:
        """The sampling settings inference must repeat: context, context_step, patch_size, lung_roi,
        roi_margin_mm (0 for files written before it existed)."""
        c, size = self.image_shape[1], self.image_shape[-1]
        return {"context": int(self.attrs.get("context", (c - 1) // 2)),
                "context_step": int(self.attrs.get("context_step", 1)),
                "patch_size": int(self.attrs.get("patch_size", size)),
                "lung_roi": bool(self.attrs.get("lung_roi", True)),
                "roi_margin_mm": float(self.attrs.get("roi_margin_mm", 0.0))}

    def _store(self, i: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.pop(i, None)
        if handle is None:
            import h5py

            if len(self._handles) >= self.MAX_OPEN:  # close the least recently used
                self._handles.pop(next(iter(self._handles))).close()
            handle = h5py.File(self.paths[i], "r", locking=False)
        self._handles[i] = handle  # most recently used last
        return handle

    @property
    def nbytes(self) -> int:
        """Bytes of all patches (image int16, mask and roi uint8) once read into memory."""
        n, c, h, w = self.image_shape
        return int(n) * (int(c) * h * w * 2 + 2 * h * w)

    def in_memory(self) -> ArrayPatches:
        """Every patch read into memory, file by file (one read per dataset and file), as an
        :class:`ArrayPatches` with the same order and ``seriesuid``: for cohorts whose patches fit
        in memory, where reading batch by batch would cost more than it saves."""
        n, c, h, w = self.image_shape
        image = np.empty((n, c, h, w), dtype=np.int16)
        mask = np.empty((n, h, w), dtype=np.uint8)
        roi = np.empty((n, h, w), dtype=np.uint8)
        for i in range(len(self.paths)):
            store, a, b = self._store(i), int(self.offsets[i]), int(self.offsets[i + 1])
            for name, out in (("image", image), ("mask", mask), ("roi", roi)):
                store[name].read_direct(out, dest_sel=np.s_[a:b])
        self.close()
        return ArrayPatches(image, mask, roi, self.seriesuid, self.draw)

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles, self._pid = {}, None

    def take(self, index: np.ndarray, names: Sequence[str] = PATCH_DATASETS) -> tuple[np.ndarray, ...]:
        """The patches ``index`` (positions in the sequence, any order, repeats allowed), in that order."""
        index = np.asarray(index, dtype=np.int64)
        unique, inverse = np.unique(index, return_inverse=True)
        if len(unique) and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"{self.paths[0]}: patch index out of range 0..{len(self) - 1}")
        files = np.searchsorted(self.offsets, unique, side="right") - 1
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for i in np.unique(files).tolist():
            local = unique[files == i] - self.offsets[i]
            store = self._store(i)
            for name in names:
                parts[name].extend(store[name][a:b] for a, b in index_runs(local))
        out = []
        for name in names:
            shape = (0,) + ((self.image_shape[1:]) if name == "image" else tuple(self.image_shape[2:]))
            block = (np.concatenate(parts[name]) if parts[name]
                     else np.zeros(shape, np.int16 if name == "image" else np.uint8))
            out.append(block[inverse])
        return tuple(out)


class PatchSubset:
    """:class:`Patches` made of the patches ``index`` of a :class:`PatchFile` (or any source), in
    that order; ``take`` and ``blocks`` read only what they return."""

    def __init__(self, source: PatchFile | ArrayPatches, index: np.ndarray):
        self.source = source
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, index: np.ndarray, names: Sequence[str] = PATCH_DATASETS) -> tuple[np.ndarray, ...]:
        return self.source.take(self.index[np.asarray(index, dtype=np.int64)], names)

    def blocks(self, block: int | None = None,
               names: Sequence[str] = PATCH_DATASETS) -> Iterator[tuple[np.ndarray, ...]]:
        """The subset in order, ``block`` patches (default :data:`BLOCK`) at a time (bounded memory)."""
        block = block or BLOCK
        for start in range(0, len(self), block):
            yield self.take(np.arange(start, min(start + block, len(self))), names)


class PatchBatches(torch.utils.data.Dataset):
    """Batches of one epoch over a :class:`Patches` source: item ``b`` is batch ``b`` (a dict of
    tensors ``image`` (n, c, h, w) float32 in [0, 1] (+ jitter; the roi as a last channel when
    the ``intensity`` block says ``lung_channel``), ``target`` (n, C, h, w),
    ``weight`` (n, 1, h, w) = roi, ``mask`` (n, h, w)). Batch order and augmentation are pure
    functions of ``(seed, epoch, b)``, so the batches are the same with any number of DataLoader
    workers and whether the source reads from memory or disk."""

    def __init__(self, patches: Patches, label_mode: str, intensity: Mapping[str, Any], batch_size: int,
                 augment: Mapping[str, Any] | None = None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 drop_last: bool = True, min_batches: int | None = None):
        """``min_batches``: when one pass over the patches makes fewer batches, the epoch goes on
        over further passes (each its own seeded shuffle, ``seed_of(seed, 21, epoch, j)`` for pass
        ``j`` >= 1) until it has that many; the first pass is the plain epoch's (None: one pass)."""
        self.patches = patches
        self.label_mode = label_mode
        self.intensity = dict(intensity)
        self.augment = dict(augment) if augment else None
        self.seed, self.epoch = int(seed), int(epoch)
        n = len(patches)
        order = (np.random.default_rng(seed_of(self.seed, 21, self.epoch)).permutation(n)
                 if shuffle else np.arange(n))
        n_batches = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
        if min_batches is not None and n and min_batches > n_batches:
            passes = [order]
            while sum(map(len, passes)) < min_batches * batch_size:
                j = len(passes)
                passes.append(np.random.default_rng(seed_of(self.seed, 21, self.epoch, j)).permutation(n)
                              if shuffle else np.arange(n))
            order, n_batches = np.concatenate(passes), int(min_batches)
        self.batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        image, mask, roi = self.patches.take(self.batches[b])[:3]
        image = normalize_intensity(image, self.intensity)
        if self.augment:
            image, mask, roi = augment_batch(image, mask, roi, self.augment,
                                             np.random.default_rng(seed_of(self.seed, 31, self.epoch, b)))
        image = with_lung_channel(np.asarray(image, dtype=np.float32), roi, self.intensity)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "target": build_targets(mask, roi, self.label_mode),
                "weight": torch.from_numpy(np.ascontiguousarray(roi, dtype=np.float32))[:, None],
                "mask": torch.from_numpy(np.ascontiguousarray(mask))}


def iterate_batches(dataset: PatchBatches, num_workers: int,
                    loader_options: Mapping[str, Any] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``dataset`` in order: in this process (``num_workers`` 0) or prepared by that
    many DataLoader worker processes (reading and augmenting in parallel with the training step).
    ``loader_options``: further DataLoader arguments (:func:`noduleflow.train.loader_settings`:
    ``pin_memory`` on CUDA)."""
    if num_workers <= 0:
        for b in range(len(dataset)):
            yield dataset[b]
        return
    options = {"num_workers": num_workers, "persistent_workers": False, **dict(loader_options or {})}
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, **options)
    yield from loader
