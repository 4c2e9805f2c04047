import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.train import train_fold

with logging_to(snakemake.log[0]):
    train_fold(snakemake.input.patches, snakemake.input.folds, int(snakemake.wildcards.k),
               out_model=snakemake.output.model, out_history=snakemake.output.history,
               checkpoint_dir=snakemake.params.checkpoints, threads=snakemake.threads,
               preprocessing={"preprocess": snakemake.params.cfg["preprocess"],
                              "lungmask": snakemake.params.cfg["lungmask"]},
               **snakemake.params.cfg["train"])
