"""Configuration logic shared by the Snakefile and the tests: experiments, narrow per-stage
parameter blocks, which run owns which stage's files, and digests of the code a stage runs.

A *run* is the base configuration (files under ``results/``) or one experiment (the base
configuration deep-merged with ``experiments.<name>``; files under ``results/experiments/<name>/``).
A run reuses the files of an earlier run (the base first, then experiments in their order) for
every stage whose parameters, and whose upstream stages' parameters, are the same. So an
experiment that only changes ``train`` reuses the base's resampled scans, slices, folds and patches.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

BASE_PREFIX = "results/"

#: stage -> (config keys it reads as "block" or "block.key", upstream stages)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "resample": (("preprocess.spacing_mm", "preprocess.sphere_min_hu"), ()),
    "lung_mask": (("lungmask",), ("resample",)),
    "extract_slices": ((), ("resample", "lung_mask")),
    "split_folds": (("cv",), ()),
    "sample_patches": (("sampling", "preprocess.lung_roi"), ("extract_slices",)),
    # the preprocessing keys are stored in model.pt, so a model applied to new scans repeats them
    "train": (("train", "preprocess.spacing_mm", "preprocess.lung_roi", "lungmask"),
              ("sample_patches", "split_folds")),
    "predict": (("predict", "preprocess.lung_roi"), ("train", "extract_slices")),
    "candidate_crops": (("second_stage.variants", "second_stage.crop_voxels", "second_stage.seed"),
                        ("predict", "split_folds")),
    "rescore": (("second_stage",), ("candidate_crops",)),
    # evaluate scores the re-scored candidates when second_stage.enabled, predict's otherwise
    "evaluate": (("evaluate",), ("rescore", "predict", "split_folds")),
    "report": ((), ("evaluate",)),
}

#: stage -> the noduleflow module its script runs. A stage's code digest covers that module and
#: every noduleflow module it imports, directly or through another (found in the source, so a new
#: import is covered without editing a list): see :func:`stage_modules` and :func:`code_digest`.
STAGE_ENTRY: dict[str, str] = {
    "synthesize": "synthetic",
    "lidc_annotations": "lidc",
    "resample": "preprocess",
    "lung_mask": "lungmask",
    "extract_slices": "slices",
    "split_folds": "folds",
    "plan_patches": "patchplan",
    "sample_patches": "sampling",
    "train": "train",
    "predict": "predict",
    "candidate_crops": "second_stage",
    "rescore": "second_stage",
    "evaluate": "evaluate",
    "report": "report",
    "compare": "experiments",
    "apply": "apply",
}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """A copy of ``base`` with ``override`` merged in (nested dicts merged, everything else replaced)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_config(config: Mapping, where: str = "config") -> None:
    """Checks the JSON schema cannot express; raises ConfigError naming the key."""
    syn = config.get("synthetic", {})
    if syn.get("min_nodules", 0) > syn.get("max_nodules", 4):
        raise ConfigError(f"{where}: synthetic.min_nodules ({syn['min_nodules']}) is larger than "
                          f"synthetic.max_nodules ({syn['max_nodules']})")
    window = config.get("train", {}).get("intensity", {}).get("window_hu", [-1000, 400])
    if not window[0] < window[1]:
        raise ConfigError(f"{where}: train.intensity.window_hu {window} must be [low, high] with low < high")
    spacing = list(config.get("preprocess", {}).get("spacing_mm", [1.0, 1.0, 1.0]))
    for key in ("sampling", "predict"):
        planes = config.get(key, {}).get("planes", ["axial"])
        if set(planes) - {"axial"} and max(spacing) > 1.05 * min(spacing):
            raise ConfigError(f"{where}: {key}.planes {planes} includes coronal/sagittal slices, which need "
                              f"isotropic voxels, but preprocess.spacing_mm is {spacing}")
    for name, override in config.get("experiments", {}).items():
        if "experiments" in override or "synthetic" in override or "dataset" in override:
            raise ConfigError(f"{where}: experiments.{name} may not override 'experiments', 'synthetic' "
                              f"or 'dataset' (every experiment runs on the same data)")
        if "keep_volumes" in override.get("preprocess", {}):
            raise ConfigError(f"{where}: experiments.{name} may not set preprocess.keep_volumes (what is kept on "
                              f"disk is set once, in the base configuration)")


def run_configs(config: Mapping) -> dict[str, dict]:
    """Prefix -> full configuration of each run: ``results/`` for the base, then
    ``results/experiments/<name>/`` per experiment, in config order."""
    base = {k: v for k, v in config.items() if k != "experiments"}
    runs = {BASE_PREFIX: copy.deepcopy(base)}
    for name, override in config.get("experiments", {}).items():
        runs[f"{BASE_PREFIX}experiments/{name}/"] = deep_merge(base, override)
    return runs


def _lookup(config: Mapping, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def stage_params(config: Mapping, stage: str) -> dict:
    """The narrow block of configuration a stage reads: ``{"block": {...}}`` or
    ``{"block": {"key": value}}``. Plain builtins only, so Snakemake's params trigger sees it."""
    keys, _ = STAGES[stage]
    params: dict = {}
    for dotted in keys:
        block, _, key = dotted.partition(".")
        if key:
            params.setdefault(block, {})[key] = copy.deepcopy(_lookup(config, dotted))
        else:
            params[block] = copy.deepcopy(config.get(block, {}))
    return canonical(params)


def canonical(value: Any) -> Any:
    """``value`` as plain builtins with dict keys sorted at every level. Snakemake compares params by
    their text, so the order keys happen to have in a config file must not matter."""
    return json.loads(json.dumps(value, sort_keys=True))


def _stage_signature(config: Mapping, stage: str) -> str:
    """Parameters of ``stage`` and of every stage upstream of it, as one canonical string."""
    seen: dict[str, dict] = {}
    todo = [stage]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current] = stage_params(config, current)
        todo.extend(STAGES[current][1])
    return json.dumps(seen, sort_keys=True)


def stage_owner(runs: Mapping[str, Mapping], prefix: str, stage: str) -> str:
    """The prefix under which ``stage``'s files for run ``prefix`` live: the first run (base first)
    whose parameters for this stage and everything upstream equal those of ``prefix``."""
    if prefix not in runs:
        raise ConfigError(f"unknown run prefix {prefix!r}; known: {', '.join(runs)}")
    signature = _stage_signature(runs[prefix], stage)
    for candidate, config in runs.items():
        if _stage_signature(config, stage) == signature:
            return candidate
    return prefix


def module_path(module: str) -> Path:
    """Source file of ``noduleflow.<module>``."""
    spec = importlib.util.find_spec(f"noduleflow.{module}")
    if spec is None or spec.origin is None:
        raise ConfigError(f"noduleflow.{module} not found (STAGE_ENTRY or an import of noduleflow)")
    return Path(spec.origin)


def noduleflow_imports(module: str) -> set[str]:
    """The noduleflow modules ``noduleflow.<module>`` imports, at the top or inside a function."""
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "noduleflow":
                found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("noduleflow.")}
    return found


def stage_modules(stage: str) -> tuple[str, ...]:
    """Every noduleflow module ``stage`` runs: its entry module first, then what it imports,
    transitively, sorted."""
    entry = STAGE_ENTRY[stage]
    reached: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(sorted(noduleflow_imports(module)))
    return (entry, *sorted(reached - {entry}))


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without the docstrings of its module, classes and functions (in place)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(path: str | Path) -> bytes:
    """What a Python source file does, without its comments, docstrings and layout: the dump of
    its syntax tree (no line numbers) with docstrings removed. Editing documentation leaves it
    unchanged; any change to code changes it."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text(encoding="utf-8")))
    return ast.dump(tree, include_attributes=False).encode()


def code_digest(stage: str) -> str:
    """SHA-256 (first 16 hex digits) of the code of the noduleflow modules ``stage`` runs
    (:func:`stage_modules`, :func:`code_fingerprint`).

    Snakemake only tracks the ``script:`` file; passing this as a ``params:`` value makes a change
    in a module's code rerun the stages that use it, and only those; comments and docstrings
    rerun nothing.
    """
    digest = hashlib.sha256()
    for module in stage_modules(stage):
        digest.update(module.encode() + b"\0" + code_fingerprint(module_path(module)) + b"\0")
    return digest.hexdigest()[:16]
