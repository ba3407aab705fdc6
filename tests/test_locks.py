"""One run at a time of a stage (and block) on an outputs folder: a second run stops, naming the holder; other
blocks, other stages and other folders run alongside; the feature cache is waited for."""
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from dna.locks import StageBusy, lock_name, lock_path, stage_lock
from dna.pipeline import Run
from dna.stages import STAGES
from tests.conftest import ROOT, tiny_raw

HOLD = """
import sys
from dna.locks import stage_lock
with stage_lock(sys.argv[1], "distill", 1):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_of_a_block_stops_naming_the_process_that_runs_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StageBusy, match=rf"^the distill stage of block 1 on {tmp_path} is already running "
                                            rf"\(pid {holder.pid}, `-c {tmp_path}`, since .+\): wait until "
                                            rf"it ends, or stop it$"):
            with stage_lock(tmp_path, "distill", 1):
                pass
        with stage_lock(tmp_path, "distill", 0), stage_lock(tmp_path, "rate", 1):
            with stage_lock(tmp_path / "b", "distill", 1):
                pass  # another block, another stage, another outputs folder
        assert stat.S_IMODE(lock_path(tmp_path, "distill", 1).stat().st_mode) == 0o600
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with stage_lock(tmp_path, "distill", 1):  # the holder ended: free again
        pass


def test_two_threads_of_one_process_on_one_block_exclude_each_other(tmp_path):
    with stage_lock(tmp_path, "distill", 0):
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_try(tmp_path)))
        thread.start()
        thread.join()
        assert isinstance(errors[0], StageBusy) and f"pid {os.getpid()}" in str(errors[0])
    assert lock_path(tmp_path, "distill", 0).read_text() == "", "the record goes with the lock"


def _try(root):
    try:
        with stage_lock(root, "distill", 0):
            return None
    except StageBusy as exc:
        return exc


def test_the_feature_cache_lock_is_waited_for(tmp_path):
    order = []

    def second():
        with stage_lock(tmp_path, "features", wait=True):
            order.append("second")

    with stage_lock(tmp_path, "features", wait=True):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(timeout=30)
    assert order == ["first", "second"]


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_every_stage_of_the_table_stops_before_any_work_while_another_run_holds_it(tiny_params, stage):
    run = Run(tiny_params)
    args = (run, 0) if stage.per_block else (run,)
    name = lock_name(stage.name, target=run.paths.target if stage.per_target else None)  # a target's own lock
    with stage_lock(run.paths.root, name, 0 if stage.per_block else None):
        with pytest.raises(StageBusy, match=f"the {stage.name} stage"):
            stage.load()(*args)
    assert not any(f.is_file() for f in run.paths.root.rglob("*") if ".locks" not in f.parts), "no work was done"


def test_the_stage_functions_the_flows_call_take_the_lock_themselves(tiny_params):
    from dna import pipeline

    run = Run(tiny_params)
    for name, block in (("data", None), ("teacher", None), ("distill", 1), ("rate", 1), ("profile", None),
                        ("search", None), ("retrain", None), ("export", None)):
        fn = getattr(pipeline, f"stage_{name}")
        held = lock_name(name, target=run.paths.target) if name in ("retrain", "export") else name
        with stage_lock(run.paths.root, held, block), pytest.raises(StageBusy):
            fn(run) if block is None else fn(run, block=block)


def test_only_rank_0_of_several_processes_takes_the_lock(tiny_params, monkeypatch):
    import dna.ddp
    from dna.pipeline import stage_data

    run = Run(tiny_params)
    monkeypatch.setattr(dna.ddp, "is_main", lambda: False)
    with stage_lock(run.paths.root, "data"):  # rank 0 of the same job holds it
        stage_data(run)
    assert run.paths.splits.is_file()


def test_dna_stage_command_exits_1_with_one_line_while_another_run_holds_it(tmp_path):
    import yaml

    from dna.cli import app

    raw = tiny_raw(tmp_path / "outputs")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with stage_lock(tmp_path / "outputs", "data"):
        result = CliRunner().invoke(app, ["data", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: the data stage on {tmp_path / 'outputs'} is already running (pid {os.getpid()}, ")
    assert not (tmp_path / "outputs" / "data").exists()
