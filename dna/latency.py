"""Latency of every piece of the search space, measured with ONNX Runtime on the machine that runs the profile.

A profile times, alone, every piece of the space (`SearchSpace.pieces`: the stem, each layer variant at its position
and input size, the head for each width it can follow), plus the cost of one session run of a trivial graph
(`overhead`). A network's latency is
then predicted as a sum, like its parameters and multiply-adds. Every timed piece pays the per-run overhead once,
a whole network pays it once, so the corrected prediction subtracts it from every piece and adds it back once:

    predicted = overhead + sum(piece - overhead)

Each piece is exported with torch's TorchScript-based ONNX exporter (`dynamo=False`): a small layer takes a tenth
of a second that way against seconds with the dynamo exporter, and the graphs run alike in ONNX Runtime.
"""
from __future__ import annotations

import io
import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from dna.arch import Arch
from dna.device_timing import session
from dna.spaces.base import Candidates, Piece, SearchSpace

if TYPE_CHECKING:
    from dna.config import ProfileConfig

COLUMN = "latency_ms"
KINDS = ("overhead", "stem", "layer", "head")
TABLE_COLUMNS = ["kind", "block", "position", "op", "op_name", "in_width", "width", "stride", "resolution", COLUMN]


# timing -----------------------------------------------------------------------------------------------------------
def onnx_bytes(module: nn.Module, shape: tuple[int, ...], opset: int = 18) -> bytes:
    """The module (in eval mode) as an ONNX graph with a fixed input shape, from the TorchScript-based exporter."""
    module = module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), buffer, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], do_constant_folding=True)
    return buffer.getvalue()


@dataclass
class Timed:
    """A session to time, its input, and the times of its runs so far (nanoseconds)."""

    sess: object
    feed: dict
    times: list[int]

    @classmethod
    def of(cls, sess, shape: tuple[int, ...]) -> Timed:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return cls(sess, {sess.get_inputs()[0].name: x}, [])


def time_sessions(timed: list[Timed], cfg: ProfileConfig) -> list[float]:
    """Milliseconds per run of each session: the `cfg.percentile` of its `cfg.runs` timed runs.

    The runs are taken in `cfg.rounds` rounds, every session in turn in each round, so a spell of load from other
    processes touches all sessions alike instead of a few. A low percentile (10th by default) is what the machine
    gives when other processes leave it alone; it moves far less between measurements than the median.
    """
    per_round = max(1, -(-cfg.runs // cfg.rounds))
    for t in timed:
        for _ in range(cfg.warmup):
            t.sess.run(None, t.feed)
    for _ in range(cfg.rounds):
        for t in timed:
            run, feed, times = t.sess.run, t.feed, t.times
            for _ in range(per_round):
                start = time.perf_counter_ns()
                run(None, feed)
                times.append(time.perf_counter_ns() - start)
    return [float(np.percentile(t.times, cfg.percentile)) / 1e6 for t in timed]


def time_module(module: nn.Module, shape: tuple[int, ...], cfg: ProfileConfig) -> float:
    """Latency of one module alone (exported with fixed input `shape`)."""
    return time_sessions([Timed.of(session(onnx_bytes(module, shape), cfg.threads), shape)], cfg)[0]


def overhead_graph(shape: tuple[int, ...]) -> bytes:
    """A graph that only copies its input: what one session run costs besides the layers."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


# the profile ------------------------------------------------------------------------------------------------------
def pieces(space: SearchSpace) -> list[dict]:
    """Every piece to time, as rows of the profile (see `dna.spaces.base.Piece`)."""
    return [p.row() for p in space.pieces()]


def exported_pieces(space: SearchSpace, batch_size: int,
                    progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[dict, bytes, tuple]]:
    """Every row of a profile (the `overhead` row, then `pieces`) with its graph in ONNX and its input shape."""
    torch.manual_seed(0)
    shape = (batch_size, space.in_chans, space.image_size, space.image_size)
    yield ({"kind": "overhead", "block": -1, "position": 0, "op": -1, "op_name": "overhead",
            "in_width": space.in_chans, "width": space.in_chans, "stride": 1, "resolution": space.image_size},
           overhead_graph(shape), shape)
    todo = space.pieces()
    for i, piece in enumerate(todo):
        shape = piece.input_shape(batch_size)
        yield piece.row(), onnx_bytes(space.piece_module(piece), shape), shape
        if progress:
            progress(i + 1, len(todo))


def piece_sessions(space: SearchSpace, cfg: ProfileConfig,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], list[Timed]]:
    """The pieces of the space (`exported_pieces`) and a ready session for each."""
    rows, timed = [], []
    for row, graph, shape in exported_pieces(space, cfg.batch_size, progress):
        rows.append(row)
        timed.append(Timed.of(session(graph, cfg.threads), shape))
    return rows, timed


def profile_table(rows: list[dict], latencies: list[float]) -> pd.DataFrame:
    return pd.DataFrame([{**row, COLUMN: ms} for row, ms in zip(rows, latencies)], columns=TABLE_COLUMNS)


def profile_space(space: SearchSpace, cfg: ProfileConfig, progress: Callable[[int, int], None] | None = None
                  ) -> pd.DataFrame:
    """The latency table of a space: one `overhead` row and one row per piece (see `pieces`)."""
    rows, timed = piece_sessions(space, cfg, progress)
    return profile_table(rows, time_sessions(timed, cfg))


def space_fingerprint(space: SearchSpace) -> dict:
    """What the pieces of a profile are: the space and its input."""
    seen = {"mode": "json", "context": {"fingerprint": True}}
    return {"space": space.cfg.model_dump(**seen), "in_chans": space.in_chans, "image_size": space.image_size,
            "num_classes": space.num_classes}


def fingerprint(space: SearchSpace, cfg: ProfileConfig) -> dict:
    """What a profile depends on: the space, the input, and the timing settings."""
    return space_fingerprint(space) | {"profile": cfg.model_dump(mode="json", context={"fingerprint": True})}


# a device's profile -----------------------------------------------------------------------------------------------
def write_device_kit(space: SearchSpace, batch_size: int, directory: Path) -> Path:
    """What a device must time to profile the space there: every piece as an ONNX file (pieces/), the table of them
    (pieces.csv), the space's fingerprint (kit.json) and time_pieces.py (dna/device_timing.py: onnxruntime and numpy
    only), which writes the device's latency.csv and profile.json."""
    import shutil

    from dna.checkpoint import digest

    (directory / "pieces").mkdir(parents=True)
    rows = []
    for i, (row, graph, shape) in enumerate(exported_pieces(space, batch_size)):
        (directory / "pieces" / f"{i:04d}.onnx").write_bytes(graph)
        rows.append({**row, "file": f"{i:04d}.onnx", "shape": "x".join(map(str, shape))})
    pd.DataFrame(rows).to_csv(directory / "pieces.csv", index=False)
    kit = {"space_fingerprint": digest(space_fingerprint(space)), "batch_size": batch_size, "pieces": len(rows)}
    (directory / "kit.json").write_text(json.dumps(kit, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(__file__).with_name("device_timing.py"), directory / "time_pieces.py")
    return directory / "time_pieces.py"


def device_profile(path: Path, space: SearchSpace) -> LatencyTable:
    """The profile a device wrote (its latency.csv, profile.json beside it) for this space; ConfigError naming the
    path when it is missing, unreadable or of another space or input."""
    from dna.checkpoint import digest
    from dna.errors import ConfigError

    meta_path = path.parent / "profile.json"
    try:
        meta = json.loads(meta_path.read_text())
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"latency_profile {path}: not a device's profile ({exc}); write one with `dna device-kit` "
                          "and the kit's time_pieces.py on the device") from None
    if meta.get("space_fingerprint") != digest(space_fingerprint(space)) or list(table.columns) != TABLE_COLUMNS:
        raise ConfigError(f"latency_profile {path}: measured for another space or input size; make a new kit "
                          "(`dna device-kit`) and time it on the device")
    return LatencyTable(table)


def host() -> dict:
    import onnxruntime as ort

    return {"machine": platform.machine(), "processor": platform.processor() or _cpu_model(),
            "system": platform.platform(), "onnxruntime": ort.__version__, "torch": torch.__version__}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# the latency model ------------------------------------------------------------------------------------------------
class StaleProfile(ValueError):
    """The profile was measured for another space, input or settings."""


@dataclass
class LatencyTable:
    """A measured profile and the predictions made from it (milliseconds)."""

    table: pd.DataFrame
    corrected: bool = True

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls(pd.read_csv(path))

    @property
    def overhead(self) -> float:
        return float(self.table.loc[self.table["kind"] == "overhead", COLUMN].iloc[0])

    def _lookup(self) -> dict[tuple, float]:
        t = self.table
        cut = self.overhead if self.corrected else 0.0
        return {(k, int(b), int(p), int(o), int(i), int(w)): float(v) - cut
                for k, b, p, o, i, w, v in zip(t["kind"], t["block"], t["position"], t["op"], t["in_width"],
                                               t["width"], t[COLUMN])}

    def _get(self, lookup: dict, key: tuple) -> float:
        try:
            return lookup[key]
        except KeyError:
            raise StaleProfile(f"the latency profile has no row for {key} (kind, block, position, op, in_width, "
                               f"width): it was measured for another space; run `dna profile` again") from None

    def _sum(self, lookup: dict, pieces: list[Piece]) -> float:
        return sum(self._get(lookup, p.key) for p in pieces)

    def annotate(self, space: SearchSpace, stages: list[Candidates]) -> list[Candidates]:
        """The stage tables (stem, blocks, head) with latency: each row the sum of its pieces. The stem carries the
        one session run a whole network pays."""
        lookup = self._lookup()
        fixed = self.overhead if self.corrected else 0.0
        stem, *blocks, head = stages
        stem = stem.with_latency([fixed + self._get(lookup, space.stem_piece().key)])
        blocks = [b.with_latency(self._sum(lookup, space.layer_pieces(cell, ops, int(w)))
                                 for cell, ops, w in zip(b.cells, b.ops, b.in_width)) for b in blocks]
        head = head.with_latency(self._get(lookup, space.head_piece(int(w)).key) for w in head.in_width)
        return [stem, *blocks, head]

    def predict(self, space: SearchSpace, arch: Arch) -> float:
        """Predicted latency of a member architecture of the space."""
        fixed = self.overhead if self.corrected else 0.0
        return fixed + self._sum(self._lookup(), space.chain(space.parse(arch)))


def arch_session(arch: Arch, num_classes: int, in_chans: int, image_size: int, cfg: ProfileConfig,
                 path: str | Path | None = None) -> Timed:
    """A whole network ready to time: the ONNX file at `path` if given (e.g. `dna export`'s output), or the network
    built from `arch` (random weights) and exported like the profiled pieces."""
    shape = (cfg.batch_size, in_chans, image_size, image_size)
    if path is not None:
        return Timed.of(session(path, cfg.threads), shape)
    torch.manual_seed(0)
    return Timed.of(session(onnx_bytes(arch.build(num_classes, in_chans), shape), cfg.threads), shape)


def measure_arch(arch: Arch, num_classes: int, in_chans: int, image_size: int, cfg: ProfileConfig,
                 path: str | Path | None = None) -> float:
    """End-to-end latency of a whole network in ONNX Runtime (see `arch_session`)."""
    return time_sessions([arch_session(arch, num_classes, in_chans, image_size, cfg, path)], cfg)[0]


def write_profile(table: pd.DataFrame, meta: dict, directory: str | Path) -> Path:
    from dna.checkpoint import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "latency.csv", table.to_csv(index=False))
    atomic_write_text(directory / "profile.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory / "latency.csv"
