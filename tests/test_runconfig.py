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
    return yaml.safe_load((repo_root / "config.yaml").read_text(encoding="utf-8"))


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


def _copy_of_the_package(tmp_path, monkeypatch) -> Path:
    """A copy of src/noduleflow that runconfig reads the modules' source from."""
    package = Path(runconfig.__file__).parent
    copy_dir = tmp_path / "noduleflow"
    copy_dir.mkdir()
    for path in package.glob("*.py"):
        (copy_dir / path.name).write_text(path.read_text(encoding="utf-8"))
    monkeypatch.setattr(runconfig, "module_path", lambda module: copy_dir / f"{module}.py")
    return copy_dir


def _edit_inside_a_function(path: Path) -> None:
    """Add a statement to the body of the first top-level function of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    tree = ast.parse("".join(lines))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    body = function.body[1] if len(function.body) > 1 else function.body[0]
    indent = " " * body.col_offset
    lines.insert(body.lineno - 1, f"{indent}_unused = 1\n")
    path.write_text("".join(lines), encoding="utf-8")


def test_comments_and_docstrings_rerun_nothing(tmp_path, monkeypatch):
    copy_dir = _copy_of_the_package(tmp_path, monkeypatch)
    before = {stage: runconfig.code_digest(stage) for stage in runconfig.STAGE_ENTRY}
    io = copy_dir / "io.py"
    text = io.read_text(encoding="utf-8")
    text = text.replace('"""Files in and out', '"""Files (a reworded docstring) in and out', 1)
    text = text.replace("def atomic_path(", "# a new comment\ndef atomic_path(", 1)
    io.write_text(text + "\n# a comment at the end\n", encoding="utf-8")
    assert runconfig.code_fingerprint(io) == runconfig.code_fingerprint(Path(runconfig.__file__).parent / "io.py")
    assert {stage: runconfig.code_digest(stage) for stage in runconfig.STAGE_ENTRY} == before


def test_a_code_change_reruns_exactly_the_stages_that_import_the_module(tmp_path, monkeypatch):
    copy_dir = _copy_of_the_package(tmp_path, monkeypatch)
    before = {stage: runconfig.code_digest(stage) for stage in runconfig.STAGE_ENTRY}
    _edit_inside_a_function(copy_dir / "intensity.py")
    changed = {stage for stage in runconfig.STAGE_ENTRY if runconfig.code_digest(stage) != before[stage]}
    users = {stage for stage in runconfig.STAGE_ENTRY if "intensity" in runconfig.stage_modules(stage)}
    assert changed == users
    assert {"sample_patches", "train", "predict"} <= changed
    assert not changed & {"resample", "lung_mask", "extract_slices", "split_folds", "synthesize"}


def test_a_new_import_is_covered_without_editing_a_list(tmp_path, monkeypatch):
    copy_dir = _copy_of_the_package(tmp_path, monkeypatch)
    assert "froc" not in runconfig.stage_modules("lung_mask")
    before = runconfig.code_digest("lung_mask")
    path = copy_dir / "lungmask.py"
    path.write_text(path.read_text(encoding="utf-8").replace("from noduleflow.io import", "from noduleflow.froc import FPS_POINTS  # noqa\n"
                                             "from noduleflow.io import", 1))
    assert "froc" in runconfig.stage_modules("lung_mask")
    changed = runconfig.code_digest("lung_mask")
    assert changed != before
    (copy_dir / "froc.py").write_text((copy_dir / "froc.py").read_text(encoding="utf-8") + "\nEXTRA = 1\n")
    assert runconfig.code_digest("lung_mask") != changed


@pytest.mark.parametrize("stage", sorted(runconfig.STAGE_ENTRY))
def test_a_stage_code_digest_covers_every_module_it_runs(stage):
    """Every noduleflow module a stage imports, directly or through another, is in its digest (so e.g.
    the folds reader shared by train, predict and report is part of each one's)."""
    modules = runconfig.stage_modules(stage)
    reached, todo = set(), [modules[0]]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(_noduleflow_imports(module))
    assert reached == set(modules)
    assert modules[0] == runconfig.STAGE_ENTRY[stage]


def _noduleflow_imports(module: str) -> set[str]:
    """noduleflow modules ``module``'s source imports, by a plain text scan (independent of the AST walk)."""
    found = set()
    for line in runconfig.module_path(module).read_text(encoding="utf-8").splitlines():
        words = line.strip().split()
        if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith("noduleflow."):
            found.add(words[1].split(".")[1])
        elif words[:3] == ["from", "noduleflow", "import"]:  # from noduleflow import a, b
            names = " ".join(words[3:]).replace("(", "").replace(")", "").split(",")
            found |= {name.split()[0] for name in names if name.strip()}
    return found


def test_stage_params_do_not_depend_on_the_order_of_keys_in_a_config_file(base_config):
    reordered = dict(reversed(list(base_config.items())))
    reordered["train"] = dict(reversed(list(base_config["train"].items())))
    for stage in runconfig.STAGES:
        a, b = stage_params(base_config, stage), stage_params(reordered, stage)
        assert a == b and repr(a) == repr(b)  # Snakemake compares the text of params
