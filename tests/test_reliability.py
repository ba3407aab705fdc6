"""Faults a long run meets: a killed process, a corrupt checkpoint, a second run with the same seed."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dna.checkpoint import load_checkpoint
from dna.config import load_params
from dna.pipeline import Run, stage_distill, stage_rate, stage_search
from tests.conftest import ROOT, tiny_raw

pytestmark = pytest.mark.reliability


def _clone_run(prepared_run, root, **distill):
    """A copy of the prepared run's data, teacher and feature cache, with its own params file."""
    out = root / "outputs"
    for sub in ("data", "teacher", "distill/features"):
        shutil.copytree(prepared_run.paths.root / sub, out / sub)
    raw = tiny_raw(out)
    raw["distill"].update(distill)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / "params.yaml"


def _dna(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "dna.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_epoch(proc, checkpoint, epoch, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoint.is_file():
            try:
                if load_checkpoint(checkpoint)["epoch"] >= epoch:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
            except Exception:  # being replaced right now: rename is atomic, so just look again
                pass
        if proc.poll() is not None:
            raise AssertionError(f"process ended before it was killed:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_sigkilled_distillation_resumes_and_rates_like_an_uninterrupted_run(prepared_run, tmp_path):
    epochs = 4
    whole = Run(load_params(_clone_run(prepared_run, tmp_path / "whole", epochs=epochs)))
    stage_distill(whole, 1)
    expected = stage_rate(whole, 1)

    params = _clone_run(prepared_run, tmp_path / "cut", epochs=epochs)
    cut = Run(load_params(params))
    proc = _dna("distill", "--block", "1", "--params", str(params), cwd=ROOT)
    _kill_after_epoch(proc, cut.paths.supernet(1), 1)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(cut.paths.supernet(1))["epoch"]
    assert 1 <= killed_at < epochs

    again = _dna("distill", "--block", "1", "--params", str(params), cwd=ROOT)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert f"block 1: resuming after epoch {killed_at}" in output
    assert f"epoch {killed_at}/{epochs}" not in output, "no completed epoch is redone"
    assert "\r" not in output, "output to a pipe: log lines, no progress-bar updates"
    assert len(re.findall(r"block 1 epoch \d+/\d+: loss", output)) == epochs - killed_at, "a line per epoch"
    got = stage_rate(Run(load_params(params)), 1)
    # Same seed, data order, sampled paths and checkpoints. The resumed half trains in another process, where
    # oneDNN may pick other float32 kernels, so scores may differ in the last bits: rtol 1e-6, not bit-for-bit.
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6, atol=1e-9)


def test_sigkilled_retraining_resumes_from_its_last_epoch(prepared_run, tmp_path):
    params = _clone_run(prepared_run, tmp_path / "run")
    raw = yaml.safe_load(params.read_text())
    raw["retrain"]["train"]["epochs"] = 5
    params.write_text(yaml.safe_dump(raw))
    run = Run(load_params(params))
    arch = run.space.arch([(c, (0,) * c.depth) for c in (run.space.cells(0)[0], run.space.cells(1)[0])])
    arch.save(run.paths.arch)
    proc = _dna("retrain", "--params", str(params), cwd=ROOT)
    _kill_after_epoch(proc, run.paths.retrain_dir / "train_state.pt", 2)
    killed_at = load_checkpoint(run.paths.retrain_dir / "train_state.pt")["epoch"]
    again = _dna("retrain", "--params", str(params), cwd=ROOT)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert f"retrain: resuming after epoch {killed_at}" in output
    history = pd.read_csv(run.paths.retrain_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_supernet_checkpoint_is_refused_with_a_clear_error(prepared_run, tmp_path, damage):
    params = _clone_run(prepared_run, tmp_path)
    run = Run(load_params(params))
    shutil.copy(prepared_run.paths.supernet(0), run.paths.supernet(0))
    data = bytearray(run.paths.supernet(0).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    run.paths.supernet(0).write_bytes(bytes(data))
    proc = _dna("rate", "--block", "0", "--params", str(params), cwd=ROOT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "block_0.pt" in output and ("checksum" in output or "truncated" in output)
    assert "Traceback" not in output
    assert not run.paths.rating(0).exists(), "nothing was rated from a corrupt checkpoint"


def test_same_seed_gives_identical_ratings_and_architecture(prepared_run, tmp_path):
    runs = []
    for name in ("a", "b"):
        run = Run(load_params(_clone_run(prepared_run, tmp_path / name, epochs=1)))
        for block in range(run.space.num_blocks):
            stage_distill(run, block)
            stage_rate(run, block)
        stage_search(run)
        runs.append(run)
    a, b = runs
    for block in range(a.space.num_blocks):
        pd.testing.assert_frame_equal(pd.read_csv(a.paths.rating(block)), pd.read_csv(b.paths.rating(block)),
                                      check_exact=True)
    assert a.paths.arch.read_text() == b.paths.arch.read_text()
