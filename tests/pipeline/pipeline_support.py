"""Helpers for the orchestration tests: the environment (every tool's state in temporary folders, never the home
folder; telemetry off), a tiny configuration, and ways to run things in a fresh process."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

_STATE = Path(tempfile.mkdtemp(prefix="dna-pipeline-tests-"))
for _key, _value in {
    "PREFECT_HOME": str(_STATE / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "SCIKIT_LEARN_DATA": str(Path(tempfile.gettempdir()) / "dna-sklearn-data"),
    "MPLCONFIGDIR": str(_STATE / "matplotlib"),
    "XDG_CACHE_HOME": str(_STATE / "cache"),  # onnxruntime writes a device id under it (default ~/.cache)
    "MPLBACKEND": "Agg",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)
# the `dna` command that dvc.yaml's stages run: this interpreter's
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def tiny_raw(outputs: str = "outputs", tracking_uri: str | None = None) -> dict:
    """Digits at 16 px on a small training split, tinynet_e cut after stages 2 and 3, two blocks of two ops.

    Every key dvc.yaml tracks is written out (DVC needs them in the file, defaults are not enough).
    """
    train = {"epochs": 1, "optimizer": "adamw", "lr": 0.005, "weight_decay": 0.05, "schedule": "cosine",
             "warmup_epochs": 0, "label_smoothing": 0.1, "drop_rate": 0.1, "batch_size": 64}
    return {
        "seed": 0, "outputs": outputs, "device": "cpu",
        "data": {"source": "digits", "image_size": 16, "channels": 1, "rate_fraction": 0.2, "test_fraction": 0.6},
        "teacher": {"source": "train", "model": "tinynet_e", "boundaries": [2, 3], "train": dict(train)},
        "space": {"kind": "mbconv", "stem": 16, "first_stage": ["ds_r1_k3_s1_c16_se0.25"], "head": 32,
                  "ops": ["ir_k3_e3_se0.25", "ir_k5_e3_se0.25"],
                  "blocks": [{"stride": 2, "depths": [1], "widths": [16]},
                             {"stride": 2, "depths": [1, 2], "widths": [24]}]},
        "supervision": {"kind": "teacher"},
        "distill": {"epochs": 2, "lr": 0.003, "lr_decay": 0.9, "weight_decay": 0.0001, "batch_size": 64,
                    "cache_features": True},
        "rating": {"calibration_size": 64, "batch_size": 256},
        "search": {"targets": {"default": {"macs": 1000000}}, "front_axis": "macs"},
        "profile": {"batch_size": 1, "threads": 1, "runs": 20, "rounds": 2, "warmup": 2, "percentile": 10},
        "retrain": {"init": "scratch", "kd_alpha": 0.0, "kd_temperature": 4.0, "train": dict(train)},
        "export": {"opset": 18, "atol": 0.0001},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "dna", "registered_model": "dna-student",
                   "promote_metric": "test_accuracy"},
        "orchestration": {"task_runner": "threads", "max_workers": 2, "cluster_address": None, "retries": 1},
    }


def write_params(path: Path, raw: dict) -> Path:
    text = yaml.safe_dump(raw, sort_keys=False)
    assert "&id" not in text, "shared sub-dicts would be written as a YAML alias: one key would change both"
    path.write_text(text)
    return path


@contextlib.contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def clone_project(source: Path, target: Path, outputs: tuple[str, ...] = ("data", "teacher")) -> Path:
    """A copy of a prepared project (params and the named stage outputs) to run more stages in."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "params.yaml", target / "params.yaml")
    for name in outputs:
        shutil.copytree(source / "outputs" / name, target / "outputs" / name)
    return target


def run_python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh Python process (this interpreter), in cwd; the caller checks the result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([PYTHON, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def retrain_smallest_student(run) -> dict:
    """The search's output without the search: the smallest network of the space as the chosen arch; then the real
    retrain stage (one epoch in the tiny configuration). Returns its metrics."""
    from dna.pipeline import choice_of, stage_retrain, stage_tables

    arch = choice_of(run.space, stage_tables(run.space, scored=False), (0,) * (run.space.num_blocks + 2))
    arch.save(run.paths.arch)
    return stage_retrain(run)


def git_dvc_project(repo: Path, files: tuple[str, ...] = ("dvc.yaml", ".gitignore", ".dvcignore")) -> Path:
    """A git + DVC repository at `repo` with the project's `files`, flows/, dna/ and the tiny params.yaml, committed."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    for name in ("flows", "dna"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo / "params.yaml", tiny_raw())
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "tests@example.invalid"],
                 ["git", "config", "user.name", "tests"], [PYTHON, "-m", "dvc", "init", "-q"],
                 [PYTHON, "-m", "dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "tiny project"]):
        subprocess.run(args, cwd=repo, check=True, capture_output=True, text=True)
    return repo
