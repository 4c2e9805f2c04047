# noduleflow: chest CT -> cross-validated 2D U-Net nodule segmenters -> LUNA16 FROC reports.
# This file only validates the configuration and includes the rules; see README.md.

from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/sampling.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/second_stage.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/apply.smk"


rule all:
    input:
        "results/reports/report.html",
        "results/reports/summary.csv",
    default_target: True
