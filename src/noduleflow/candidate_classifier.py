"""The second stage: a small 3-D CNN that re-scores candidates from crops around them.

The LUNA16 false-positive-reduction idea: the detector proposes candidates, a classifier that sees
each candidate in 3-D, with context (:mod:`noduleflow.candidate_crops`), says how likely it is a
nodule. Input: a crop (channels :data:`noduleflow.candidate_crops.CHANNELS`, s^3, scaled to the
candidate's size) and the candidate's log diameter (the crop's scale hides the size). Output: one
logit.

Training set of a classifier (:func:`fit_classifier`): crops of candidates labelled by their
LUNA16 outcome (a hit of an annotated nodule = 1, a false positive = 0; candidates on excluded
findings are left out), plus crops centred on every annotated nodule (label 1, also the ones the
detector missed). Classes are balanced in the loss (each class weighs half). Every epoch, each
sample is shown once, in a random order, as a random one of its stored variants, flipped along
random axes and with its axes permuted at random (the crops are isotropic in mm). AdamW, cosine
learning rate. All randomness comes from the ``seed``: on the same CPU the same crops give the same
weights (bfloat16 is not used here; float32 kernels may still differ between CPU types).

Scoring (:func:`classify`): the mean of the sigmoid over the crop and its 7 flips (the variant-0
crop only). :func:`combine` turns detector and classifier probabilities into the candidate's new
probability.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Mapping

import numpy as np
import torch
from torch import nn

from noduleflow.candidate_crops import CHANNELS

log = logging.getLogger(__name__)

#: how a candidate's new probability is made from the detector's (p) and the classifier's (q)
COMBINE = ("classifier", "mean", "geometric")
#: filters of the first layer and passes over the training crops (the second_stage defaults)
WIDTH = 8
EPOCHS = 20


class CropClassifier(nn.Module):
    """3-D CNN: (n, len(CHANNELS), s, s, s) crops (s divisible by 8) and (n, 1) log diameters -> (n,) logits."""

    def __init__(self, width: int = WIDTH, dropout: float = 0.2):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
                                 nn.ReLU(inplace=True))

        w = int(width)
        self.features = nn.Sequential(
            block(len(CHANNELS), w), nn.MaxPool3d(2),            # s -> s/2
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool3d(2),  # s/2 -> s/4
            block(2 * w, 4 * w), nn.MaxPool3d(2),                # s/4 -> s/8
        )
        self.head = nn.Sequential(nn.Linear(8 * w + 1, 2 * w), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(2 * w, 1))

    def forward(self, crops: torch.Tensor, log_diameter: torch.Tensor) -> torch.Tensor:
        f = self.features(crops)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), f.amax(dim=(2, 3, 4))], dim=1)
        return self.head(torch.cat([pooled, log_diameter.reshape(-1, 1)], dim=1)).reshape(-1)


def log_diameter(diameters_mm: np.ndarray) -> np.ndarray:
    """The size input: log(diameter / 10 mm), float32; unknown or non-positive diameters count as 3 mm."""
    d = np.asarray(diameters_mm, dtype=np.float64)
    d = np.where(np.isfinite(d) & (d > 0), d, 3.0)
    return np.log(d / 10.0).astype(np.float32)


def _to_tensor(crops_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(crops_u8, dtype=np.float32) / 255.0)


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and a random axis permutation of each crop (n, c, z, y, x)."""
    out = np.empty_like(batch)
    for i, crop in enumerate(batch):
        perm = rng.permutation(3)
        crop = crop.transpose(0, *(1 + perm))
        flips = tuple(1 + a for a in range(3) if rng.random() < 0.5)
        out[i] = np.flip(crop, axis=flips) if flips else crop
    return out


def fit_classifier(crops: np.ndarray, diameters_mm: np.ndarray, is_nodule: np.ndarray, seed: int,
                   epochs: int = EPOCHS, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4,
                   width: int = WIDTH, threads: int = 1) -> tuple[CropClassifier, dict] | None:
    """A trained :class:`CropClassifier` and a summary (counts, final loss, seconds), or None when
    ``is_nodule`` lacks a class.

    ``crops``: uint8 (n, variants, channels, s, s, s) as :func:`noduleflow.candidate_crops.crop_variants`;
    ``diameters_mm`` (n,), ``is_nodule`` (n,) bool."""
    crops = np.asarray(crops)
    if crops.ndim != 6 or crops.shape[2] != len(CHANNELS) or len(set(crops.shape[3:])) != 1:
        raise ValueError(f"crops of shape {crops.shape}; expected (n, variants, {len(CHANNELS)}, s, s, s)")
    y = np.asarray(is_nodule, dtype=bool)
    if len(y) != len(crops) or len(diameters_mm) != len(crops):
        raise ValueError(f"{len(crops)} crops, {len(diameters_mm)} diameters, {len(y)} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.manual_seed(int(seed))
        rng = np.random.default_rng(int(seed))
        model = CropClassifier(width)
        size_in = log_diameter(diameters_mm)
        weights = np.where(y, 0.5 / n_pos, 0.5 / n_neg).astype(np.float32) * len(y)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(len(y) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        model.train()
        last = float("nan")
        for epoch in range(epochs):
            order = rng.permutation(len(y))
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:   # batch norm needs two samples
                    continue
                variant = rng.integers(0, crops.shape[1], len(idx))
                batch = _augment(crops[idx, variant], rng)
                logits = model(_to_tensor(batch), torch.from_numpy(size_in[idx]))
                loss = (loss_fn(logits, torch.from_numpy(y[idx].astype(np.float32)))
                        * torch.from_numpy(weights[idx])).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            last = total / max(count, 1)
            log.debug("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, last)
        model.eval()
    finally:
        torch.set_num_threads(old_threads)
    return model, {"n_nodule": n_pos, "n_false_positive": n_neg, "epochs": int(epochs),
                   "final_loss": last, "seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def classify(model: CropClassifier, crops: np.ndarray, diameters_mm: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(nodule) of each crop: uint8 (n, channels, s, s, s) (variant 0); the mean over the 8 flips."""
    crops = np.asarray(crops)
    out = np.zeros(len(crops), dtype=np.float64)
    if not len(crops):
        return out
    model.eval()
    size_in = torch.from_numpy(log_diameter(diameters_mm))
    flips = [tuple(2 + a for a in axes) for r in range(4) for axes in itertools.combinations(range(3), r)]
    for start in range(0, len(crops), batch_size):
        x = _to_tensor(crops[start:start + batch_size])
        s = size_in[start:start + batch_size]
        p = torch.zeros(len(x), dtype=torch.float64)
        for axes in flips:
            p += torch.sigmoid(model(torch.flip(x, axes) if axes else x, s)).double()
        out[start:start + len(x)] = (p / len(flips)).numpy()
    return out


def combine(detector: np.ndarray, classifier: np.ndarray, how: str) -> np.ndarray:
    """The candidate's new probability: the classifier's, the mean of both, or their geometric mean."""
    p = np.asarray(detector, dtype=np.float64)
    q = np.asarray(classifier, dtype=np.float64)
    if how == "classifier":
        return q
    if how == "mean":
        return (p + q) / 2.0
    if how == "geometric":
        return np.sqrt(np.clip(p, 0, 1) * np.clip(q, 0, 1))
    raise ValueError(f"combine {how!r} is not one of {', '.join(COMBINE)}")


def state_of(model: CropClassifier, width: int) -> Mapping:
    """What a saved classifier holds (weights and the width to rebuild it)."""
    return {"width": int(width), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def from_state(state: Mapping) -> CropClassifier:
    model = CropClassifier(int(state["width"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model
