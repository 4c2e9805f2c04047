import _src  # noqa: F401
from noduleflow.apply import PredictSettings, apply_models
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    inputs = snakemake.params.inputs
    settings = PredictSettings(**snakemake.params.cfg["predict"])
    # the rule's log is the output folder's predict.log, which apply_models writes itself
    apply_models(list(snakemake.input.models), [inputs] if isinstance(inputs, str) else list(inputs),
                 snakemake.config["apply"]["output"], settings=settings, threads=snakemake.threads,
                 log_file=False)
