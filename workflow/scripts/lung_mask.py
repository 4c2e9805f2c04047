import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.lungmask import lung_mask_file

with logging_to(snakemake.log[0]):
    lung_mask_file(snakemake.input.image, snakemake.output.mask, **snakemake.params.cfg["lungmask"])
