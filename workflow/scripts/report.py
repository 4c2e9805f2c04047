import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.report import build_report

with logging_to(snakemake.log[0]):
    build_report(list(snakemake.input.metrics), list(snakemake.input.candidates), snakemake.input.folds,
                 snakemake.input.annotations,
                 excluded_path=snakemake.input.get("excluded"), out_summary=snakemake.output.summary,
                 out_plot=snakemake.output.plot, out_html=snakemake.output.html,
                 scans_paths=list(snakemake.input.scans), nodules_paths=list(snakemake.input.nodules),
                 crops_paths=list(snakemake.input.crops_index),
                 probabilities_dirs=list(snakemake.input.probabilities),
                 **snakemake.params.cfg["evaluate"])
