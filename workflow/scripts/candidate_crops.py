import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.second_stage import write_fold_crops

with logging_to(snakemake.log[0]):
    cfg = snakemake.params.cfg["second_stage"]
    write_fold_crops(snakemake.input.candidates, snakemake.input.probabilities, snakemake.input.folds,
                     int(snakemake.wildcards.k), list(snakemake.input.slices), snakemake.input.annotations,
                     snakemake.output[0], excluded_path=snakemake.input.get("excluded"), variants=cfg["variants"],
                     crop_voxels=cfg["crop_voxels"], seed=cfg["seed"])
