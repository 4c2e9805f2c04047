import _src  # noqa: F401
from noduleflow.apply import PredictSettings, apply_models, resolve_device
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    inputs = snakemake.params.inputs
    predict_cfg = dict(snakemake.params.cfg["predict"])
    # predict.device is checked here so that an error names the config key (not --device)
    device = resolve_device(predict_cfg.pop("device", "auto"), "config predict.device")
    settings = PredictSettings(**predict_cfg)
    # the rule's log is the output folder's predict.log, which apply_models writes itself
    apply_models(list(snakemake.input.models), [inputs] if isinstance(inputs, str) else list(inputs),
                 snakemake.config["apply"]["output"], settings=settings, device=device,
                 threads=snakemake.threads, log_file=False,
                 classifiers=list(snakemake.input.get("classifiers", [])) or None)
