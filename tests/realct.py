"""Where the real CT of ../shared/realct is; tests that need it fail in CI (CI=true) when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LIDC_0001_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def realct_root() -> Path:
    """The realct folder: $NODULEFLOW_REALCT, else ``<repo>/../shared/realct``, else /work/shared/realct.
    Absent: pytest.fail when CI=true, else pytest.skip."""
    candidates = [os.environ.get("NODULEFLOW_REALCT"),
                  Path(__file__).resolve().parents[1].parent / "shared" / "realct",
                  "/work/shared/realct"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    message = "../shared/realct (real CT for tests) not found"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def lidc_0001_series() -> Path:
    """The DICOM series folder of LIDC-IDRI-0001."""
    folders = sorted((realct_root() / "LIDC-IDRI-0001").glob(f"*/{LIDC_0001_UID}"))
    assert len(folders) == 1, f"LIDC-IDRI-0001 series folder not found under {realct_root()}"
    return folders[0]
