import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.synthetic import synthesize_scan

with logging_to(snakemake.log[0]):
    synthesize_scan(snakemake.wildcards.uid, snakemake.params.cfg, out_scan=snakemake.output.scan,
                    out_mask=snakemake.output.mask, out_lungs=snakemake.output.lungs,
                    out_nodules=snakemake.output.nodules)
