"""The configuration reference (docs/config.md and README's table of blocks) is generated from the
schema's descriptions, and a change to one without the other fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from noduleflow.configdoc import README, REFERENCE, SCHEMA, expected_files, load_schema, main, missing_descriptions
from workflow_helpers import REPO_ROOT


def test_the_reference_and_the_readme_table_are_what_the_schema_gives():
    for path, text in expected_files(REPO_ROOT).items():
        assert path.is_file(), path
        assert path.read_text(encoding="utf-8") == text, f"{path} differs from {SCHEMA}: run `python -m noduleflow.configdoc`"


def test_every_key_of_the_schema_has_a_description():
    assert missing_descriptions(load_schema(REPO_ROOT / SCHEMA)) == []


def _leaf_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def test_every_key_of_config_yaml_has_a_row_with_its_default():
    reference = (REPO_ROOT / REFERENCE).read_text(encoding="utf-8")
    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text(encoding="utf-8"))
    keys = _leaf_keys(config)
    assert len(keys) > 80
    for key in keys:
        assert f"| `{key}` |" in reference, key
    assert "| `sampling.context_step` | `2` |" in reference
    assert "| `train.intensity.window_hu` | `[-1000, 400]` |" in reference


def _copy_docs(root):
    for relative in (SCHEMA, REFERENCE, README):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / relative, root / relative)


def test_check_fails_after_a_schema_edit_until_the_reference_is_regenerated(tmp_path):
    _copy_docs(tmp_path)
    assert main(["--root", str(tmp_path), "--check"]) == 0
    schema = tmp_path / SCHEMA
    schema.write_text(schema.read_text(encoding="utf-8").replace("patches drawn from each scan", "patches cut from each scan"))
    before = (tmp_path / REFERENCE).read_text(encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "noduleflow.configdoc", "--check"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and str(REFERENCE) in proc.stderr, proc.stderr
    assert (tmp_path / REFERENCE).read_text(encoding="utf-8") == before            # --check writes nothing
    assert main(["--root", str(tmp_path)]) == 0
    assert "patches cut from each scan" in (tmp_path / REFERENCE).read_text(encoding="utf-8")
    assert main(["--root", str(tmp_path), "--check"]) == 0


def test_a_key_without_a_description_is_refused(tmp_path, capsys):
    _copy_docs(tmp_path)
    schema = tmp_path / SCHEMA
    schema.write_text(schema.read_text(encoding="utf-8").replace(', description: "AdamW weight decay"', ""))
    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert "train.weight_decay" in capsys.readouterr().err
