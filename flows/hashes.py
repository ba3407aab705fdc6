"""What tags a registered model: hashes of the params and of the data, and the git commit."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from dna.config import Params
from flows.steps import RESULT_SECTIONS


def params_hash(params: Params) -> str:
    """A hash of the sections that determine the trained network (not where or how it ran)."""
    raw = params.model_dump(mode="json", context={"fingerprint": True})
    text = json.dumps({k: raw[k] for k in RESULT_SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_hash(params: Params, splits_file: str | Path) -> str:
    """The data config and the exact split indices (the split file) together."""
    from dna.checkpoint import file_digest

    data = params.data.model_dump(mode="json", context={"fingerprint": True})
    text = json.dumps(data, sort_keys=True) + file_digest(splits_file)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checked-out commit, with '-dirty' when tracked files differ from it; None outside a git repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=False)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
