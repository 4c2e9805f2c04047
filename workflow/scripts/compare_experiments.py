import _src  # noqa: F401
from noduleflow.experiments import compare_experiments
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    compare_experiments(dict(snakemake.input.items()), out_table=snakemake.output.table,
                        out_html=snakemake.output.html, out_plot=snakemake.output.plot)
