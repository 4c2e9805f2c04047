import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.sampling import sample_scan_file

with logging_to(snakemake.log[0]):
    cfg = snakemake.params.cfg
    sample_scan_file(snakemake.input.slices, snakemake.output.patches, lung_roi=cfg["preprocess"]["lung_roi"],
                     **snakemake.params.counts, **cfg["sampling"])
