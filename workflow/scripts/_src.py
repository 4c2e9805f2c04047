"""Make the repository's ``src/`` importable when noduleflow is not installed (e.g. in a conda env
built by ``--sdm conda``); with the package installed this changes nothing."""

import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "src"
try:
    import noduleflow  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_SRC))
