"""The ``noduleflow`` command: argument parsing and terminal output only (the work is in
:mod:`noduleflow.apply`).

``noduleflow predict --models results/models --input PATH... --output DIR [--folds K...]
[--device auto] [--tta] [--threads N]``: the trained fold ensemble on new scans. Exit status 0 on
success, 1 for a bad input (the message names the file or setting), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from noduleflow.io import InputError
from noduleflow.planes import PLANES
from noduleflow.predict import CANDIDATE_SCORES, PREDICT_DEFAULTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noduleflow", description="noduleflow: lung nodule detection in chest CT")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "predict", help="apply the trained fold ensemble to new scans",
        description="Apply the fold models of a models folder (the pipeline's results/models) to new scans: "
                    "the pipeline's preprocessing (settings read from model.pt) and inference, the mean of the "
                    "fold probability maps, candidates. Writes DIR/candidates.csv (LUNA16 columns first), "
                    "DIR/labels/{seriesuid}.mha and DIR/probabilities/{seriesuid}.mha on each scan's own grid, "
                    "DIR/predictions.html and DIR/predict.log.")
    p.add_argument("--models", required=True, metavar="DIR",
                   help="models folder holding fold{k}/model.pt (e.g. results/models, copied anywhere)")
    p.add_argument("--input", "-i", required=True, nargs="+", metavar="PATH",
                   help="scans: image files (.mhd/.mha/.nrrd/.nii/.nii.gz), DICOM series folders, or data roots "
                        "in any layout")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--folds", nargs="+", type=int, metavar="K", help="only these folds' models (default: all)")
    p.add_argument("--device", default=PREDICT_DEFAULTS["device"],
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--classifiers", metavar="DIR",
                   help="re-score the candidates with the second stage's fold classifiers "
                        "(DIR/fold{k}/classifier.pt, e.g. results/second_stage; --folds selects as for --models)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4x the time)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--threshold", type=float, default=PREDICT_DEFAULTS["threshold"],
                   help="probability above which a voxel is part of a candidate (default %(default)s)")
    p.add_argument("--min-volume-mm3", type=float, default=PREDICT_DEFAULTS["min_volume_mm3"],
                   help="smaller components are dropped (default %(default)s)")
    p.add_argument("--candidate-score", choices=CANDIDATE_SCORES, default=PREDICT_DEFAULTS["candidate_score"],
                   help="a candidate's probability: mean or max over its component (default %(default)s)")
    p.add_argument("--elongation-exponent", type=float, default=PREDICT_DEFAULTS["elongation_exponent"],
                   help="a candidate's probability is divided by its elongation to this power: nodules are "
                        "round, vessel pieces long; 0 = off (default %(default)s)")
    p.add_argument("--coarse-scale", type=float, default=PREDICT_DEFAULTS["coarse_scale"],
                   help="a second pass at this many times the voxel size finds nodules larger than the training "
                        "ones; 1 = off (default %(default)s)")
    p.add_argument("--coarse-min-diameter-mm", type=float, default=PREDICT_DEFAULTS["coarse_min_diameter_mm"],
                   help="the coarse pass adds only objects at least this large (default %(default)s)")
    p.add_argument("--contrast-hu", type=float, default=PREDICT_DEFAULTS["contrast_hu"],
                   help="candidates less than this much denser than the lung around them (HU) rank lower in "
                        "proportion; 0 = off (default %(default)s)")
    p.add_argument("--planes", nargs="+", choices=PLANES, default=list(PREDICT_DEFAULTS["planes"]),
                   help="slicing planes whose maps are averaged (default: %(default)s)")
    p.add_argument("--hybrid-output", choices=("positive", "negative"), default=PREDICT_DEFAULTS["hybrid_output"],
                   help="which head of a hybrid model to read (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=PREDICT_DEFAULTS["batch_size"],
                   help="slices per forward pass (default %(default)s)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=PREDICT_DEFAULTS["amp"],
                   help="float32 even where the device has mixed precision")
    p.add_argument("--html-max-candidates", type=int, metavar="N",
                   help="crops per scan in predictions.html (default 100; all are in candidates.csv)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on the terminal")
    return parser


def _predict(args: argparse.Namespace) -> int:
    from noduleflow.apply import PredictSettings, apply_models
    from noduleflow.second_stage import find_classifiers

    settings = PredictSettings(threshold=args.threshold, min_volume_mm3=args.min_volume_mm3,
                               candidate_score=args.candidate_score, elongation_exponent=args.elongation_exponent,
                               hybrid_output=args.hybrid_output,
                               planes=tuple(args.planes), amp=args.amp, batch_size=args.batch_size, tta=args.tta,
                               coarse_scale=args.coarse_scale, coarse_min_diameter_mm=args.coarse_min_diameter_mm,
                               contrast_hu=args.contrast_hu)
    result = apply_models(args.models, args.input, args.output, folds=args.folds, settings=settings,
                          device=args.device, threads=args.threads, html_max_candidates=args.html_max_candidates,
                          classifiers=find_classifiers(args.classifiers, args.folds) if args.classifiers else None)
    print(f"{len(result.scans)} scan(s), {len(result.candidates)} candidate(s) -> {result.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``noduleflow`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("noduleflow")
    root.addHandler(handler)
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    handler.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return _predict(args)
    except InputError as exc:
        print(f"noduleflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        root.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
