import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.patchplan import plan_patches

with logging_to(snakemake.log[0]):
    plan_patches(list(snakemake.input.slices), snakemake.output.plan, **snakemake.params.cfg)
