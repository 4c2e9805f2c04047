"""The conventions of the Snakemake workflow catalog: `snakefmt --check` and `snakemake --lint` are
clean, and every file the report shows has a caption that exists."""

from __future__ import annotations

import re
import subprocess
import sys

from workflow_helpers import REPO_ROOT, copy_workflow, snakemake


def test_snakefmt_check_is_clean():
    """Formatting as `snakefmt --check .` sees it from the repository root (settings in
    pyproject.toml's [tool.snakefmt])."""
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--compact-diff", "."], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # it looked at the workflow: the Snakefile and every rule file
    checked = int(re.search(r"All (\d+) file", proc.stderr).group(1))
    assert checked == 1 + len(list((REPO_ROOT / "workflow" / "rules").glob("*.smk")))


def test_snakefmt_check_fails_on_a_misformatted_rule(tmp_path):
    """The check above can fail: a rule written by hand without snakefmt's layout is reported."""
    (tmp_path / "Snakefile").write_text('rule a:\n    output: "x"\n    shell: "touch {output}"\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr


def test_snakemake_lint_is_clean(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "--lint", check=False, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in output, output
    assert "Congratulations" in output, output


def test_every_report_file_has_a_caption_that_exists():
    """Every `report(...)` in the rules names a caption under workflow/report/ that exists (paths in
    a rule file are relative to it), and the Snakefile names the report's front page."""
    rules = REPO_ROOT / "workflow" / "rules"
    calls = []
    for smk in sorted(rules.glob("*.smk")):
        # report("path", caption=..., category=...): no argument holds a parenthesis
        for match in re.finditer(r"\breport\(\s*(\"[^)]*)\)", smk.read_text(encoding="utf-8")):
            calls.append((smk, match.group(1)))
    assert len(calls) >= 3, calls   # per-fold FROC, pooled FROC, experiments' FROC
    for smk, args in calls:
        caption = re.search(r'caption="([^"]+)"', args)
        assert caption, f"{smk.name}: report({args}) has no caption"
        path = (smk.parent / caption.group(1)).resolve()
        assert path.parent == (REPO_ROOT / "workflow" / "report").resolve() and path.suffix == ".rst", path
        assert path.is_file() and path.read_text(encoding="utf-8").strip(), path
    front = re.search(r'^report:\s*"([^"]+)"', (REPO_ROOT / "Snakefile").read_text(encoding="utf-8"), re.M)
    assert front and (REPO_ROOT / front.group(1)).is_file()
