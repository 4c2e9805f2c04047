import _src  # noqa: F401
from noduleflow.folds import split_folds
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    split_folds(snakemake.input.annotations, snakemake.params.uids, snakemake.output.folds,
                groups_path=snakemake.params.groups, **snakemake.params.cfg["cv"])
