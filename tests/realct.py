"""Where the real CT scans for the tests live (read-only DICOM, e.g. LIDC-IDRI-0001/<study>/<series>/)."""

import os
from pathlib import Path

import pytest


def realct_root() -> Path:
    """The real-CT folder: $NODULEFLOW_REALCT, else ../shared/realct beside the repository, else
    /work/shared/realct. Absent: the calling test fails on CI (CI=true) and is skipped elsewhere."""
    candidates = [Path(os.environ["NODULEFLOW_REALCT"])] if os.environ.get("NODULEFLOW_REALCT") else []
    candidates += [Path(__file__).resolve().parents[1].parent / "shared" / "realct", Path("/work/shared/realct")]
    for path in candidates:
        if path.is_dir():
            return path
    message = f"no real CT data (looked in {', '.join(map(str, candidates))}; set NODULEFLOW_REALCT)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
