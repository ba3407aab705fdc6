"""One configured run (its params, where its files go, the objects its stages share), the checks made before any
work, and the helpers every stage uses."""
from __future__ import annotations

import copy
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dna.checkpoint import digest, file_digest
from dna.errors import ConfigError, needed
from dna.paths import Paths, ReplicatePaths

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from dna.config import Params, TargetConfig, TrainConfig
    from dna.data import Data
    from dna.spaces.base import Candidates, SearchSpace
    from dna.supervision import BlockSupervision


log = logging.getLogger(__name__)


EpochHook = Callable[[dict], None] | None
EVAL_BATCH_SIZE = 256  # images per batch when evaluating a whole split (the test split may not fit in memory)


class Run:
    """One configured run: its params, where its files go, and the objects its stages share; its target's files are
    those of the first (primary) search target, another's through for_target.

    `replicate` > 0: the same run with its blocks distilled (and rated) again from another seed, into
    rank/replicates/<replicate>/ (dna.paths.ReplicatePaths); everything else is the run's own."""

    def __init__(self, params: Params, replicate: int = 0):
        self.params = params
        self.replicate = replicate
        primary = next(iter(params.search.named_targets()))
        self.paths = Paths(params.out_dir, primary) if not replicate else ReplicatePaths(
            params.out_dir, primary, Paths(params.out_dir).rank_dir / "replicates" / str(replicate))

    def for_target(self, target: str) -> Run:
        """This run at another search target (its network, retraining, export), sharing what is loaded."""
        names = self.params.search.named_targets()
        if target not in names:
            raise ConfigError(f"target {target!r}: the search targets are {', '.join(names)}")
        other = copy.copy(self)
        other.paths = self.paths.at(target)
        return other

    @property
    def distill_seed(self) -> int:
        return self.params.seed + 1_000_003 * self.replicate

    @cached_property
    def device(self) -> torch.device:
        from dna.ddp import resolve_device

        return resolve_device(self.params.device)

    @cached_property
    def data(self) -> Data:
        from dna.data import load_data

        return load_data(self.params.data, self.splits(), pin_memory=self.device.type == "cuda")

    def data_for(self, train: TrainConfig) -> Data:
        """The data a classifier trains on: the run's, with timm's RandAugment on its training images when `train`
        asks for it (train.rand_augment)."""
        from dna.data import load_data

        if train.rand_augment is None:
            return self.data
        return load_data(self.params.data, self.splits(), rand_augment=train.rand_augment,
                         pin_memory=self.device.type == "cuda")

    def splits(self) -> Path:
        return needed(self.paths.splits, "data")

    @cached_property
    def space(self) -> SearchSpace:
        from dna.spaces import build_space

        d = self.params.data
        return build_space(self.params.space, d.channels, d.image_size, self.num_classes)

    @cached_property
    def num_classes(self) -> int:
        from dna.data import class_count

        return class_count(self.params.data, self.paths.splits)

    @cached_property
    def supervision(self) -> BlockSupervision:
        """What the blocks learn and how candidates are rated (params supervision.kind); needs the teacher stage's
        output for the teacher kind."""
        from dna.supervision import build_supervision

        return build_supervision(self)

    # what a progressive supervision reads of the blocks before the one it trains
    def rating(self, block: int) -> pd.DataFrame:
        """The block's rating (the rate stage's table), made now when it is not yet."""
        import pandas as pd

        from dna.stages.rate import stage_rate

        if not self.paths.rating(block).is_file():
            stage_rate(self, block)
        return pd.read_csv(self.paths.rating(block), dtype={"path": str})

    def trained_supernet(self, block: int, shapes: list[tuple[int, int, int]]) -> torch.nn.Module:
        """The block's supernet as the distill stage of these settings left it (dna.stages.distill)."""
        from dna.stages.distill import trained_supernet

        return trained_supernet(self, block, shapes)

    # fingerprints: what determines each stage's result, so a checkpoint of another configuration is not resumed
    def teacher_fingerprint(self) -> str:
        t = self.params.teacher
        files = [file_digest(f) for f in (t.checkpoint, t.arch) if f] if t.source in ("checkpoint", "arch") else []
        return digest(self.params.seed, self.params.data, t, *files)

    def block_fingerprint(self, block: int) -> str:
        p = self.params
        seen = {"context": {"fingerprint": True}}
        space = p.space.model_dump(exclude={"blocks"}, **seen) | {"block": p.space.blocks[block].model_dump(**seen)}
        return digest(self.distill_seed, p.data, file_digest(self.paths.splits), p.supervision,
                      self.supervision.fingerprint(), space, p.distill, block)


# validation -------------------------------------------------------------------------------------------------------
def validate(params: Params, check_profile: bool = True, data: bool = True, models: bool = True) -> None:
    """Checks of the data, and checks that need the teacher's shapes or the space's costs; raises ConfigError before
    any work.

    check_profile=False skips the latency profile (for `dna profile`, which makes it); data=False skips the data
    checks and models=False the teacher's and the space's (for a stage that reads none of their keys: those import
    timm).
    """
    d = params.data
    if data:
        from dna.data import check_source, has_images

        if d.source == "imagefolder" and not has_images(d.root):
            raise ConfigError(f"data.root={d.root!r} contains no images ({', '.join(('.jpg', '.png', '...'))})")
        check_source(d)
    if not models:
        return
    from dna.search import min_cost

    run = Run(params)
    run.device  # noqa: B018 - a device that is not there (cuda without a GPU) stops here, before any work
    if params.uses_teacher():
        check_teacher(params, run)
    elif params.retrain.kd_alpha > 0:
        raise ConfigError(f"retrain.kd_alpha={params.retrain.kd_alpha:g} distils from the teacher, but "
                          f"supervision.kind={params.supervision.kind!r} has none; set retrain.kd_alpha: 0")
    local = latency_model(run) if check_profile else None
    for name, target in params.search.named_targets().items():
        latency = target_latency(run, target, local) if check_profile else None
        stages = [s.costs() for s in stage_tables(run.space, scored=False, latency=latency)] if target.budgets() \
            else []
        for axis, budget in target.budgets().items():
            if axis == "latency_ms" and latency is None:
                continue
            smallest = min_cost(stages, axis)
            if budget < smallest:
                shown = f"{smallest:.0f}" if float(smallest).is_integer() else f"{smallest:.6g}"
                raise ConfigError(f"{params.search.target_key(name)}.{axis}={budget:g} is below the smallest network "
                                  f"in the space ({axis}={shown})")


def check_teacher(params: Params, run: Run) -> None:
    """The teacher's features at its boundaries have the resolutions of the space's blocks, and a teacher of source
    arch takes its checkpoint; raises ConfigError naming the key otherwise."""
    from dna.targets import arch_teacher_shapes, teacher_shapes

    d, t = params.data, params.teacher
    try:
        if t.source == "arch":
            shapes = arch_teacher_shapes(t.arch, d.channels, d.image_size, t.boundaries)
        else:
            shapes = teacher_shapes(t.model, d.channels, d.image_size, t.boundaries, t.output_stride)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if t.source == "arch" and t.checkpoint:  # a scaled teacher has none: it is trained here
        check_arch_teacher(params, run.num_classes)
    sizes = run.space.block_resolutions()
    for i, (shape, boundary) in enumerate(zip(shapes, t.boundaries)):
        if shape[1] != sizes[i + 1]:
            raise ConfigError(
                f"teacher.boundaries[{i}]={boundary}: the teacher's features there are {shape[1]}x{shape[2]} but "
                f"block {i} of the space outputs {sizes[i + 1]}x{sizes[i + 1]} "
                f"(check space.blocks[{i}].stride, data.image_size)")


def check_arch_teacher(params: Params, num_classes: int) -> None:
    """teacher.checkpoint loads strictly into the network of teacher.arch (built on the meta device: no weights are
    made); raises ConfigError naming the key otherwise."""
    import torch

    from dna.arch import Arch
    from dna.teacher import teacher_weights

    with torch.device("meta"):
        model = Arch.load(params.teacher.arch).build(num_classes, params.data.channels)
    teacher_weights(params.teacher, model)


# latency ----------------------------------------------------------------------------------------------------------
def latency_model(run: Run):
    """The machine's latency profile of this space (a dna.latency.LatencyTable), or None when there is none.

    Raises ConfigError, naming the key, when search.budgets or search.front_axis asks for latency_ms and the profile
    is missing or was measured for another space, input or profile settings.
    """
    from dna.latency import LatencyTable, fingerprint

    keys, path = run.params.search.latency_keys(), run.paths.latency
    meta = run.paths.profile_dir / "profile.json"
    if not path.is_file() or not meta.is_file():
        if keys:
            raise ConfigError(f"{keys[0]} asks for latency_ms, but this run has no latency profile ({path} is "
                              f"missing): run `dna profile` first, on the machine the network will run on")
        return None
    if json.loads(meta.read_text()).get("fingerprint") != digest(fingerprint(run.space, run.params.profile)):
        if keys:
            raise ConfigError(f"{keys[0]} asks for latency_ms, but the latency profile {path} was measured for "
                              f"another space, input size or profile settings: run `dna profile` again")
        log.warning("latency profile %s is stale (another space or settings): not used", path)
        return None
    return LatencyTable.load(path)


def target_latency(run: Run, target: TargetConfig, local):
    """A target's latency model: the profile its device wrote (target.latency_profile), or this machine's (`local`,
    from latency_model)."""
    if target.latency_profile is None:
        return local
    from dna.latency import device_profile

    return device_profile(Path(target.latency_profile), run.space)




def stage_tables(space: SearchSpace, ratings: list[Candidates] | None = None, scored: bool = True,
                 latency=None) -> list[Candidates]:
    """Stem, block and head tables for the search; with a latency profile (LatencyTable), their latency."""
    blocks = ratings if ratings is not None else [space.candidate_table(b) for b in range(space.num_blocks)]
    stages = [space.stem_table(), *blocks, space.head_table()]
    return latency.annotate(space, stages) if latency is not None else stages
