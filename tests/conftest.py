"""Shared fixtures."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow on the tiny config, run once to completion and shared (read-only) by the
    end-to-end tests: plan checks dry-run in it, kill tests copy it."""
    from workflow_helpers import TINY_CONFIG, copy_workflow, snakemake, write_config

    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    write_config(workdir, TINY_CONFIG)
    snakemake(workdir, "--cores", "2", "--configfile", "tiny.yaml")
    return workdir
