import _src  # noqa: F401
from noduleflow.folds import split_folds
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    cv = dict(snakemake.params.cfg["cv"], split_file=snakemake.input.get("split_file"))
    split_folds(snakemake.input.annotations, snakemake.params.uids, snakemake.output.folds,
                groups_path=snakemake.input.get("groups"), strata_path=snakemake.input.get("strata"), **cv)
