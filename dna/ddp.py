"""Data-parallel training: several processes launched by torchrun, one model replica each (DistributedDataParallel).

`batch_size` in params.yaml is the global batch: the batch of one optimizer step, summed over all processes.
`rank_batches` is the one place it is split: each epoch's seeded order is cut into global batches exactly as one
process cuts it, and each global batch into one near-equal part per process; the engine weights each process's loss
so that the step's gradient is the mean over the global batch. So a run's training, fingerprint and checkpoint do
not depend on the number of processes (a run started with 2 resumes with 1), except for BatchNorm: each process
normalises by the statistics of its own part of the batch (as the paper's 64 images per GPU did), not of the whole.

Under torchrun (WORLD_SIZE > 1) `process_group` joins the processes (gloo on CPU, NCCL on CUDA with the process's
local GPU); only rank 0 writes files and logs; the others wait for its writes at barriers.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files: the only process, or rank 0 of several."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process (after rank 0 wrote what the others read); nothing with one process."""
    if rank_and_world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Run the block's work on rank 0 only (yields whether this process does it); the others wait until it is done."""
    yield is_main()
    barrier()


def rank_shard(order: torch.Tensor, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """A rank's part of an epoch's order (this process's by default): padded by repeating its start to a multiple of
    the world size, then every world-size-th index from the rank on (what DistributedSampler does)."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    if world == 1:
        return order
    padded = torch.cat([order, order[:(-len(order)) % world]])
    return padded[rank::world]


def rank_batches(count: int, batch_size: int, generator: torch.Generator | None = None,
                 rank: int | None = None, world: int | None = None) -> list[list[int]]:
    """This process's part of every batch of an epoch over `count` samples, in the order
    torch.randperm(count, generator) (0..count-1 without a generator): see rank_parts."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return [part.tolist() for part in rank_parts(order, batch_size, rank, world)]


def rank_parts(order: torch.Tensor, batch_size: int, rank: int | None = None,
               world: int | None = None) -> list[torch.Tensor]:
    """This process's part of every batch of an epoch's `order`: the order is cut into global batches of
    `batch_size`; each is split into `world` consecutive parts whose sizes differ by at most one. A last batch smaller
    than the number of processes is padded by repeating its samples, so that every process takes every step.
    """
    if rank is None or world is None:
        rank, world = rank_and_world()
    parts = []
    for batch in order.split(batch_size):
        if len(batch) < world:
            batch = batch.repeat(-(-world // len(batch)))[:world]
        parts.append(batch.tensor_split(world)[rank])
    return parts


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    """The device of `device` in params.yaml; of several processes on one machine, each gets its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return local_device(torch.device(name))


def local_device(device: torch.device) -> torch.device:
    """The device of this process: its own GPU (LOCAL_RANK) when several processes share a machine's GPUs."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def one_machine() -> bool:
    """Whether every process of the group runs on this machine (torchrun --standalone, as `--nproc` starts it)."""
    return os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (lo on Linux, lo0 on macOS), if it has one."""
    import socket

    names = {name for _index, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), None)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the processes torchrun started (a no-op for one process): NCCL on CUDA, gloo on CPU. Ranks other than 0
    log warnings only, so the log holds each line once.

    gloo's processes listen on the address of the machine's host name, which may be a network's; with every process
    on this machine they listen on loopback instead (GLOO_SOCKET_IFNAME, unless set). torchrun's own rendezvous store
    listens on all interfaces whatever it is asked (see docs/servers.md)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    loopback = loopback_interface() if one_machine() else None
    if device.type != "cuda" and loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """The model in DistributedDataParallel when several processes train it, else the model itself.

    find_unused_parameters: a step trains only part of the model (a supernet's sampled path)."""
    if rank_and_world()[1] == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a DistributedDataParallel wrapper (so checkpoints load into an unwrapped model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that starts `python -m module args` in `nproc` processes on this machine (torchrun, run through
    this Python so that it finds this environment's packages)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *args]


def stage_command(stage: str, nproc: int, params_file: str | os.PathLike, sets: Sequence[str] = (),
                  block: int | None = None, target: str | None = None) -> list[str]:
    """The torchrun line of `dna <stage> --nproc N`: the same command, without --nproc, in N processes."""
    args = [stage, "--params", str(params_file), *(x for item in sets for x in ("-S", item))]
    if block is not None:
        args += ["--block", str(block)]
    if target is not None:
        args += ["--target", target]
    return torchrun_command(nproc, "dna.cli", args)


def run_in_processes(stage: str, nproc: int, params_file: str | os.PathLike, overrides: dict | None = None,
                     block: int | None = None, target: str | None = None) -> None:
    """Run `dna <stage>` in `nproc` processes under torchrun and wait for them, from a process that stays out of the
    process group (a Prefect flow, which then logs what rank 0 wrote). Raises StageFailure when they fail."""
    import json
    import subprocess

    from dna.errors import StageFailure

    sets = [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]
    command = stage_command(stage, nproc, params_file, sets, block, target)
    log.info("%s in %d processes: %s", stage, nproc, shown(command))
    code = subprocess.run(command).returncode
    if code != 0:
        raise StageFailure(f"{stage}: the {nproc} processes of `{shown(command)}` failed (exit code {code}); "
                          "running it again resumes from the last completed epoch")


def shown(command: Sequence[str]) -> str:
    """A command as one line a shell would run."""
    return shlex.join(command)
