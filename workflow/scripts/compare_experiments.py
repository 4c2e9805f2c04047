import _src  # noqa: F401
from pathlib import Path

from noduleflow.experiments import compare_experiments
from noduleflow.logs import logging_to
from noduleflow.runconfig import BASE_PREFIX, run_configs

with logging_to(snakemake.log[0]):
    summaries = {name: path for name, path in snakemake.input.items() if "__" not in name}
    # train.training_scans of each experiment (config/paper_small_data.yaml): the learning curve's x
    scans = {Path(prefix).name: run["train"].get("training_scans")
             for prefix, run in run_configs(snakemake.config).items() if prefix != BASE_PREFIX}
    compare_experiments(summaries, out_table=snakemake.output.table, out_html=snakemake.output.html,
                        out_plot=snakemake.output.plot, training_scans=scans)
