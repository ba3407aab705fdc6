"""The distill flow on a Prefect test server: blocks fan out on a task runner, log nested MLflow runs and
Prefect artifacts, and a block whose inputs did not change is not trained again."""
from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from pipeline_support import ROOT, clone_project, working_directory


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts_by_key(keys: list[str]) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    latest = {}
    for artifact in sorted(found, key=lambda a: a.created):
        latest[artifact.key] = artifact
    return latest


def assert_blocks_agree(root, result: dict, distilled, score_rtol: float = 1e-3) -> None:
    """Each block of `result` (run in `root`) trained its two epochs to the thread-pool run's loss and rated the same
    candidates alike."""
    threads_root, threads = distilled[0], distilled[1]
    for block, theirs in zip(result["blocks"], threads["blocks"]):
        assert block["trained_epochs"] == 2 and block["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-3)
        mine = pd.read_csv(root / "outputs" / "ratings" / f"block_{block['block']}.csv")
        other = pd.read_csv(threads_root / "outputs" / "ratings" / f"block_{block['block']}.csv")
        assert list(mine["path"]) == list(other["path"]) and len(mine) > 0
        pd.testing.assert_series_equal(mine["score"], other["score"], rtol=score_rtol)


@pytest.fixture(scope="module")
def distilled(prefect_api, tiny_project, tmp_path_factory):
    """The distill flow run twice in a copy of the prepared project, on the thread pool (the default runner)."""
    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-threads"))
    with working_directory(root):
        first = run_distill("params.yaml")
        checkpoints = {b: sha(root / "outputs" / "distill" / f"block_{b}.pt") for b in (0, 1)}
        second = run_distill("params.yaml")
    return root, first, second, checkpoints


def test_every_block_is_trained_rated_and_plotted(distilled):
    root, first, _, _ = distilled
    assert first["task_runner"] == "threads"
    assert [b["block"] for b in first["blocks"]] == [0, 1]
    for block in first["blocks"]:
        assert block["trained_epochs"] == 2 and block["resumed_from"] == 0
        ratings = pd.read_csv(root / "outputs" / "ratings" / f"block_{block['block']}.csv")
        assert len(ratings.drop_duplicates(["cell", "path"])) == block["candidates"] > 0
        curve = pd.read_csv(root / "outputs" / "distill" / "curves" / f"block_{block['block']}.csv")
        assert list(curve["epoch"]) == [1, 2]
    assert [b["candidates"] for b in first["blocks"]] == [2, 6]  # 2 ops; block 1 has depths 1 and 2


def test_unchanged_blocks_are_not_trained_again(distilled):
    root, first, second, checkpoints = distilled
    for block in second["blocks"]:
        assert block["trained_epochs"] == 0 and block["resumed_from"] == 2
        assert sha(root / "outputs" / "distill" / f"block_{block['block']}.pt") == checkpoints[block["block"]]
    assert [b["final_loss"] for b in second["blocks"]] == [b["final_loss"] for b in first["blocks"]]


def test_mlflow_has_a_stage_run_with_one_nested_run_per_block_and_per_epoch_metrics(distilled):
    from mlflow.tracking import MlflowClient

    root, first, _, _ = distilled
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    block_runs = [client.get_run(b["mlflow_run_id"]) for b in first["blocks"]]
    parents = {r.data.tags["mlflow.parentRunId"] for r in block_runs}
    assert len(parents) == 1
    stage = client.get_run(parents.pop())
    assert stage.info.run_name == "distill" and stage.info.status == "FINISHED"
    assert stage.data.params["distill.epochs"] == "2" and "block_1.best_score" in stage.data.metrics
    for block, run in zip(first["blocks"], block_runs):
        assert run.info.run_name == f"block_{block['block']}" and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert run.data.metrics["best_score"] == pytest.approx(block["best"][0]["score"])
        assert [a.path for a in client.list_artifacts(run.info.run_id, "ratings")] == [
            f"ratings/block_{block['block']}.csv"]
    assert (root / "mlruns").is_dir()  # artifacts went to the project's absolute artifact location


def test_prefect_shows_progress_per_block_and_the_best_candidates(distilled):
    _, first, _, _ = distilled
    found = artifacts_by_key(["distill-block-0", "distill-block-1", "best-candidates"])
    assert found["distill-block-0"].type == "progress" and float(found["distill-block-0"].data) == 100.0
    assert float(found["distill-block-1"].data) == 100.0
    table = found["best-candidates"].data
    table = __import__("json").loads(table) if isinstance(table, str) else table
    assert {row["block"] for row in table} == {0, 1}
    assert min(r["score"] for r in table if r["block"] == 1) == pytest.approx(first["blocks"][1]["best"][0]["score"],
                                                                              rel=1e-5)


def test_blocks_run_on_a_dask_local_cluster_of_two_worker_processes(distilled, tiny_project, tmp_path_factory,
                                                                     monkeypatch):
    """Same project, fresh outputs, two single-threaded Dask worker processes: each block trains in a worker,
    and the ratings agree with the thread-pool run."""
    import os

    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-dask"))
    monkeypatch.setenv("PREFECT_API_URL", os.environ.get("PREFECT_API_URL", ""))  # restored after the test
    with working_directory(root):
        result = run_distill("params.yaml", {"orchestration.task_runner": "dask"}, dask_processes=True)
    assert result["task_runner"] == "dask"
    processes = {b["process"] for b in result["blocks"]}
    assert os.getpid() not in processes
    assert_blocks_agree(root, result, distilled)


@pytest.mark.slow  # a Dask scheduler and two workers start, then both blocks train: about two minutes here
def test_blocks_run_on_a_dask_cluster_by_address_one_block_per_gpu_worker(distilled, tiny_project, tmp_path_factory,
                                                                          tmp_path, monkeypatch):
    """A scheduler and two workers started with the `dask` command line, each pinned to its own (pretend) GPU by
    CUDA_VISIBLE_DEVICES and offering GPU=1; the distill flow connects by orchestration.cluster_address and each block
    holds one GPU: the two blocks run on the two workers, and the ratings agree with the thread-pool run."""
    import os

    from server_support import dask_cluster

    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-dask-address"))
    monkeypatch.setenv("PREFECT_API_URL", os.environ.get("PREFECT_API_URL", ""))  # restored after the test
    with dask_cluster(tmp_path / "dask") as (address, workers), working_directory(root):
        result = run_distill("params.yaml", {"orchestration.task_runner": "dask",
                                             "orchestration.cluster_address": address,
                                             "orchestration.task_resources": {"GPU": 1}})
    assert result["task_runner"] == "dask"
    gpu_of = {w["pid"]: w["gpu"] for w in workers.values()}
    ran_on = [gpu_of.get(b["process"]) for b in result["blocks"]]
    assert sorted(ran_on) == ["0", "1"], (ran_on, workers)  # each worker (and its GPU) trained one block
    assert_blocks_agree(root, result, distilled)



@pytest.mark.slow  # a local Ray instance starts, then both blocks train: about a minute here
def test_blocks_run_on_a_local_ray_instance_the_flow_starts_and_stops(distilled, tiny_project, tmp_path_factory,
                                                                      tmp_path):
    """No orchestration.cluster_address: the flow starts a local Ray instance of max_workers CPUs, each block runs
    in a Ray worker process (reporting to this Prefect API through Ray's runtime environment), and the instance
    is shut down when the flow ends; the ratings agree with the thread-pool run."""
    import os

    import ray
    from server_support import ray_auth

    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-ray-local"))
    with ray_auth(tmp_path / "ray"), working_directory(root):
        result = run_distill("params.yaml", {"orchestration.task_runner": "ray"})
    assert result["task_runner"] == "ray" and not ray.is_initialized()
    assert os.getpid() not in {b["process"] for b in result["blocks"]}
    assert_blocks_agree(root, result, distilled)


@pytest.mark.slow  # a Ray head node starts, then both blocks train: about a minute and a half here
def test_blocks_run_on_a_ray_cluster_by_address_one_gpu_each(distilled, tiny_project, tmp_path_factory, tmp_path):
    """A Ray head node started with `ray start`, offering two (pretend) GPUs; the distill flow joins it by
    orchestration.cluster_address and each block holds one GPU: Ray runs the blocks in worker processes of its own,
    each with CUDA_VISIBLE_DEVICES set to a different GPU, and the ratings agree with the thread-pool run."""
    import os

    from server_support import ray_cluster

    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-ray-address"))
    with ray_cluster(tmp_path / "ray", gpus=2) as address, working_directory(root):
        result = run_distill("params.yaml", {"orchestration.task_runner": "ray",
                                             "orchestration.cluster_address": address,
                                             "orchestration.task_resources": {"GPU": 1}})
    assert result["task_runner"] == "ray"
    assert sorted(b["devices"] for b in result["blocks"]) == ["0", "1"], result["blocks"]
    assert os.getpid() not in {b["process"] for b in result["blocks"]}
    assert_blocks_agree(root, result, distilled)


@pytest.mark.slow  # a Ray head node starts, then each block trains under torchrun in two processes: about 3 minutes
def test_with_nproc_2_on_ray_each_block_holds_two_gpus_for_its_two_processes(distilled, tiny_project,
                                                                              tmp_path_factory, tmp_path, monkeypatch):
    """orchestration.nproc: 2 with task_resources {GPU: 2} on a Ray head node of four (pretend) GPUs: each block task
    gets two GPUs of its own from Ray and runs its two torchrun processes there; the results are those of the
    thread-pool run within the tolerance of data-parallel training (see the nproc test below)."""
    import os

    from server_support import ray_cluster

    from dna.checkpoint import load_checkpoint
    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-ray-nproc"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with ray_cluster(tmp_path / "ray", gpus=4) as address, working_directory(root):
        result = run_distill("params.yaml", {"orchestration.task_runner": "ray", "orchestration.nproc": 2,
                                             "orchestration.cluster_address": address,
                                             "orchestration.task_resources": {"GPU": 2}})
    devices = sorted(b["devices"] for b in result["blocks"])
    assert len(devices) == 2 and all(len(d.split(",")) == 2 for d in devices), devices
    assert set(devices[0].split(",")).isdisjoint(devices[1].split(",")), devices  # two GPUs of its own each
    assert os.getpid() not in {b["process"] for b in result["blocks"]}
    for block in result["blocks"]:
        assert len(load_checkpoint(root / "outputs" / "distill" / f"block_{block['block']}.pt")["rank_rng"]) == 2
    assert_blocks_agree(root, result, distilled, score_rtol=1e-2)


@pytest.mark.slow  # each block starts torchrun with two processes: about a minute here
def test_with_nproc_2_each_block_trains_in_two_processes_and_is_rated_here(distilled, tiny_project,
                                                                            tmp_path_factory, monkeypatch):
    """orchestration.nproc: 2 on the thread runner: each block task runs `dna distill --block B` under torchrun (2
    gloo processes), then rates the supernet rank 0 saved and logs its epochs from the history rank 0 wrote.

    The blocks hold BatchNorm, which each process computes over its half of the batch, so the results are not those
    of one process within tests/test_ddp.py's 1e-5 (that holds for a block without BatchNorm): measured here, the
    epoch losses differed by 1e-4 relative and the scores by 2e-3."""
    import os

    from mlflow.tracking import MlflowClient

    from dna.checkpoint import load_checkpoint
    from flows.distill import run_distill

    one_root, one = distilled[0], distilled[1]
    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-nproc"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # torchrun's processes import this checkout's dna
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with working_directory(root):
        two = run_distill("params.yaml", {"orchestration.nproc": 2})
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")

    def shapes(weights: dict) -> dict:
        return {name: tensor.shape for name, tensor in weights.items()}

    for block, theirs in zip(two["blocks"], one["blocks"]):
        b = block["block"]
        assert block["trained_epochs"] == 2 and block["resumed_from"] == 0 and block["process"] == os.getpid()
        mine_ckpt = load_checkpoint(root / "outputs" / "distill" / f"block_{b}.pt")
        their_ckpt = load_checkpoint(one_root / "outputs" / "distill" / f"block_{b}.pt")
        assert len(mine_ckpt["rank_rng"]) == 2 and "rank_rng" not in their_ckpt, "trained by two processes"
        assert mine_ckpt["fingerprint"] == their_ckpt["fingerprint"] and mine_ckpt["epoch"] == 2
        assert shapes(mine_ckpt["model"]) == shapes(their_ckpt["model"])
        history = pd.read_csv(root / "outputs" / "distill" / f"history_{b}.csv")
        pd.testing.assert_frame_equal(history, pd.read_csv(one_root / "outputs" / "distill" / f"history_{b}.csv"),
                                      rtol=1e-3)
        assert block["final_loss"] == history["loss"].iloc[-1] == pytest.approx(theirs["final_loss"], rel=1e-3)
        logged = client.get_metric_history(block["mlflow_run_id"], "loss")
        assert [(m.step, m.value) for m in logged] == [(r.epoch, pytest.approx(r.loss)) for r in history.itertuples()]
        mine = pd.read_csv(root / "outputs" / "ratings" / f"block_{b}.csv")
        other = pd.read_csv(one_root / "outputs" / "ratings" / f"block_{b}.csv")
        assert list(mine["path"]) == list(other["path"]) and len(mine) > 0
        pd.testing.assert_series_equal(mine["score"], other["score"], rtol=1e-2)
    assert [b["candidates"] for b in two["blocks"]] == [b["candidates"] for b in one["blocks"]]

    with working_directory(root):  # the number of processes is not part of a block's fingerprint
        again = run_distill("params.yaml")
    assert [(b["trained_epochs"], b["resumed_from"]) for b in again["blocks"]] == [(0, 2), (0, 2)]


def test_a_progressive_supervision_distills_its_blocks_one_after_the_other(prefect_api, tiny_project, tmp_path):
    """supervision ssl: block 1's input is block 0's best-rated candidate, so the flow runs block 1's task once
    block 0's has finished (with threads to spare for both), and both blocks match the library's own run."""
    import yaml
    from mlflow.tracking import MlflowClient

    from dna.config import parse_params
    from dna.pipeline import Run, stage_distill, stage_rate
    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path / "flow", outputs=("data",))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["supervision"] = {"kind": "ssl"}
    raw["teacher"]["source"] = "none"
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with working_directory(root):
        result = run_distill("params.yaml")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    first, second = (client.get_run(b["mlflow_run_id"]).info for b in result["blocks"])
    assert second.start_time >= first.end_time, "block 1 waited for block 0"
    assert not (root / "outputs" / "teacher").exists()

    library = clone_project(tiny_project, tmp_path / "library", outputs=("data",))
    run = Run(parse_params(raw | {"outputs": str(library / "outputs")}))
    for block in (0, 1):
        stage_distill(run, block)
        stage_rate(run, block)
    for block in (0, 1):
        mine = pd.read_csv(root / "outputs" / "ratings" / f"block_{block}.csv")
        theirs = pd.read_csv(library / "outputs" / "ratings" / f"block_{block}.csv")
        pd.testing.assert_series_equal(mine["score"], theirs["score"], rtol=1e-5)
