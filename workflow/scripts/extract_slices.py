import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.slices import extract_slices

with logging_to(snakemake.log[0]):
    extract_slices(snakemake.input.image, snakemake.input.lung, snakemake.input.labels,
                   snakemake.wildcards.uid, snakemake.output.slices)
