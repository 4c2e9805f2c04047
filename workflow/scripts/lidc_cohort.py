import _src  # noqa: F401
from noduleflow.lidc import write_cohort_tables
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    write_cohort_tables(list(snakemake.input.nodules), list(snakemake.input.excluded),
                        snakemake.output.annotations, snakemake.output.excluded, snakemake.output.strata)
