"""Logging set-up for workflow scripts: everything a stage logs goes to the rule's log file."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def logging_to(log_path: str | Path, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the ``noduleflow`` loggers (and warnings) to ``log_path`` for the duration of the block.

    An exception raised inside the block is written to the log with its traceback and re-raised,
    so the Snakemake log shows the message that names the bad file. SIGTERM (what Snakemake and
    SLURM send a job they stop) becomes a ``SystemExit`` inside the block, so ``finally`` clauses
    run: temporary files of atomic writes are removed and no half-written file is left behind.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("noduleflow")
    old_level = root.level
    root.setLevel(level)
    root.addHandler(handler)
    root.addHandler(stream)
    logging.captureWarnings(True)
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, frame):
        # one SIGTERM is enough: a second one (Snakemake forwards its own) must not interrupt the
        # cleanup that the first one started (temporary files of atomic writes)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield root
    except BaseException as exc:
        root.error("failed: %s\n%s", exc, traceback.format_exc())
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        root.removeHandler(handler)
        root.removeHandler(stream)
        root.setLevel(old_level)
        handler.close()
        logging.captureWarnings(False)


class LogFile:
    """A file-like object that writes lines to a logger, for tqdm(file=...) progress bars."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.logger.log(self.level, text)

    def flush(self) -> None:  # tqdm calls it
        pass
