"""Where the real CT test data (``shared/realct``: LIDC-IDRI-0001 and the LUNA16 lists) lives.

``NODULEFLOW_REALCT`` names the folder; otherwise it is ``<repo>/../shared/realct`` (the layout
CI checks out). Absent data skips the test, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def realct_root() -> Path:
    """The realct folder, or skip (fail in CI) when it is not there."""
    configured = os.environ.get("NODULEFLOW_REALCT")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "realct"
    if not (root / "README.md").is_file():
        message = (f"real CT test data not found at {root} "
                   f"({'NODULEFLOW_REALCT' if configured else 'set NODULEFLOW_REALCT to its folder'})")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root
