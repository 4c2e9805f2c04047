"""Training speed, side by side in one run (not part of the test suite).

1. Our U-Net's training step (forward, Dice+BCE loss, backward, AdamW step) vs MONAI's BasicUNet
   (spatial_dims=2, the same features and input/output channels, the same norm) on the same batch:
   images/s and the ratio ours/MONAI. BasicUNet has a fixed depth of 4, so the comparison uses our
   U-Net at depth 4 with features base*(1, 2, 4, 8, 16), in the memory format training uses
   (:func:`noduleflow.model.memory_format_for`); MONAI is timed in its default memory format and
   in channels_last, and the ratio is taken against the faster of the two.
2. The patch loader (patches read batch by batch from patches.h5 by ``PatchFile``, HU window, the default augmentation,
   targets) vs the training step's consumption with the default ``train:`` config, in float32 and
   in the mixed precision training uses on this CPU (bfloat16 where the CPU has it): images/s and
   the ratio to the fastest step (the loader must be >= 5x faster so training never waits on data).

Usage::

    .venv/bin/pip install monai --no-deps          # benchmark only, not a project dependency
    .venv/bin/python benchmarks/train.py [--patches results/patches/patches.h5] [--threads 2]

Without ``--patches`` (and no ``results/patches/patches.h5``) a synthetic patches file is written
to a temporary folder: 3200 patches of (2 * context + 1)x64x64 (20 scans x 160, the default cohort's
size; ``sampling.context`` of config.yaml, 3 today). The U-Net vs BasicUNet batch has as many channels.
Timings alternate the two models round by round and report the median round, so a busy machine
hurts both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noduleflow.losses import make_loss
from noduleflow.model import UNet2d, autocast_dtype, build_targets, memory_format_for
from noduleflow.patchdata import PatchBatches, PatchFile
from noduleflow.train import DEFAULTS

REPO = Path(__file__).resolve().parents[1]


def default_context() -> int:
    """``sampling.context`` of the repository's config.yaml (the default run's 2 * context + 1 input
    channels), so the benchmark follows the default instead of keeping its own copy of it."""
    import yaml

    with open(REPO / "config.yaml") as f:
        return int(yaml.safe_load(f)["sampling"]["context"])


def synthetic_patches(path: Path, context: int, n_scans: int = 20, per_scan: int = 160, size: int = 64,
                      seed: int = 0) -> Path:
    """A contract-format patches.h5: bright discs / bright lines / nothing on noisy background."""
    import h5py

    rng = np.random.default_rng(seed)
    n = n_scans * per_scan
    yy, xx = np.mgrid[:size, :size]
    image = (-850 + rng.normal(0, 40, (n, 2 * context + 1, size, size))).astype(np.int16)
    mask = np.zeros((n, size, size), np.uint8)
    for i in range(0, n, 2):
        cy, cx = rng.uniform(12, size - 12, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(2.5, 8) ** 2
        image[i][:, disc] = 40
        mask[i] = disc
    with h5py.File(path, "w") as h5:
        h5["image"], h5["mask"], h5["roi"] = image, mask, np.ones_like(mask)
        h5["seriesuid"] = np.repeat([f"scan{k}" for k in range(n_scans)], per_scan).astype("S")
        for key in ("z", "y", "x"):
            h5[key] = np.zeros(n, np.int64)
        h5["kind"] = np.where(np.arange(n) % 2 == 0, "positive", "negative").astype("S")
        h5["plane"] = np.full(n, "axial").astype("S")
        h5.attrs.update({"context": context, "patch_size": size, "lung_roi": False, "seed": seed})
    return path


class _Step:
    """One optimiser step of a model on a fixed batch."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                 memory_format: torch.memory_format = torch.contiguous_format, amp_dtype: torch.dtype | None = None):
        self.amp_dtype = amp_dtype
        self.model = model.to(memory_format=memory_format)
        self.x = x.contiguous(memory_format=memory_format)
        self.target = target
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.loss = make_loss("dice_bce")
        self.model.train()

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits = self.model(self.x)
        loss = self.loss(logits, self.target)
        loss.backward()
        self.optimizer.step()


def _time_rounds(steps: dict[str, _Step], rounds: int, per_round: int, batch: int) -> dict[str, float]:
    """Median images/s per entry over ``rounds`` interleaved rounds of ``per_round`` steps."""
    for step in steps.values():  # warm-up (allocator, oneDNN primitives)
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            rates[name].append(batch * per_round / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def compare_with_monai(batch: int, size: int, base: int, norm: str, rounds: int, per_round: int,
                       channels: int, amp_dtype: torch.dtype | None = None) -> list[tuple]:
    from monai.networks.nets import BasicUNet

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, size, size, generator=gen)
    target = (torch.rand(batch, 1, size, size, generator=gen) < 0.05).float()
    features = (base, 2 * base, 4 * base, 8 * base, 16 * base, base)
    monai_norm = ("batch", {}) if norm == "batch" else ("instance", {"affine": True})
    torch.manual_seed(0)
    steps = {
        "ours": _Step(UNet2d(channels, 1, depth=4, base_filters=base, norm=norm), x, target, memory_format_for(norm),
                      amp_dtype),
        "monai": _Step(BasicUNet(spatial_dims=2, in_channels=channels, out_channels=1, features=features,
                                 norm=monai_norm), x, target, torch.contiguous_format, amp_dtype),
        "monai_cl": _Step(BasicUNet(spatial_dims=2, in_channels=channels, out_channels=1, features=features,
                                    norm=monai_norm), x, target, torch.channels_last, amp_dtype),
    }
    rate = _time_rounds(steps, rounds, per_round, batch)
    best_monai = max(rate["monai"], rate["monai_cl"])
    precision = str(amp_dtype).replace("torch.", "") + " autocast" if amp_dtype else "float32"
    label = f"features {features[:5]}, {norm} norm, batch {batch}x{channels}x{size}x{size}, {precision}"
    return [(label, rate["ours"], rate["monai"], rate["monai_cl"], rate["ours"] / best_monai)]


def loader_vs_step(patches: Path, rounds: int) -> tuple[float, dict[str, float], float, dict]:
    """(loader images/s incl. reading the file, training-step images/s by precision, file read
    seconds, config)."""
    cfg = DEFAULTS
    start = time.perf_counter()
    patch_file = PatchFile(patches)  # the table only: patches are read batch by batch
    read_seconds = time.perf_counter() - start
    channels = patch_file.image_shape[1]
    batch = int(cfg["batch_size"])
    seen, start = 0, time.perf_counter()
    for epoch in range(1, rounds + 1):
        batches = PatchBatches(patch_file, cfg["label_mode"], cfg["intensity"], batch,
                               augment=cfg["augment"], seed=0, epoch=epoch)
        for b in range(len(batches)):
            seen += len(batches[b]["image"])
    loader_rate = seen / (time.perf_counter() - start + read_seconds)

    sample = PatchBatches(patch_file, cfg["label_mode"], cfg["intensity"], batch,
                          augment=cfg["augment"], seed=0, epoch=1)[0]
    torch.manual_seed(0)
    model = UNet2d(channels, 1, **cfg["model"])
    target = build_targets(sample["mask"], sample["weight"][:, 0], "positive")
    steps = {"float32": _Step(model, sample["image"], target, memory_format_for(cfg["model"]["norm"]))}
    amp_dtype = autocast_dtype(torch.device("cpu"), bool(cfg["amp"]))
    if amp_dtype is not None:
        torch.manual_seed(0)
        steps[str(amp_dtype).replace("torch.", "")] = _Step(UNet2d(channels, 1, **cfg["model"]), sample["image"],
                                                             target, memory_format_for(cfg["model"]["norm"]), amp_dtype)
    step_rate = _time_rounds(steps, 5, 5, batch)
    return loader_rate, step_rate, read_seconds, {"n": len(patch_file), "shape": patch_file.image_shape[1:], "batch": batch,
                                                  "model": cfg["model"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=Path, default=None, help="patches.h5 (default: results/patches/patches.h5 "
                        "if present, else a synthetic one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {torch.backends.mkldnn.is_available() and 'oneDNN'}")
    context = default_context()

    try:
        import monai

        print(f"monai {monai.__version__}\n")
        print("## Training step: our U-Net vs MONAI BasicUNet (same batch, Dice+BCE, AdamW)\n")
        print("| configuration | ours (img/s) | MONAI (img/s) | MONAI channels_last (img/s) | ours / best MONAI |")
        print("|---|---:|---:|---:|---:|")
        amp_dtype = autocast_dtype(torch.device("cpu"), True)
        cases = [(base, norm, None) for base in (16, 8) for norm in ("batch", "instance")]
        if amp_dtype is not None:  # the precision training uses on this CPU
            cases += [(16, "batch", amp_dtype), (8, "batch", amp_dtype)]
        for base, norm, dtype in cases:
            for row in compare_with_monai(args.batch_size, args.size, base, norm, args.rounds,
                                          args.steps_per_round, 2 * context + 1, dtype):
                print(f"| {row[0]} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} | {row[4]:.2f}x |", flush=True)
    except ImportError:
        print("monai not installed (.venv/bin/pip install monai --no-deps): skipping the MONAI comparison")

    patches = args.patches
    if patches is None:
        default = REPO / "results" / "patches" / "patches.h5"
        patches = default if default.is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        if patches is None:
            patches = synthetic_patches(Path(tmp) / "patches.h5", context, size=args.size)
            source = "synthetic (20 scans x 160 patches)"
        else:
            source = str(patches)
        loader, step, read_s, info = loader_vs_step(patches, rounds=2)
    print(f"\n## Patch loader vs training step ({source}: {info['n']} patches {tuple(info['shape'])}, "
          f"batch {info['batch']}, model {info['model']})\n")
    print("| stage | img/s |")
    print("|---|---:|")
    print(f"| loader: patches streamed from disk (table {read_s:.2f} s, counted) + HU window + default augmentation + targets "
          f"| {loader:.0f} |")
    for precision, rate in step.items():
        print(f"| training step, default train: config, {precision} | {rate:.0f} |")
    fastest = max(step.values())
    print(f"| loader / fastest step | {loader / fastest:.1f}x {'(>= 5x: ok)' if loader >= 5 * fastest else '(< 5x!)'} |")


if __name__ == "__main__":
    sys.exit(main())
