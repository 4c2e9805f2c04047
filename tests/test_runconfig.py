"""Experiments, narrow per-stage params, stage ownership and code digests (noduleflow.runconfig)."""

import ast
import copy
from pathlib import Path

import pytest
import yaml

from noduleflow import runconfig
from noduleflow.runconfig import (BASE_PREFIX, ConfigError, check_config, deep_merge, run_configs,
                                  stage_owner, stage_params)


@pytest.fixture()
def base_config(repo_root):
    return yaml.safe_load((repo_root / "config.yaml").read_text())


def test_deep_merge_overrides_nested_keys_only(base_config):
    original = copy.deepcopy(base_config)
    merged = deep_merge(base_config, {"train": {"model": {"depth": 5}}})
    assert merged["train"]["model"]["depth"] == 5
    assert merged["train"]["model"]["base_filters"] == base_config["train"]["model"]["base_filters"]
    assert base_config == original  # the input is not modified


def test_stage_params_carry_only_the_keys_a_stage_reads(base_config):
    resample = stage_params(base_config, "resample")
    assert resample == {"preprocess": {"spacing_mm": base_config["preprocess"]["spacing_mm"],
                                       "sphere_min_hu": base_config["preprocess"]["sphere_min_hu"]}}
    changed = copy.deepcopy(base_config)
    changed["preprocess"]["lung_roi"] = not changed["preprocess"]["lung_roi"]
    changed["train"]["lr"] = 0.5
    assert stage_params(changed, "resample") == resample
    assert stage_params(changed, "lung_mask") == stage_params(base_config, "lung_mask")
    assert stage_params(changed, "sample_patches") != stage_params(base_config, "sample_patches")
    assert stage_params(changed, "train") != stage_params(base_config, "train")


def test_experiment_with_training_overrides_shares_every_upstream_stage(base_config):
    config = dict(base_config, experiments={
        "complementary": {"train": {"label_mode": "complementary"}},
        "no_roi": {"preprocess": {"lung_roi": False}},
        "hybrid_pos": {"train": {"label_mode": "hybrid"}, "predict": {"hybrid_output": "positive"}},
        "hybrid_neg": {"train": {"label_mode": "hybrid"}, "predict": {"hybrid_output": "negative"}},
        "same": {},
    })
    runs = run_configs(config)
    comp = "results/experiments/complementary/"
    for stage in ("resample", "lung_mask", "extract_slices", "split_folds", "sample_patches"):
        assert stage_owner(runs, comp, stage) == BASE_PREFIX
    assert stage_owner(runs, comp, "train") == comp
    assert stage_owner(runs, comp, "report") == comp
    no_roi = "results/experiments/no_roi/"
    assert stage_owner(runs, no_roi, "extract_slices") == BASE_PREFIX
    assert stage_owner(runs, no_roi, "sample_patches") == no_roi
    # two experiments that differ only in which hybrid head is read share one training
    neg = "results/experiments/hybrid_neg/"
    assert stage_owner(runs, neg, "train") == "results/experiments/hybrid_pos/"
    assert stage_owner(runs, neg, "predict") == neg
    # an experiment equal to the base owns nothing
    assert stage_owner(runs, "results/experiments/same/", "report") == BASE_PREFIX


def test_invalid_values_name_the_key(base_config):
    bad = deep_merge(base_config, {"synthetic": {"min_nodules": 5, "max_nodules": 2}})
    with pytest.raises(ConfigError, match="synthetic.min_nodules"):
        check_config(bad)
    bad = deep_merge(base_config, {"train": {"intensity": {"window_hu": [400, -1000]}}})
    with pytest.raises(ConfigError, match="train.intensity.window_hu"):
        check_config(bad)
    bad = deep_merge(base_config, {"preprocess": {"spacing_mm": [0.7, 0.7, 2.5]},
                                   "sampling": {"planes": ["axial", "coronal"]}})
    with pytest.raises(ConfigError, match="sampling.planes"):
        check_config(bad)
    check_config(deep_merge(bad, {"sampling": {"planes": ["axial"]}, "predict": {"planes": ["axial"]}}))
    bad = dict(base_config, experiments={"x": {"dataset": {"root": "elsewhere"}}})
    with pytest.raises(ConfigError, match="experiments.x"):
        check_config(bad)


def test_code_digest_changes_with_the_module_source(tmp_path, monkeypatch):
    fake = tmp_path / "fake.py"
    fake.write_text("x = 1\n")
    monkeypatch.setitem(runconfig.STAGE_MODULES, "fake_stage", ("fake",))
    monkeypatch.setattr(runconfig, "module_path", lambda module: fake)
    before = runconfig.code_digest("fake_stage")
    assert runconfig.code_digest("fake_stage") == before
    fake.write_text("x = 2\n")
    assert runconfig.code_digest("fake_stage") != before


def _noduleflow_imports(module: str) -> set[str]:
    """noduleflow modules ``module``'s source imports (at the top or inside a function)."""
    tree = ast.parse(runconfig.module_path(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "noduleflow":
            found |= {a.name for a in node.names} if node.module == "noduleflow" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("noduleflow.")}
    return found


@pytest.mark.parametrize("stage", sorted(runconfig.STAGE_MODULES))
def test_a_stage_code_digest_covers_every_module_it_runs(stage):
    """A change to any noduleflow module a stage imports (directly or through another) must rerun the
    stage: STAGE_MODULES lists all of them, so e.g. the folds reader shared by train, predict and
    report is part of each one's digest."""
    modules = runconfig.STAGE_MODULES[stage]
    reached, todo = set(), [modules[0]]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(_noduleflow_imports(module))
    assert reached <= set(modules), f"{stage}: add {sorted(reached - set(modules))} to STAGE_MODULES"
    package = Path(runconfig.__file__).parent
    assert all((package / f"{m}.py").is_file() for m in modules)


def test_stage_params_do_not_depend_on_the_order_of_keys_in_a_config_file(base_config):
    reordered = dict(reversed(list(base_config.items())))
    reordered["train"] = dict(reversed(list(base_config["train"].items())))
    for stage in runconfig.STAGES:
        a, b = stage_params(base_config, stage), stage_params(reordered, stage)
        assert a == b and repr(a) == repr(b)  # Snakemake compares the text of params
