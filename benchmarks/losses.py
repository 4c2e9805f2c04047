"""Label mode x loss on real patches: held-out patch Dice of short trainings (not part of the test suite).

Trains fold ``--fold`` of a pipeline's ``patches.h5`` / ``folds.csv`` once per requested
``label_mode:loss`` pair with the ``train:`` block of config.yaml (``--epochs`` overrides its
epochs) and prints, per pair, the held-out patch Dice of the selected model, the best validation
Dice, the epoch it came from and the training time. Every pair sees the same data, seed and
schedule, so the rows differ only in labels and loss. Used to choose the complementary-label loss
(README, "Complementary labels"). Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/losses.py --patches results/patches/patches.h5 \\
        --folds results/folds.csv --fold 0 --epochs 5 complementary:dice complementary:dice_both
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import yaml

from noduleflow.train import train_fold

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="label_mode:loss, e.g. complementary:dice_both")
    parser.add_argument("--patches", default=str(REPO / "results/patches/patches.h5"))
    parser.add_argument("--folds", default=str(REPO / "results/folds.csv"))
    parser.add_argument("--fold", type=int, action="append", help="fold(s) to train (default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="another train override, e.g. ema_decay=0 (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with open(REPO / "config.yaml") as f:
        base = yaml.safe_load(f)["train"]
    if args.epochs is not None:
        base["epochs"] = args.epochs
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = yaml.safe_load(value)
    print("label_mode loss fold heldout_patch_dice best_val_dice best_epoch seconds", flush=True)
    for fold in args.fold or [0]:
        for pair in args.pairs:
            label_mode, _, loss = pair.partition(":")
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                meta = train_fold(args.patches, args.folds, fold, out_model=Path(tmp) / "model.pt",
                                  out_history=Path(tmp) / "history.csv", checkpoint_dir=Path(tmp) / "ck",
                                  threads=args.threads, **{**base, "label_mode": label_mode, "loss": loss})
                seconds = time.perf_counter() - started
            print(f"{label_mode} {loss} {fold} {meta['heldout_patch_dice']:.3f} {meta['val_dice']:.3f} "
                  f"{meta['best_epoch']} {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
