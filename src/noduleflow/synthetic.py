"""Synthetic chest-CT cohort in LUNA16 layout (placeholder: being written)."""

from __future__ import annotations

import hashlib

UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


def cohort_uids(n_scans: int, seed: int) -> list[str]:
    """LUNA16-like seriesuids of the first ``n_scans`` scans of the cohort with ``seed``.

    Scan i's uid depends only on (seed, i), so growing ``n_scans`` keeps the earlier scans.
    """
    uids = []
    for index in range(n_scans):
        digest = int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest(), 16)
        uids.append(f"{UID_ROOT}{10**29 + digest % (9 * 10**29)}")  # 30 digits, no leading zero
    return uids
