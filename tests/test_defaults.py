"""One set of defaults: config.yaml, the schema's defaults and the Python functions' keyword defaults
agree, so calling noduleflow from Python without a setting gives what the pipeline runs with."""

from __future__ import annotations

import importlib
import inspect

import pytest
import yaml
from snakemake.utils import validate

from workflow_helpers import REPO_ROOT

CONFIG = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

#: module -> config blocks whose keys its functions take as keyword arguments
MODULE_BLOCKS = {
    "preprocess": ["preprocess"],
    "lungmask": ["lungmask"],
    "folds": ["cv"],
    "sampling": ["sampling", "preprocess"],
    "planes": ["sampling"],
    "intensity": ["train.intensity"],
    "model": ["train.model"],
    "losses": ["train"],
    "train": ["train", "train.augment", "train.intensity"],
    "predict": ["predict", "preprocess"],
    "evaluate": ["evaluate"],
    "report": ["evaluate"],
}
#: (module, function, parameter) named like a config key that means something else there
NOT_THE_SETTING = {
    # a torch device to put tensors on, resolved from train.device ("auto") before the call
    ("train", "evaluate", "device"),
    # the same, resolved from predict.device ("auto") by predict_fold / apply_models
    ("predict", "predict_volume", "device"),
    ("predict", "predict_plane", "device"),
    # the upper bound a fold number is checked against; None when reading back the pipeline's own
    # folds.csv (a user's split file is checked against cv.folds, passed explicitly)
    ("folds", "_fold_numbers", "folds"),
}


def _block(dotted: str) -> dict:
    value = CONFIG
    for part in dotted.split("."):
        value = value[part]
    return value


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)


def _keyword_defaults(module):
    """(qualified name, parameter, default) of every function and class defined in ``module``."""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            functions = [(name, obj)]
        elif inspect.isclass(obj):
            functions = [(f"{name}.{m}", f) for m, f in vars(obj).items() if inspect.isfunction(f)]
        else:
            continue
        for qualified, function in functions:
            for parameter in inspect.signature(function).parameters.values():
                if parameter.default is not inspect.Parameter.empty:
                    yield qualified, parameter.name, parameter.default


def test_config_yaml_is_exactly_the_schema_defaults():
    """What the schema fills in for an empty config is config.yaml: the generated config reference
    (docs/config.md, from the schema) shows the defaults a run really uses."""
    filled: dict = {}
    validate(filled, str(SCHEMA), set_default=True)
    assert filled == CONFIG


@pytest.mark.parametrize("module_name", sorted(MODULE_BLOCKS))
def test_python_keyword_defaults_are_the_config_defaults(module_name):
    module = importlib.import_module(f"noduleflow.{module_name}")
    checked, wrong = 0, []
    for qualified, parameter, default in _keyword_defaults(module):
        if (module_name, qualified, parameter) in NOT_THE_SETTING:
            continue
        for dotted in MODULE_BLOCKS[module_name]:
            block = _block(dotted)
            if parameter in block and not isinstance(block[parameter], dict):
                checked += 1
                if _plain(default) != _plain(block[parameter]):
                    wrong.append(f"{module_name}.{qualified}({parameter}={default!r}) but config.yaml "
                                 f"{dotted}.{parameter}: {block[parameter]!r}")
    assert not wrong, "\n".join(wrong)
    # modules whose functions take every setting explicitly have nothing to compare (yet)
    assert checked or module_name in {"intensity", "planes"}, f"no setting found in {module_name}"


def test_sampling_defaults_are_the_pipelines_twelve_millimetres_of_context():
    """The case that went wrong before: sampling's signatures said context=1, context_step=1 while the
    pipeline samples 7 channels 2 slices apart."""
    from noduleflow.sampling import patch_file_attrs, sample_scan

    # sample_balanced_patches and sample_scan_file pass the sampling keys on to these two
    for function in (sample_scan, patch_file_attrs):
        parameters = inspect.signature(function).parameters
        assert parameters["context"].default == CONFIG["sampling"]["context"] == 3
        assert parameters["context_step"].default == CONFIG["sampling"]["context_step"] == 2
