"""The checks of a config made before any work: the data, and what needs the teacher's shapes or the space's costs.

They decide whether a stage runs, never what it writes, so they are no stage's DVC code dependency
(flows/code_deps.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.errors import ConfigError

if TYPE_CHECKING:
    from dna.config import Params
    from dna.spaces.context import SpaceContext


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
    from dna.cost_tables import latency_model, stage_tables, target_latency
    from dna.search import min_cost
    from dna.spaces.context import SpaceContext

    run = SpaceContext(params)
    run.device  # noqa: B018 - a device that is not there (cuda without a GPU) stops here, before any work
    if params.teacher.source != "none":
        check_teacher(params, run)
    elif params.retrain.kd_alpha > 0:
        raise ConfigError(f"retrain.kd_alpha={params.retrain.kd_alpha:g} distils from the teacher, but "
                          f"teacher.source is none (supervision.kind={params.supervision.kind!r}); set "
                          "retrain.kd_alpha: 0")
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


def check_teacher(params: Params, run: SpaceContext) -> None:
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
