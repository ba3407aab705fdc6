"""The one logging set-up of the command lines: rich in a terminal, plain timestamped lines in a log file."""
from __future__ import annotations

import logging
import sys

QUIET = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "matplotlib", "alembic", "urllib3", "httpx",
         "distributed")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner may swap it and close the old one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False)
        fmt = "%(message)s"
    else:
        handler = _Stderr()
        fmt = "%(asctime)s %(name)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
