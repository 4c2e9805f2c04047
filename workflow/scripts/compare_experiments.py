import _src  # noqa: F401
from noduleflow.experiments import compare_experiments
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    summaries = {name: path for name, path in snakemake.input.items() if "__" not in name}
    compare_experiments(summaries, out_table=snakemake.output.table,
                        out_html=snakemake.output.html, out_plot=snakemake.output.plot)
