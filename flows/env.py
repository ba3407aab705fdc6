"""Environment defaults for every process that runs a flow: nothing is written to the home folder, no telemetry.

Values already set in the environment win, so a deployment or a test can point them elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path


def environment_defaults(root: str | Path | None = None) -> dict[str, str]:
    root = Path(root or os.getcwd()).resolve()
    return {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "SCIKIT_LEARN_DATA": str(root / ".sklearn_data"),
        # caches that default to ~/.cache (onnxruntime writes a device id there; torch and timm cache downloads)
        "XDG_CACHE_HOME": str(root / ".cache"),
        "MPLCONFIGDIR": str(root / ".cache" / "matplotlib"),
        "MPLBACKEND": "Agg",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }


def configure_environment(root: str | Path | None = None) -> None:
    """Set the defaults above for this process (and so for the processes it starts) where they are unset."""
    for key, value in environment_defaults(root).items():
        os.environ.setdefault(key, value)
