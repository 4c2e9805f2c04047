"""What the benchmarks share: a copy of the workflow in its own folder, run by Snakemake there.

Not part of the package: the benchmarks are scripts run by hand (see each one's docstring).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parents[1]


def workflow_copy(dest: Path) -> Path:
    """The workflow files (not results, not the venv) under ``dest``; a kept folder continues where
    its run stopped."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("workflow", "envs", "config"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return dest


def run_snakemake(workdir: Path, targets: list[str], overrides: Mapping[str, Any], cores: int,
                  config_name: str = "benchmark.yaml") -> float:
    """Run the workflow copy in ``workdir`` on ``targets`` with ``overrides`` (a config mapping,
    merged over config.yaml) written to ``workdir/config_name``; wall seconds. SystemExit with the
    end of Snakemake's output when it fails."""
    (workdir / config_name).write_text(yaml.safe_dump(dict(overrides), sort_keys=False), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    started = time.perf_counter()
    # the targets go before --configfile, which takes every word after it as a config file
    done = subprocess.run([sys.executable, "-m", "snakemake", *targets, "--cores", str(cores),
                           "--configfile", config_name], cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (workdir / "snakemake.log").write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed in {workdir} (whole output: {workdir / 'snakemake.log'}):\n"
                         f"{done.stdout[-3000:]}")
    return time.perf_counter() - started
