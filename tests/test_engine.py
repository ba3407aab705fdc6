import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dna.checkpoint import load_checkpoint, save_checkpoint
from dna.ddp import rank_shard
from dna.engine import Engine, NonFiniteLoss, channels_last, completed_epochs

SAMPLES, BATCH = 96, 16
STEPS_PER_EPOCH = SAMPLES // BATCH


def problem(feature_shape=(8,)):
    """Random inputs whose class is the argmax of a fixed linear map of their features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, *feature_shape, generator=g)
    y = (x.reshape(SAMPLES, -1, 8).mean(1) @ torch.randn(8, 3, generator=g)).argmax(1)
    return x, y


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))  # dropout: uses the RNG


class Crash(RuntimeError):
    pass


def engine(path, model, epochs=4, fingerprint="a", precision="fp32", on_epoch=None, poison_step=None,
           crash_step=None, inputs=None, seen=None, after_step=(), states=None):
    """An Engine on the tiny problem; at `poison_step` (counted from 1 over the whole run) the loss is NaN, at
    `crash_step` the step raises Crash."""
    x, y = inputs if inputs is not None else problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    steps = []

    def batches(epoch, generator):
        order = rank_shard(torch.randperm(SAMPLES, generator=generator))
        return [(x[i], y[i]) for i in order.split(BATCH)]

    def step(batch):
        xb, yb = batch
        if seen is not None:
            seen.append(xb)
        logits = model(xb)
        if logits.dim() == 3:
            logits = logits.mean(1)
        loss = F.cross_entropy(logits.float(), yb)
        steps.append(1)
        if len(steps) == crash_step:
            raise Crash
        if len(steps) == poison_step:
            loss = loss * float("nan")
        return loss, {"train_accuracy": int((logits.argmax(1) == yb).sum())}

    return Engine(model, optimizer, scheduler, batches, step, epochs=epochs, checkpoint=path, fingerprint=fingerprint,
                  seed=7, device=torch.device("cpu"), name="tiny", precision=precision, on_epoch=on_epoch,
                  after_step=after_step, states=states or {})


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_an_interrupted_epoch_equals_an_uninterrupted_run(tmp_path):
    whole = engine(tmp_path / "whole.pt", tiny_model()).fit()
    assert whole.history[-1]["loss"] < whole.history[0]["loss"]

    with pytest.raises(Crash):
        engine(tmp_path / "cut.pt", tiny_model(), crash_step=2 * STEPS_PER_EPOCH + 2).fit()
    assert load_checkpoint(tmp_path / "cut.pt")["epoch"] == 2

    model, seen = tiny_model(), []
    resumed = engine(tmp_path / "cut.pt", model, on_epoch=seen.append).fit()
    assert resumed.resumed_from == 2 and [row["epoch"] for row in seen] == [3, 4]
    assert resumed.history == whole.history
    assert weights_equal(model.state_dict(), load_checkpoint(tmp_path / "whole.pt")["model"])


class StepSum:
    """A per-step hook with state: the sum of the step numbers it was given."""

    def __init__(self):
        self.total, self.calls = 0, []

    def __call__(self, updates: int) -> None:
        self.total += updates
        self.calls.append(updates)

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]


def test_after_step_hooks_count_optimizer_steps_across_a_resume_and_states_are_restored(tmp_path):
    steps = 4 * STEPS_PER_EPOCH
    whole = StepSum()
    engine(tmp_path / "whole.pt", tiny_model(), after_step=[whole], states={"sum": whole}).fit()
    assert whole.calls == list(range(1, steps + 1)) and whole.total == steps * (steps + 1) // 2

    cut = StepSum()
    with pytest.raises(Crash):
        engine(tmp_path / "cut.pt", tiny_model(), crash_step=2 * STEPS_PER_EPOCH + 2, after_step=[cut],
               states={"sum": cut}).fit()
    state = load_checkpoint(tmp_path / "cut.pt")
    done = 2 * STEPS_PER_EPOCH
    assert state["updates"] == done and state["states"] == {"sum": {"total": done * (done + 1) // 2}}

    resumed = StepSum()
    engine(tmp_path / "cut.pt", tiny_model(), after_step=[resumed], states={"sum": resumed}).fit()
    assert resumed.calls == list(range(done + 1, steps + 1)), "the count continues after the last saved epoch"
    assert resumed.total == whole.total, "the state saved with the epoch was restored"


def test_resume_restores_the_rng_so_dropout_masks_continue(tmp_path):
    """Without restoring the RNG the resumed epochs draw other dropout masks: the weights then differ."""
    engine(tmp_path / "whole.pt", tiny_model(), epochs=2).fit()
    engine(tmp_path / "cut.pt", tiny_model(), epochs=1).fit()
    state = load_checkpoint(tmp_path / "cut.pt")
    del state["rng"]
    save_checkpoint(tmp_path / "no_rng.pt", state)
    with_rng, without_rng = tiny_model(), tiny_model()
    engine(tmp_path / "cut.pt", with_rng, epochs=2).fit()
    engine(tmp_path / "no_rng.pt", without_rng, epochs=2).fit()
    expected = load_checkpoint(tmp_path / "whole.pt")["model"]
    assert weights_equal(with_rng.state_dict(), expected)
    assert not weights_equal(without_rng.state_dict(), expected)


def test_a_cuda_random_state_is_saved_only_with_cuda_and_skipped_where_there_is_none(tmp_path, caplog):
    """A checkpoint written on a GPU holds the CUDA random state of each GPU (torch.cuda.get_rng_state_all); one
    written here holds none, and resuming such a GPU checkpoint here continues the run (CPU draws exact) with a
    warning that the GPU's draws could not be restored."""
    engine(tmp_path / "whole.pt", tiny_model(), epochs=2).fit()
    engine(tmp_path / "cut.pt", tiny_model(), epochs=1).fit()
    state = load_checkpoint(tmp_path / "cut.pt")
    assert ("cuda_rng" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)] * (gpus + 1)  # as if written with one GPU more
    save_checkpoint(tmp_path / "gpu.pt", state)
    model = tiny_model()
    with caplog.at_level("WARNING", logger="dna.engine"):
        resumed = engine(tmp_path / "gpu.pt", model, epochs=2).fit()
    assert resumed.resumed_from == 1 and f"random state of {gpus + 1} GPUs" in caplog.text
    assert weights_equal(model.state_dict(), load_checkpoint(tmp_path / "whole.pt")["model"])


def test_checkpoint_of_another_fingerprint_is_ignored_and_overwritten(tmp_path):
    path = tmp_path / "c.pt"
    engine(path, tiny_model(), epochs=2, fingerprint="a").fit()
    seen = []
    other = engine(path, tiny_model(), epochs=2, fingerprint="b", on_epoch=seen.append).fit()
    assert other.resumed_from == 0 and [row["epoch"] for row in seen] == [1, 2]
    assert load_checkpoint(path)["fingerprint"] == "b"
    again = engine(path, tiny_model(), epochs=2, fingerprint="b").fit()
    assert again.resumed_from == 2 and again.history == other.history


def test_completed_epochs_are_those_fit_resumes_after(tmp_path):
    path = tmp_path / "c.pt"
    assert completed_epochs(path, "a") == 0
    engine(path, tiny_model(), epochs=2, fingerprint="a").fit()
    assert completed_epochs(path, "b") == 0, "a checkpoint of another run"
    assert completed_epochs(path, "a") == 2 == engine(path, tiny_model(), epochs=3, fingerprint="a").fit().resumed_from


def test_nan_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "n.pt"
    with pytest.raises(NonFiniteLoss, match=r"^tiny: loss is nan at epoch 2 step 3; the last good checkpoint was kept"):
        engine(path, tiny_model(), poison_step=STEPS_PER_EPOCH + 4).fit()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and math.isfinite(state["history"][-1]["loss"])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_on_cpu_trains_in_the_lower_precision(tmp_path, precision, dtype):
    model = tiny_model()
    dtypes = []
    model[-1].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    fitted = engine(tmp_path / "m.pt", model, epochs=4, precision=precision).fit()
    assert set(dtypes) == {dtype}
    assert fitted.history[-1]["loss"] < 0.8 * fitted.history[0]["loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay in fp32"
    assert ("scaler" in load_checkpoint(tmp_path / "m.pt")) == (precision == "fp16")


def test_channels_last_converts_4d_tensors_only():
    image, tokens, flat, labels = torch.randn(2, 3, 4, 5), torch.randn(2, 7, 8), torch.randn(2, 8), torch.arange(2)
    out = channels_last({"x": (image, tokens), "flat": flat, "y": labels, "name": "batch"})
    assert out["x"][0].is_contiguous(memory_format=torch.channels_last) and not out["x"][0].is_contiguous()
    assert torch.equal(out["x"][0], image)
    assert out["x"][1] is tokens and out["flat"] is flat and out["y"] is labels and out["name"] == "batch"


def test_sequence_inputs_train_without_a_memory_format(tmp_path):
    """A 3-D batch (tokens x features, as a transformer takes) reaches the step unchanged."""
    seen = []
    fitted = engine(tmp_path / "s.pt", tiny_model(), epochs=2, inputs=problem((5, 8)), seen=seen).fit()
    assert seen[0].shape == (BATCH, 5, 8) and seen[0].is_contiguous()
    assert len(fitted.history) == 2


def test_rank_shards_split_an_epoch_like_distributed_sampler():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shards = [rank_shard(order, rank, 4) for rank in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    assert set(torch.cat(shards).tolist()) == set(range(10))
    assert torch.equal(rank_shard(order), order), "one process: the whole order"


def _two_ranks(rank, world, init_file, root):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(tiny_model())
        seen = []
        fitted = engine(root / "ddp.pt", model, epochs=2, seen=seen).fit()
        outcome = {"history": fitted.history, "model": model.module.state_dict(), "samples": sum(map(len, seen))}
        try:
            engine(root / "nan.pt", nn.parallel.DistributedDataParallel(tiny_model()),
                   poison_step=STEPS_PER_EPOCH // world + 2 if rank == 1 else None).fit()
        except NonFiniteLoss as e:
            outcome["error"] = str(e)
        torch.save(outcome, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_processes_write_one_checkpoint_and_stop_together_on_nan(tmp_path):
    context = mp.spawn(_two_ranks, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=False)
    for _ in range(240):
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the ranks did not finish: one waits for the other")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["samples"] for r in ranks] == [2 * SAMPLES // 2] * 2, "each rank trains on half of every epoch"
    assert ranks[0]["history"] == ranks[1]["history"], "the rows sum the epoch over both ranks"
    assert weights_equal(ranks[0]["model"], ranks[1]["model"])
    state = load_checkpoint(tmp_path / "ddp.pt")
    assert state["epoch"] == 2 and weights_equal(state["model"], ranks[0]["model"]), "saved unwrapped, by rank 0"
    for r in ranks:
        assert r["error"].startswith("tiny: loss is nan at epoch 2 step 1"), "both ranks stop at rank 1's NaN"
    assert load_checkpoint(tmp_path / "nan.pt")["epoch"] == 1
