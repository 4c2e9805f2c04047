import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.preprocess import resample_scan

with logging_to(snakemake.log[0]):
    resample_scan(snakemake.input.scan, snakemake.input.annotations, snakemake.wildcards.uid,
                  out_image=snakemake.output.image, out_labels=snakemake.output.labels,
                  mask_path=snakemake.input.get("mask"), **snakemake.params.cfg["preprocess"])
