"""Each Flower log line prints once (it used to print twice: Flower's handler and the root's)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys
from fedspeech.cli import configure_logging
configure_logging(verbose={verbose})
from flwr.common.logger import log   # Flower's import resets the flwr logger's level
log(logging.INFO, "flower-info-line")
log(logging.ERROR, "flower-error-line")
logging.getLogger("fedspeech.x").info("own-info-line")
"""


def _stderr(verbose: bool) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(verbose=verbose)], capture_output=True, text=True, check=True
    )
    return done.stderr + done.stdout


def test_verbose_prints_each_flower_line_once() -> None:
    out = _stderr(True)
    assert out.count("flower-info-line") == 1 and out.count("flower-error-line") == 1
    assert out.count("own-info-line") == 1


def test_quiet_keeps_only_flower_errors() -> None:
    out = _stderr(False)
    assert out.count("flower-info-line") == 0 and out.count("flower-error-line") == 1
    assert out.count("own-info-line") == 1
