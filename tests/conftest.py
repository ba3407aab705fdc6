"""Shared fixtures: a tiny but real configuration, and a run of it prepared once per session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("SCIKIT_LEARN_DATA", str(Path(tempfile.gettempdir()) / "dna-sklearn-data"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]

import flows.app  # noqa: E402,F401 - the application: its environment, then params.yaml's mlflow and orchestration sections


def tiny_raw(outputs: Path) -> dict:
    """Digits at 16 px, a 2-block space of 2 ops; every stage takes seconds."""
    train = {"epochs": 2, "lr": 0.005, "batch_size": 64, "warmup_epochs": 0}
    return {
        "seed": 0, "outputs": str(outputs), "device": "cpu",
        "data": {"source": "digits", "image_size": 16, "channels": 1},
        "teacher": {"source": "train", "model": "tinynet_e", "boundaries": [2, 3], "train": train},
        "space": {"stem": 16, "first_stage": ["ds_r1_k3_s1_c16_se0.25"], "head": 32,
                  "ops": ["ir_k3_e3_se0.25", "ir_k5_e6_se0.25"],
                  "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16]},
                             {"stride": 2, "depths": [1, 2], "widths": [24, 32]}]},
        "supervision": {"kind": "teacher"},
        "distill": {"epochs": 2, "batch_size": 64},
        "rating": {"calibration_size": 64, "batch_size": 128},
        "search": {"budgets": {}, "front_axis": "macs"},
        "retrain": {"train": train},
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Cost tables and deep checks run hundreds of tiny forwards; one intra-op thread is faster for them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_params(tmp_path):
    from dna.config import parse_params

    return parse_params(tiny_raw(tmp_path / "outputs"))


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """A tiny run with data, teacher, feature cache and every block distilled (shared, read-only)."""
    from dna.config import parse_params
    from dna.pipeline import Run, stage_data, stage_distill, stage_features, stage_teacher

    run = Run(parse_params(tiny_raw(tmp_path_factory.mktemp("prepared") / "outputs")))
    stage_data(run)
    stage_teacher(run)
    stage_features(run)
    for block in range(run.space.num_blocks):
        stage_distill(run, block)
    return run
