"""Logging set-up for workflow scripts: everything a stage logs goes to the rule's log file."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def logging_to(log_path: str | Path, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the ``noduleflow`` loggers (and warnings) to ``log_path`` for the duration of the block.

    An exception raised inside the block is written to the log with its traceback and re-raised,
    so the Snakemake log shows the message that names the bad file.
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
    try:
        yield root
    except BaseException as exc:
        root.error("failed: %s\n%s", exc, traceback.format_exc())
        raise
    finally:
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
