"""Train one cross-validation fold's 2D U-Net on the balanced patches, resumably and reproducibly.

Data: the scans' patches files (``patches/scans/{seriesuid}.h5``, or one ``patches.h5``; image
int16 HU (n, c, h, w), ``mask`` and ``roi`` (n, h, w); :mod:`noduleflow.sampling`), read batch by
batch (:class:`noduleflow.patchdata.PatchFile`: memory does not grow with the cohort), and
``folds.csv`` (``seriesuid,fold``). The fold's
*training scans* are all scans not in fold ``k`` (with ``training_scans: n``, ``n`` of them:
:func:`training_subset`, the small-data experiment); a seeded inner split of them by scan
(``validation_fraction``, stratified by whether a scan has positive patches) is the validation set
that picks the best epoch (lowest validation loss, or highest validation Dice with ``select_on:
dice``) and stops early. The loss is the default criterion: on a few validation scans the
thresholded Dice jumps with single nodules found or lost from one epoch to the next (it picked an
epoch-2 model in a 9-epoch run), while the loss moves smoothly. The held-out fold is only used
once, after training, to report the selected model's **held-out patch Dice**. When the patches were
sampled in several draws (``sampling.draws``), epoch ``e`` trains on draw ``(e - 1) mod draws``
(:func:`draw_subsets`: fresh patches each epoch); validation, the held-out patch Dice, the output
bias and the CT statistics use draw 0.

Each batch: intensity normalisation (:func:`noduleflow.intensity.normalize_intensity`: the HU
window -> [0, 1], or nnU-Net's CT scheme with statistics of the training nodules), then per-patch
augmentation (:func:`augment_batch`: optional zoom, flips, 90-degree rotations, a contrast change
that also shows solid nodules as faint ground-glass-like ones, intensity jitter). Targets by label
mode (:func:`noduleflow.model.build_targets`); the loss counts pixels inside the patch's ``roi``
only (:mod:`noduleflow.losses`). The output bias starts at the logit of the target's pixel share.
Optimiser AdamW; learning rate schedule one-cycle (warm-up over the first 20 % of the steps to
``lr``, then cosine annealing towards ``lr / 1e4``), stepped every batch; ``history.csv`` records
the last rate of each epoch. Validation and the saved model use an exponential moving average of
the weights (``ema_decay``; :class:`WeightAverage`).

Reproducibility: all randomness of an epoch (batch order, augmentation, dropout) is a pure function
of ``(seed, epoch)`` (and the batch index), and weights start from ``torch.manual_seed(seed)``. So
on CPU two runs with one seed give identical weights, and a run killed after epoch ``e`` and rerun
resumes from the checkpoint of epoch ``e`` and ends with weights identical to an uninterrupted run.
That is ``deterministic: true`` (the default: deterministic algorithms, no cuDNN autotuning); ``false``
lets cuDNN pick the fastest convolutions on a GPU, whose results may differ from run to run.

Checkpoints: ``checkpoint_dir/last.pt`` (atomic) after every epoch: model, optimiser, scheduler,
AMP scaler, epoch, best weights and score, early-stopping counter, history so far and a hash of
everything that determines the run (training config except ``num_workers``, fold, training and
validation data, source of the modules the train stage runs:
:func:`noduleflow.runconfig.code_digest`). A checkpoint with another hash is not resumed
(logged; training starts fresh).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from noduleflow.folds import read_folds
from noduleflow.intensity import input_channels
from noduleflow.io import InputError, atomic_path, write_csv_atomic
from noduleflow.losses import LOSSES, make_loss
from noduleflow.model import (LABEL_MODES, UNet2d, autocast_dtype, memory_format_for, nodule_probability,
                              out_channels_for)
from noduleflow.model import select_device as _select_device
from noduleflow.patchdata import (ArrayPatches, PatchBatches, Patches, PatchFile, PatchSubset, iterate_batches,
                                  seed_of)
from noduleflow.runconfig import code_digest

log = logging.getLogger(__name__)

#: the ``train:`` block's defaults (config.yaml holds the same values)
DEFAULTS: dict[str, Any] = {
    "label_mode": "positive",
    "loss": "dice_mixed_bce",
    "pos_weight": 1.0,
    "focal_gamma": 2.0,
    "epochs": 9,
    "batch_size": 32,
    "lr": 0.002,
    "weight_decay": 0.0001,
    "ema_decay": 0.99,
    "validation_fraction": 0.2,
    "training_scans": None,
    "min_batches_per_epoch": None,
    "early_stopping_patience": 4,
    "select_on": "loss",
    "intensity": {"mode": "window", "window_hu": [-1000, 400], "lung_channel": False},
    "augment": {"flips": True, "rot90": True, "intensity_jitter": 0.05, "zoom": [1.0, 2.0], "zoom_p": 0.3,
                "contrast": [0.1, 1.2],
                "nodule_contrast": [0.2, 0.6], "nodule_contrast_p": 0.3},
    "model": {"depth": 3, "base_filters": 16, "norm": "batch", "dropout": 0.0},
    "device": "auto",
    "amp": True,
    "deterministic": True,
    "num_workers": 0,
    "patch_memory_mb": 512,
    "seed": 0,
}

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"]
CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
#: keys that do not change what a run computes, left out of the checkpoint's config hash (device,
#: amp and deterministic change the numbers and stay in)
_HASH_EXCLUDED = ("num_workers", "patch_memory_mb")
_PCT_WARMUP = 0.2
_EVAL_BATCH = 128


class TrainingInterrupted(RuntimeError):
    """Raised by ``train_fold(..., stop_after_epoch=e)`` right after epoch ``e``'s checkpoint is
    written: a stand-in for a kill in tests."""


# --------------------------------------------------------------------------- configuration


def resolve_config(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train_cfg`` merged over :data:`DEFAULTS`; raises InputError naming an unknown or bad key."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in train_cfg.items():
        if key not in DEFAULTS:
            raise InputError(f"config train.{key}: unknown key (known: {', '.join(DEFAULTS)})")
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, Mapping):
                raise InputError(f"config train.{key}: expected a mapping, got {value!r}")
            for sub in value:
                if sub not in DEFAULTS[key]:
                    raise InputError(f"config train.{key}.{sub}: unknown key (known: {', '.join(DEFAULTS[key])})")
            cfg[key].update(copy.deepcopy(dict(value)))
        else:
            cfg[key] = copy.deepcopy(value)
    if cfg["label_mode"] not in LABEL_MODES:
        raise InputError(f"config train.label_mode: {cfg['label_mode']!r} is not one of {', '.join(LABEL_MODES)}")
    if cfg["loss"] not in LOSSES:
        raise InputError(f"config train.loss: {cfg['loss']!r} is not one of {', '.join(LOSSES)}")
    if cfg["select_on"] not in ("loss", "dice"):
        raise InputError(f"config train.select_on: {cfg['select_on']!r} is not loss or dice")
    if cfg["device"] not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"config train.device: {cfg['device']!r} is not auto, cpu, cuda or mps")
    if not isinstance(cfg["deterministic"], bool):
        raise InputError(f"config train.deterministic: {cfg['deterministic']!r} must be true or false")
    if isinstance(cfg["patch_memory_mb"], bool) or not isinstance(cfg["patch_memory_mb"], (int, float)) \
            or cfg["patch_memory_mb"] < 0:
        raise InputError(f"config train.patch_memory_mb: {cfg['patch_memory_mb']!r} must be a number >= 0")
    if isinstance(cfg["num_workers"], bool) or not isinstance(cfg["num_workers"], int) or cfg["num_workers"] < 0:
        raise InputError(f"config train.num_workers: {cfg['num_workers']!r} must be an integer >= 0")
    for key in ("epochs", "batch_size", "early_stopping_patience"):
        if int(cfg[key]) < 1:
            raise InputError(f"config train.{key}: must be >= 1, got {cfg[key]!r}")
    if cfg["training_scans"] is not None and (isinstance(cfg["training_scans"], bool)
                                              or not isinstance(cfg["training_scans"], int)
                                              or cfg["training_scans"] < 2):
        raise InputError(f"config train.training_scans: {cfg['training_scans']!r} must be null (all) or an "
                         f"integer >= 2 (one scan is kept for the inner validation split)")
    if cfg["min_batches_per_epoch"] is not None and (isinstance(cfg["min_batches_per_epoch"], bool)
                                                     or not isinstance(cfg["min_batches_per_epoch"], int)
                                                     or cfg["min_batches_per_epoch"] < 1):
        raise InputError(f"config train.min_batches_per_epoch: {cfg['min_batches_per_epoch']!r} must be null "
                         f"(one pass over the patches) or an integer >= 1")
    if not 0 < float(cfg["validation_fraction"]) < 1:
        raise InputError(f"config train.validation_fraction: must be in (0, 1), got {cfg['validation_fraction']!r}")
    window = cfg["intensity"]["window_hu"]
    if len(window) != 2 or not float(window[0]) < float(window[1]):
        raise InputError(f"config train.intensity.window_hu: {window!r} must be [low, high] with low < high")
    for key, lowest in (("zoom", 1.0), ("contrast", 0.0), ("nodule_contrast", 0.0)):
        span = cfg["augment"][key]
        if not isinstance(span, (list, tuple)) or len(span) != 2 or not lowest <= float(span[0]) <= float(span[1]):
            raise InputError(f"config train.augment.{key}: {span!r} must be [low, high] with {lowest:g} <= low <= high")
    for key in ("zoom_p", "nodule_contrast_p"):
        if not 0.0 <= float(cfg["augment"][key]) <= 1.0:
            raise InputError(f"config train.augment.{key}: {cfg['augment'][key]!r} must be a probability in [0, 1]")
    if not isinstance(cfg["intensity"]["lung_channel"], bool):
        raise InputError(f"config train.intensity.lung_channel: {cfg['intensity']['lung_channel']!r} "
                         "must be true or false")
    if cfg["intensity"]["mode"] not in ("window", "ct"):
        raise InputError(f"config train.intensity.mode: {cfg['intensity']['mode']!r} is not window or ct")
    return json.loads(json.dumps(cfg))  # plain builtins (stored in model.pt and hashed)


def select_device(device: str = "auto") -> torch.device:
    """The device of ``train.device``: ``auto``: cuda if available, else mps, else cpu; otherwise the
    named device, checked to exist (InputError naming ``train.device``). The same function as
    ``predict.device`` (:func:`noduleflow.model.select_device`)."""
    return _select_device(device, "config train.device", auto_mps=True)


def loader_settings(device: torch.device | str, num_workers: int) -> dict[str, Any]:
    """The resource keywords of a ``torch.utils.data.DataLoader`` that feeds a training on
    ``device`` with ``num_workers`` worker processes (``train.num_workers``; 0 = batches made in the
    training process): ``num_workers``; ``pin_memory`` true exactly when there are workers and the
    device is CUDA (page-locked batches: the ``.to(device, non_blocking=True)`` copy overlaps the
    step); ``persistent_workers`` false (a DataLoader serves one epoch, its dataset is that epoch's
    batches, so workers could not be reused). None of them changes the batches."""
    workers = int(num_workers)
    if workers < 0:
        raise InputError(f"config train.num_workers: {num_workers!r} must be >= 0")
    return {"num_workers": workers, "pin_memory": workers > 0 and torch.device(device).type == "cuda",
            "persistent_workers": False}


# --------------------------------------------------------------------------- data


def training_subset(uids: Sequence[str], has_positive: Mapping[str, bool], n: int | None, seed: int,
                    fold: int) -> list[str]:
    """The ``n`` training scans a fold uses out of its ``uids`` (all of them when ``n`` is None or not
    smaller), for the small-data experiment. The scans are put in a seeded order (a function of
    ``seed`` and ``fold``) in which every prefix of length ``m`` holds ``round(m * share)`` scans
    with nodules (``share`` their share of ``uids``; at least one when there is any) and the first
    ``n`` are taken: the subsets of one fold are nested (the 2 scans are among the 4, ...) and keep
    the cohort's mix of scans with and without nodules. Sorted."""
    uids = sorted(str(u) for u in uids)
    if n is None or n >= len(uids):
        return uids
    rng = np.random.default_rng(seed_of(seed, 17, fold))
    groups = {}
    for flag in (True, False):
        group = [u for u in uids if bool(has_positive.get(u, False)) == flag]
        groups[flag] = [group[i] for i in rng.permutation(len(group))]
    share = len(groups[True]) / len(uids)
    order: list[str] = []
    while len(order) < n:
        taken = len(order) + 1
        quota = max(1, int(round(taken * share))) if groups[True] else 0
        with_nodules = sum(bool(has_positive.get(u, False)) for u in order)
        flag = (with_nodules < quota and bool(groups[True])) or not groups[False]
        order.append(groups[flag].pop(0))
    return sorted(order)


def inner_split(uids: list[str], has_positive: Mapping[str, bool], fraction: float,
                seed: int) -> tuple[list[str], list[str]]:
    """Split training scans into (train, validation) by scan, seeded, stratified by nodule presence:
    ``round(fraction * n)`` scans of each group (at least one validation scan in all, and at
    least one training scan left)."""
    rng = np.random.default_rng(seed_of(seed, 11))
    val: list[str] = []
    for flag in (True, False):
        group = sorted(u for u in uids if bool(has_positive.get(u, False)) == flag)
        n_val = int(round(fraction * len(group)))
        if flag and n_val == 0 and len(group) >= 2:
            n_val = 1  # keep nodules in the validation set when there are any to spare
        val.extend(group[i] for i in rng.permutation(len(group))[:n_val])
    if not val:
        val = [sorted(uids)[int(rng.integers(len(uids)))]]
    if len(val) == len(uids):
        val = val[:-1]
    val_set = set(val)
    return sorted(u for u in uids if u not in val_set), sorted(val_set)


def scans_with_nodule_pixels(patches: PatchFile | ArrayPatches, uids: Sequence[str]) -> dict[str, bool]:
    """For each of ``uids``: whether any of its draw-0 patches in ``patches`` has a nodule pixel
    (masks read scan by scan, block by block; every draw of a scan has the same kinds of patches)."""
    first = np.flatnonzero(patches.draw == 0)
    groups = pd.Series(first).groupby(patches.seriesuid[first]).indices  # one pass, not one per scan
    rows = {uid: first[at] for uid, at in groups.items()}
    out = {}
    for uid in uids:
        subset = PatchSubset(patches, rows.get(uid, np.zeros(0, dtype=np.int64)))
        out[uid] = any(bool(mask.any()) for (mask,) in subset.blocks(names=("mask",)))
    return out


def intensity_block(cfg_intensity: Mapping[str, Any], patches: PatchSubset) -> dict[str, Any]:
    """The ``intensity`` block stored in model.pt and used at training and inference
    (:func:`noduleflow.intensity.normalize_intensity`). ``mode: window``: ``{"mode": "window",
    "window_hu"}``. ``mode: ct`` (nnU-Net's CT scheme): the statistics of the nodule pixels (inside
    the ROI, all context channels) of the training ``patches`` (read block by block), from
    :func:`noduleflow.intensity.ct_statistics`; with no nodule pixel, of all ROI pixels. Either
    with ``lung_channel: true`` when the config asks for the lung mask as an input channel
    (:func:`noduleflow.intensity.with_lung_channel`)."""
    channel = {"lung_channel": True} if cfg_intensity.get("lung_channel", False) else {}
    if cfg_intensity.get("mode", "window") == "window":
        return {"mode": "window", "window_hu": [float(v) for v in cfg_intensity["window_hu"]], **channel}
    from noduleflow.intensity import ct_statistics

    def values(foreground_only: bool) -> np.ndarray:
        parts = []
        for image, mask, roi in patches.blocks():
            keep = ((mask > 0) & (roi > 0)) if foreground_only else (roi > 0)
            parts.append(np.moveaxis(image, 1, 0)[:, keep])
        return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0), np.int16)

    foreground = values(True)
    if foreground.size == 0:
        log.warning("no nodule pixels in the training patches: CT statistics of all ROI pixels")
        foreground = values(False)
    return {**ct_statistics(foreground), "window_hu": [float(v) for v in cfg_intensity["window_hu"]], **channel}


# --------------------------------------------------------------------------- evaluation


def evaluate(model: torch.nn.Module, patches: Patches, label_mode: str, intensity: Mapping[str, Any],
             device: torch.device | str = "cpu", loss_fn=None, threshold: float = 0.5,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(mean loss, Dice) of ``model`` on ``patches`` (a :class:`noduleflow.patchdata.Patches` source,
    read batch by batch), normalised with ``intensity`` (a model's intensity block), no
    augmentation, model in eval mode. ``amp_dtype``: run the model under autocast to that dtype
    (training passes its own, so validation sees what inference with ``predict.amp`` computes);
    None: float32. The loss is computed in float32 either way.

    Dice is over all pixels of all patches: nodule probability (positive head for hybrid) above
    ``threshold`` inside the ROI vs the nodule mask; 1.0 when both are empty; NaN without patches.
    The loss is NaN when ``loss_fn`` is None."""
    if len(patches) == 0:
        return float("nan"), float("nan")
    model.eval()
    device = torch.device(device)
    data = PatchBatches(patches, label_mode, intensity, _EVAL_BATCH, augment=None, shuffle=False,
                        drop_last=False)
    instance = any(isinstance(m, torch.nn.InstanceNorm2d) for m in model.modules())
    memory_format = memory_format_for("instance" if instance else "batch")
    total_loss, inter, pred_sum, true_sum = 0.0, 0, 0, 0
    with torch.inference_mode():
        for batch in data:
            x = batch["image"].to(device).contiguous(memory_format=memory_format)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            if loss_fn is not None:
                loss = loss_fn(logits, batch["target"].to(device), batch["weight"].to(device))
                total_loss += float(loss) * len(x)
            prob = nodule_probability(logits, label_mode, "positive").cpu()
            pred = (prob > threshold) & (batch["weight"][:, 0] > 0)
            true = batch["mask"] > 0
            inter += int((pred & true).sum())
            pred_sum += int(pred.sum())
            true_sum += int(true.sum())
    dice = 1.0 if pred_sum + true_sum == 0 else 2.0 * inter / (pred_sum + true_sum)
    return (total_loss / len(patches) if loss_fn is not None else float("nan")), dice


# --------------------------------------------------------------------------- checkpoints


def data_digest(*subsets: PatchSubset) -> str:
    """A digest of the patches of ``subsets`` (content, shapes, order), read block by block."""
    digest = hashlib.blake2b(digest_size=16)
    for subset in subsets:
        digest.update(f"|{len(subset)}|".encode())
        for arrays in subset.blocks():
            for array in arrays:
                array = np.ascontiguousarray(array)
                digest.update(str((array.dtype.str, array.shape)).encode())
                digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def draw_subsets(source: PatchFile | ArrayPatches, rows: np.ndarray, where: str | Path) -> list[PatchSubset]:
    """The patches of ``rows`` (bool per patch of ``source``), one subset per draw (0, 1, ...;
    ``source.draw``): what epochs 1, 2, ... train on in turn. InputError (naming
    ``where``) when the draws are not numbered 0 .. D-1 or hold different numbers of patches (the
    learning-rate schedule counts one draw's batches per epoch)."""
    draw = source.draw
    present = np.unique(draw[rows])
    if len(present) == 0:
        return [PatchSubset(source, np.zeros(0, dtype=np.int64))]
    if present.tolist() != list(range(len(present))):
        raise InputError(f"{where}: patch draws {present.tolist()} are not numbered 0 .. {len(present) - 1}")
    subsets = [PatchSubset(source, np.flatnonzero(rows & (draw == d))) for d in present.tolist()]
    sizes = sorted({len(subset) for subset in subsets})
    if len(sizes) > 1:
        raise InputError(f"{where}: the draws of the training scans hold different numbers of patches {sizes}")
    return subsets


def _attrs_digest(attrs: Mapping[str, Any]) -> str:
    """The sampling settings of a patches file as a short digest (they decide every draw's patches)."""
    text = json.dumps({str(k): str(v) for k, v in sorted(attrs.items())}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _config_hash(cfg: Mapping, fold: int, data_digest: str) -> str:
    relevant = {k: v for k, v in cfg.items() if k not in _HASH_EXCLUDED}
    text = json.dumps({"train": relevant, "fold": int(fold), "data": data_digest, "code": code_digest("train"),
                       "format": CHECKPOINT_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cpu_state(module_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module_state.items()}


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` atomically. The temporary file is ``.<name>.<pid>.tmp`` (not
    ``*.pt``), so nothing that looks like a checkpoint exists before it is complete; stale
    temporaries of killed runs are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_checkpoint(path: Path, config_hash: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint means: start fresh
        log.warning("checkpoint %s unreadable (%s): starting fresh", path, exc)
        return None
    if not isinstance(state, dict) or state.get("config_hash") != config_hash:
        log.info("checkpoint %s was written for another configuration or data: not resumed, starting fresh", path)
        return None
    return state


def _init_head_prior(model: UNet2d, patches: PatchSubset, label_mode: str) -> None:
    """Start each output channel's bias at the logit of its target's share of ROI pixels in the
    training ``patches`` (clipped to [0.01, 0.99]), so the first epochs learn shapes instead of the
    class balance (as RetinaNet's prior initialisation does)."""
    inside, nodule = 0, 0
    for mask, roi in patches.blocks(names=("mask", "roi")):
        inside += int(np.count_nonzero(roi))
        nodule += int(np.count_nonzero((mask > 0) & (roi > 0)))
    share = float(nodule) / max(inside, 1)
    priors = {"positive": [share], "complementary": [1.0 - share], "hybrid": [share, 1.0 - share]}[label_mode]
    with torch.no_grad():
        for channel, prior in enumerate(priors):
            prior = min(max(prior, 0.01), 0.99)
            model.head.bias[channel] = math.log(prior / (1.0 - prior))


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (BatchNorm statistics), the
    model that is validated and saved: it smooths the epoch-to-epoch swings of a short training.

    After update ``t`` (1-based) the average moves towards the model by ``1 - d_t`` with
    ``d_t = min(decay, (t - 1) / t)``: a plain mean of the first ``1 / (1 - decay)`` updates, then
    an exponential average, so the initial weights do not linger. ``decay = 0`` keeps no average: ``model`` is the trained model itself."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model) if self.decay > 0 else model
        for parameter in self.model.parameters() if self.decay > 0 else ():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.decay <= 0:
            return
        self.updates += 1
        decay = min(self.decay, (self.updates - 1.0) / self.updates)
        averaged = [t for t in self.model.state_dict().values()]
        current = [t for t in model.state_dict().values()]
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model": _cpu_state(self.model.state_dict()) if self.decay > 0 else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        if self.decay > 0:
            self.model.load_state_dict(state["model"])


@contextlib.contextmanager
def _torch_settings(threads: int, device: torch.device, deterministic: bool = True) -> Iterator[None]:
    """Thread count (CPU) and the ``train.deterministic`` switch for the duration of a training;
    restored after. ``deterministic``: deterministic algorithms (warn only where an operation has
    none) and no cuDNN autotuning, so a run repeats; false: cuDNN benchmark mode (it times the
    convolution algorithms for each input shape and keeps the fastest; faster on GPU, and results
    may differ from run to run) and no deterministic algorithms."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = not deterministic
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench


# --------------------------------------------------------------------------- training


def train_fold(patches_path: str | Path | Sequence[str | Path], folds_path: str | Path, fold: int,
               out_model: str | Path, out_history: str | Path, checkpoint_dir: str | Path, threads: int = 1,
               stop_after_epoch: int | None = None, preprocessing: Mapping[str, Any] | None = None,
               **train_cfg: Any) -> dict[str, Any]:
    """Train fold ``fold``'s U-Net; write ``out_model`` (model.pt) and ``out_history`` (CSV).

    ``train_cfg`` is the ``train:`` config block (see :data:`DEFAULTS`). ``threads``: torch CPU
    threads. ``checkpoint_dir``: where ``last.pt`` is kept (resumed when its hash matches).
    ``stop_after_epoch``: test hook, raise :class:`TrainingInterrupted` right after that epoch's
    checkpoint (1-based), as if killed. ``preprocessing``: the settings the training scans were
    preprocessed with (``{"preprocess": {"spacing_mm", "lung_roi"}, "lungmask": {...}}``), stored
    in model.pt so inference on new scans repeats them (:mod:`noduleflow.apply`). Returns the
    metadata stored in model.pt (without weights).

    ``history.csv``: ``epoch,train_loss,val_loss,val_dice,lr,seconds`` (epochs 1-based) plus a last
    column ``heldout_patch_dice``, filled on the selected epoch's row only.
    """
    cfg = resolve_config(train_cfg)
    fold = int(fold)
    checkpoint_dir = Path(checkpoint_dir)
    folds = read_folds(folds_path, fold)
    patch_file = PatchFile(patches_path)
    where = patch_file.paths[0].parent if len(patch_file.paths) > 1 else patch_file.paths[0]
    patch_meta = patch_file.meta()

    patch_uids = patch_file.seriesuid
    fold_of = {str(u): int(k) for u, k in zip(folds["seriesuid"], folds["fold"])}
    unknown = sorted(set(patch_uids) - set(fold_of))
    if unknown:
        log.warning("%d scan(s) in %s are not in %s and are not used (e.g. %s)", len(unknown), where,
                    folds_path, unknown[0])
    train_scans = sorted({str(u) for u in patch_uids if u in fold_of and fold_of[u] != fold})
    heldout_scans = sorted({str(u) for u in patch_uids if fold_of.get(u) == fold})
    if len(train_scans) < 2:
        raise InputError(f"{where}: fold {fold} has {len(train_scans)} training scan(s) with patches; "
                         f"at least 2 are needed (one for the inner validation split)")
    # a cohort whose patches fit in train.patch_memory_mb is read once into memory (the same arrays,
    # so the same batches and weights); a larger one is read batch by batch, whatever its size
    if patch_file.nbytes <= float(cfg["patch_memory_mb"]) * 2 ** 20:
        source = patch_file.in_memory()
        log.info("fold %d: %d patches (%.0f MB) held in memory", fold, len(source), patch_file.nbytes / 2 ** 20)
    else:
        source = patch_file
        log.info("fold %d: %d patches (%.0f MB > train.patch_memory_mb) read from disk batch by batch", fold,
                 len(patch_file), patch_file.nbytes / 2 ** 20)
    has_positive = scans_with_nodule_pixels(source, train_scans)
    train_scans = training_subset(train_scans, has_positive, cfg["training_scans"], int(cfg["seed"]), fold)
    fit_scans, val_scans = inner_split(train_scans, has_positive, float(cfg["validation_fraction"]), int(cfg["seed"]))
    fit_draws = draw_subsets(source, np.isin(patch_uids, fit_scans), where)
    first_draw = source.draw == 0
    data = {"fit": fit_draws[0],
            **{name: PatchSubset(source, np.flatnonzero(np.isin(patch_uids, scans) & first_draw))
               for name, scans in (("val", val_scans), ("heldout", heldout_scans))}}
    log.info("fold %d: %d training scans (%d patches%s), %d inner validation scans (%d patches), "
             "%d held-out scans (%d patches)", fold, len(fit_scans), len(data["fit"]),
             f" in each of {len(fit_draws)} draws, one per epoch in turn" if len(fit_draws) > 1 else "",
             len(val_scans), len(data["val"]), len(heldout_scans), len(data["heldout"]))
    channels, height, width = patch_file.image_shape[1:]
    depth = int(cfg["model"]["depth"])
    if width % 2 ** depth or height % 2 ** depth:
        raise InputError(f"{where}: patch size {(height, width)} is not divisible by "
                         f"2**train.model.depth = {2 ** depth}")

    device = select_device(cfg["device"])
    amp_dtype = autocast_dtype(device, bool(cfg["amp"]))
    use_amp = amp_dtype == torch.float16  # the gradient scaler is needed for float16 only
    digest = (data_digest(data["fit"], data["val"]) + "|" + ",".join(fit_scans) + "|" + ",".join(val_scans)
              + f"|draws {len(fit_draws)}|" + _attrs_digest(patch_file.attrs))
    config_hash = _config_hash(cfg, fold, digest)
    intensity = intensity_block(cfg["intensity"], data["fit"])
    model_kwargs = {"in_channels": input_channels(channels, intensity),
                    "out_channels": out_channels_for(cfg["label_mode"]), **cfg["model"]}
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME

    with _torch_settings(threads, device, bool(cfg["deterministic"])):
        torch.manual_seed(seed_of(int(cfg["seed"]), 1))
        memory_format = memory_format_for(cfg["model"]["norm"])
        model = UNet2d(**model_kwargs)
        _init_head_prior(model, data["fit"], cfg["label_mode"])
        model = model.to(device).to(memory_format=memory_format)
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        steps = len(PatchBatches(data["fit"], cfg["label_mode"], intensity, int(cfg["batch_size"]),
                                 min_batches=cfg["min_batches_per_epoch"]))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(cfg["lr"]),
                                                        total_steps=int(cfg["epochs"]) * steps,
                                                        pct_start=_PCT_WARMUP)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        ema = WeightAverage(model, float(cfg["ema_decay"]))
        loss_fn = make_loss(cfg["loss"], float(cfg["pos_weight"]), float(cfg["focal_gamma"]))

        state = {"epoch": 0, "best_score": -math.inf, "best_dice": math.nan, "best_epoch": 0, "best_state": None,
                 "bad_epochs": 0, "history": [], "finished": False}
        saved = _load_checkpoint(checkpoint_path, config_hash)
        if saved is not None:
            model.load_state_dict(saved["model"])
            ema.load_state_dict(saved["ema"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if use_amp and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            state = {key: saved[key] for key in state}
            log.info("fold %d: resuming from %s after epoch %d", fold, checkpoint_path, state["epoch"])
        log.info("fold %d: device %s%s, %d CPU threads, %d epochs of %d batches of %d, label mode %s, loss %s",
                 fold, device, f" (mixed precision, {str(amp_dtype).replace('torch.', '')})" if amp_dtype else "",
                 torch.get_num_threads(),
                 cfg["epochs"], steps, cfg["batch_size"], cfg["label_mode"], cfg["loss"])

        epoch = int(state["epoch"])
        while not state["finished"] and epoch < int(cfg["epochs"]):
            epoch += 1
            started = time.perf_counter()
            torch.manual_seed(seed_of(int(cfg["seed"]), 41, epoch))
            model.train()
            batches = PatchBatches(fit_draws[(epoch - 1) % len(fit_draws)], cfg["label_mode"], intensity,
                                   int(cfg["batch_size"]), augment=cfg["augment"],
                                   seed=int(cfg["seed"]), epoch=epoch, min_batches=cfg["min_batches_per_epoch"])
            loss_sum, seen = 0.0, 0
            for batch in iterate_batches(batches, int(cfg["num_workers"]),
                                         loader_settings(device, int(cfg["num_workers"]))):
                x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                target = batch["target"].to(device, non_blocking=True)
                weight = batch["weight"].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    logits = model(x)
                loss = loss_fn(logits, target, weight)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                ema.update(model)
                loss_sum += float(loss.detach()) * len(x)
                seen += len(x)
            lr_now = float(optimizer.param_groups[0]["lr"])
            val_loss, val_dice = evaluate(ema.model, data["val"], cfg["label_mode"], intensity, device, loss_fn,
                                          amp_dtype=amp_dtype)
            score = val_dice if cfg["select_on"] == "dice" else -val_loss
            improved = score > state["best_score"]
            if improved:
                state.update(best_score=score, best_dice=val_dice, best_epoch=epoch,
                             best_state=_cpu_state(ema.model.state_dict()), bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            seconds = time.perf_counter() - started
            state["history"].append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_loss": val_loss,
                                     "val_dice": val_dice, "lr": lr_now, "seconds": round(seconds, 3)})
            stop_early = (state["bad_epochs"] >= int(cfg["early_stopping_patience"])
                          and epoch < int(cfg["epochs"]))  # the last epoch is no early stop
            state["epoch"] = epoch
            state["finished"] = stop_early or epoch >= int(cfg["epochs"])
            log.info("fold %d epoch %d/%d: train_loss %.4f val_loss %.4f val_dice %.4f lr %.2e %.1f s%s", fold,
                     epoch, cfg["epochs"], loss_sum / max(seen, 1), val_loss, val_dice, lr_now, seconds,
                     " (best)" if improved else "")
            if stop_early:
                log.info("fold %d: early stop after epoch %d (no better validation %s for %d epochs; best epoch %d)",
                         fold, epoch, cfg["select_on"], state["bad_epochs"], state["best_epoch"])
            save_checkpoint({**state, "config_hash": config_hash, "model": _cpu_state(model.state_dict()),
                             "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict() if use_amp else {}, "torch": str(torch.__version__)},
                            checkpoint_path)
            if stop_after_epoch is not None and epoch >= int(stop_after_epoch) and not state["finished"]:
                raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epoch)")

        model.load_state_dict(state["best_state"])
        _, heldout_dice = evaluate(model, data["heldout"], cfg["label_mode"], intensity, device, amp_dtype=amp_dtype)
    patch_file.close()
    if math.isnan(heldout_dice):
        log.warning("fold %d: no held-out patches, held-out patch Dice undefined", fold)
    log.info("fold %d: held-out patch Dice %.4f (model of epoch %d, validation Dice %.4f)", fold, heldout_dice,
             state["best_epoch"], state["best_dice"])

    meta = {"model": model_kwargs, "label_mode": cfg["label_mode"], "intensity": intensity,
            "context": patch_meta["context"], "context_step": patch_meta["context_step"],
            "patch_size": patch_meta["patch_size"],
            "lung_roi": patch_meta["lung_roi"], "roi_margin_mm": patch_meta["roi_margin_mm"], "fold": fold,
            "heldout_patch_dice": float(heldout_dice),
            "best_epoch": int(state["best_epoch"]), "val_dice": float(state["best_dice"]),
            "selected_on": cfg["select_on"],
            "train": cfg, "train_scans": fit_scans, "validation_scans": val_scans, "heldout_scans": heldout_scans,
            **copy.deepcopy(dict(preprocessing or {}))}
    history = pd.DataFrame(state["history"], columns=HISTORY_COLUMNS)
    history["heldout_patch_dice"] = np.where(history["epoch"] == state["best_epoch"], float(heldout_dice), np.nan)
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_model) as tmp:
        torch.save({"state_dict": state["best_state"], **meta}, tmp)
    write_csv_atomic(history, out_history)
    return meta
