"""The README as a new user reads it: the first screen, the quick start run as written (as a dry run),
the configuration snippets, and every link of the documentation."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from workflow_helpers import REPO_ROOT, copy_workflow

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_the_first_screen_says_what_it_does_what_it_was_validated_on_and_how_to_set_up():
    first_screen = "\n".join(README.splitlines()[:30])
    assert "lung nodules in chest CT" in first_screen
    assert "validated on" in first_screen and "Synthetic chest-CT cohorts only" in first_screen
    setup = _code_blocks(first_screen + "\n```\n", "bash")[0]
    assert [line.split("#")[0].strip() for line in setup.splitlines()] == ["make install", "make run"]


def test_the_quick_start_plans_the_whole_default_run(tmp_path):
    """`make install` and `make run` on a fresh copy: make knows both targets, and the snakemake command
    `make run` runs plans every stage of the default pipeline (a dry run: the real one takes 13 min)."""
    workdir = copy_workflow(tmp_path / "clone")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / name, workdir / name)
    venv = Path(sys.prefix)
    commands = [line.split("#")[0].split() for line in _code_blocks(README, "bash")[0].splitlines()]
    planned = subprocess.run(["make", "-n", *[c[1] for c in commands], f"VENV={venv}"], cwd=workdir,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    run = [line for line in planned if line.startswith(f"{venv}/bin/snakemake")]
    assert run == [f"{venv}/bin/snakemake --cores 2"], planned
    proc = subprocess.run([sys.executable, "-m", "snakemake", *run[0].split()[1:], "-n"], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = proc.stdout + proc.stderr
    # the per-scan sample_patches jobs are planned once the patch plan (a checkpoint) has run
    for rule in ("synthesize", "resample", "lung_mask", "extract_slices", "split_folds", "plan_patches",
                 "train", "predict", "evaluate", "report"):
        assert re.search(rf"^\s*{rule}\s+\d+\s*$", plan, re.M), (rule, plan[-3000:])


@pytest.mark.parametrize("block", _code_blocks(README, "yaml"), ids=lambda b: b.splitlines()[0])
def test_every_configuration_snippet_in_the_readme_is_valid(block):
    config = yaml.safe_load(block)
    defaults = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    for key, value in config.items():
        defaults[key] = {**defaults.get(key, {}), **value} if isinstance(value, dict) else value
    validate(defaults, str(REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.is_file(), f"{page.name}: {link}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: {link}"
