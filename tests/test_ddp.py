"""Data-parallel training on CPU: real torchrun launches of 2 gloo processes against one process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dna.checkpoint import CheckpointError, load_checkpoint
from dna.ddp import rank_batches, run_in_processes, shown, stage_command
from tests.conftest import ROOT, tiny_raw

WORKER = Path(__file__).with_name("ddp_worker.py")
# One process and two compute the same steps up to the order of float sums (DistributedDataParallel averages the
# ranks' gradients; one process sums a batch at once). Measured once after the runs below: the classifier's weights
# differed by at most 5e-8 and the rows' metrics by 3e-8 relative; the tolerance leaves a margin for other CPUs.
SAME_RESULT = {"rtol": 1e-5, "atol": 1e-6}
# Adam divides each weight's step by its own gradient scale, so the rounding of summing a batch's gradient in two
# halves (all-reduce) rather than whole reaches the weights of a distilled block at 1e-5 on some CPUs
SAME_ADAM_RESULT = {"rtol": 1e-4, "atol": 1e-5}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_rank_batches_cut_the_order_one_process_draws():
    one = rank_batches(30, 8, torch.Generator().manual_seed(3))
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    assert one == [batch.tolist() for batch in order.split(8)], "one process: the seeded permutation, cut in batches"
    parts = [rank_batches(30, 8, torch.Generator().manual_seed(3), rank, 3) for rank in range(3)]
    assert all(len(p) == len(one) for p in parts), "every rank takes every step"
    for step, batch in enumerate(one):
        assert sum((p[step] for p in parts), []) == batch, "the ranks' parts make up the global batch, in order"
        assert max(len(p[step]) for p in parts) - min(len(p[step]) for p in parts) <= 1
    last = [rank_batches(9, 8, None, rank, 3)[-1] for rank in range(3)]
    assert last == [[8], [8], [8]], "a batch smaller than the ranks is padded by repeating it"


@pytest.fixture(scope="module")
def worker_runs(prepared_run, tmp_path_factory):
    """tests/ddp_worker.py as one process and as two under torchrun, on the prepared run."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"nproc{nproc}")
        (out / "outputs" / "data").mkdir(parents=True)
        shutil.copyfile(prepared_run.paths.splits, out / "outputs" / "data" / "splits.json")
        launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", "2"]
        _run([*launch, str(WORKER), str(prepared_run.paths.root.parent), str(out)], cwd=out)
        runs[nproc] = {"out": out, "ranks": [torch.load(out / f"result_{r}.pt", weights_only=True)
                                             for r in range(nproc)],
                       "writes": [json.loads((out / f"writes_{r}.json").read_text()) for r in range(nproc)]}
    return runs


def _close(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=SAME_RESULT["rtol"], abs=SAME_RESULT["atol"])
                                     for k in x) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_processes_train_a_classifier_like_one(worker_runs):
    one, two = worker_runs[1]["ranks"][0], worker_runs[2]["ranks"][0]
    assert two["world"] == 2 and one["world"] == 1
    assert _close(two["mlp_history"], one["mlp_history"]), (two["mlp_history"], one["mlp_history"])
    assert two["mlp_history"][-1]["loss"] < two["mlp_history"][0]["loss"]
    for name, weight in one["mlp"].items():
        torch.testing.assert_close(two["mlp"][name], weight, **SAME_RESULT)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 360), "at most one test image apart"
    saved = load_checkpoint(worker_runs[2]["out"] / "mlp.pt")["model"]
    assert all(torch.equal(saved[k], two["mlp"][k]) for k in saved), "rank 0 saved the trained weights"
    other = worker_runs[2]["ranks"][1]
    assert all(torch.equal(other["mlp"][k], two["mlp"][k]) for k in saved) and other["mlp_history"] == two[
        "mlp_history"], "both ranks hold the same model and the same rows"


@pytest.mark.slow
def test_two_processes_distill_a_block_like_one(worker_runs):
    """Each step trains one sampled path per cell: both ranks sample the same, untouched ops get no update."""
    one, two = worker_runs[1]["ranks"][0]["block_history"], worker_runs[2]["ranks"][0]["block_history"]
    assert _close(two, one), (two, one)
    cells = [k for k in one[0] if k.startswith("loss_")]
    assert len(cells) >= 2 and one[-1]["loss"] < one[0]["loss"]
    weights = [load_checkpoint(worker_runs[n]["out"] / "block.pt")["model"] for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()
    for name, weight in weights[0].items():
        torch.testing.assert_close(weights[1][name], weight, **SAME_ADAM_RESULT)


@pytest.mark.slow
def test_only_rank_0_writes_files(worker_runs):
    rank0, rank1 = worker_runs[2]["writes"]
    assert rank1 == []
    names = {Path(p).name for p in rank0}
    assert {"mlp.pt", "block.pt", "teacher.pt", "train_state.pt", "history.csv", "metrics.json"} <= names
    assert sorted(Path(p).name for p in rank0) == sorted(Path(p).name for p in worker_runs[1]["writes"][0])
    metrics = json.loads((worker_runs[2]["out"] / "outputs" / "teacher" / "metrics.json").read_text())
    assert metrics["epochs"] == 1


def _params(tmp_path: Path, prepared_run, name: str, **teacher_train) -> Path:
    raw = tiny_raw(tmp_path / name)
    raw["teacher"]["train"] |= teacher_train
    (tmp_path / name / "data").mkdir(parents=True)
    shutil.copyfile(prepared_run.paths.splits, tmp_path / name / "data" / "splits.json")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _dna(*args: str) -> list[str]:
    return [sys.executable, "-m", "dna.cli", *args]


@pytest.mark.slow
@pytest.mark.reliability
def test_cli_launches_torchrun_and_a_killed_run_resumes(prepared_run, tmp_path):
    whole = _params(tmp_path, prepared_run, "whole", epochs=2)
    done = _run(_dna("teacher", "--params", str(whole), "--nproc", "2"), tmp_path)
    assert shown(stage_command("teacher", 2, whole)) in done.stderr, "the torchrun line is logged"
    assert done.stderr.count("{'test_accuracy'") == 1, "one rank prints the result"

    cut = _params(tmp_path, prepared_run, "cut", epochs=2)
    state = tmp_path / "cut" / "teacher" / "train_state.pt"
    process = subprocess.Popen(_dna("teacher", "--params", str(cut), "--nproc", "2"), cwd=tmp_path, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # the command is torchrun now: it stops both ranks, as on preemption
    finally:
        assert process.wait(60) != 0
    try:
        killed_at = load_checkpoint(state)["epoch"]
    except CheckpointError:
        pytest.fail("the checkpoint was not written before the kill")
    assert killed_at == 1 and not (tmp_path / "cut" / "teacher" / "teacher.pt").exists()

    resumed = _run(_dna("teacher", "--params", str(cut), "--nproc", "2"), tmp_path)
    assert f"resuming after epoch {killed_at}" in resumed.stderr
    a, b = load_checkpoint(tmp_path / "whole" / "teacher" / "train_state.pt"), load_checkpoint(state)
    assert a["history"] == b["history"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the same weights as without the kill"
    assert len(b["rank_rng"]) == 2, "every rank's random state was saved"


def test_a_wrong_key_stops_before_torchrun_starts(tmp_path, prepared_run):
    params = _params(tmp_path, prepared_run, "bad")
    done = subprocess.run(_dna("retrain", "--params", str(params), "--nproc", "2", "-S", "retrain.train.lr=-1"),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "retrain.train.lr" in done.stderr
    assert "torch.distributed.run" not in done.stderr


@pytest.mark.slow
def test_a_caller_outside_the_group_runs_a_stage_in_processes(tmp_path, prepared_run, monkeypatch):
    """What a flow does with orchestration.nproc > 1: torchrun as a child process, overrides passed through."""
    params = _params(tmp_path, prepared_run, "flow", epochs=2)
    monkeypatch.chdir(tmp_path)
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    run_in_processes("teacher", 2, params, {"teacher.train.epochs": 1})
    metrics = json.loads((tmp_path / "flow" / "teacher" / "metrics.json").read_text())
    assert metrics["epochs"] == 1


def test_gloo_listens_on_loopback_when_every_process_runs_here(monkeypatch):
    """gloo's processes listen on the address of the host name (maybe a network's): torchrun --standalone, as
    `--nproc` starts it, puts every process on this machine, so they are pinned to loopback; across machines not."""
    from dna import ddp

    seen = []
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(ddp.dist, "init_process_group",
                        lambda *a, **k: seen.append(os.environ.get("GLOO_SOCKET_IFNAME")))
    monkeypatch.setattr(ddp.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: None)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for local_world, expected in (("1", None), ("2", "lo")):  # two machines of one process each; one of two
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        with ddp.process_group(torch.device("cpu")):
            pass
        assert seen[-1] == expected
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # a person's choice stays
    with ddp.process_group(torch.device("cpu")):
        pass
    assert seen[-1] == "eth7"
