"""The stages of a run, each a function of the params that reads the files of earlier stages and writes its own.

The CLI and the Prefect flows call these; nothing here knows about either. Each stage imports what it needs when it
runs (a stage is often a process of its own: the data stage, for one, needs neither timm nor ONNX), and runs holding
its lock on the outputs folder (`locked`, dna/locks.py), whoever calls it.
"""
from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dna.checkpoint import atomic_write_text, checkpoint_digest, digest, file_digest, save_checkpoint
from dna.config import ConfigError, Params, TrainConfig
from dna.ddp import is_main, main_first
from dna.errors import needed
from dna.locks import locked
from dna.paths import Paths, ReplicatePaths

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from dna.arch import Arch
    from dna.data import Data
    from dna.spaces.base import Candidates, SearchSpace
    from dna.supervision import BlockSupervision

log = logging.getLogger(__name__)
EpochHook = Callable[[dict], None] | None
EVAL_BATCH_SIZE = 256  # images per batch when evaluating a whole split (the test split may not fit in memory)


def write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


class Run:
    """One configured run: its params, where its files go, and the objects its stages share.

    `replicate` > 0: the same run with its blocks distilled (and rated) again from another seed, into
    rank/replicates/<replicate>/ (dna.paths.ReplicatePaths); everything else is the run's own."""

    def __init__(self, params: Params, replicate: int = 0):
        self.params = params
        self.replicate = replicate
        self.paths = Paths(params.out_dir) if not replicate else ReplicatePaths(
            params.out_dir, Paths(params.out_dir).rank_dir / "replicates" / str(replicate))

    @property
    def distill_seed(self) -> int:
        return self.params.seed + 1_000_003 * self.replicate

    @cached_property
    def device(self) -> torch.device:
        from dna.train import resolve_device

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

    # fingerprints: what determines each stage's result, so a checkpoint of another configuration is not resumed
    def teacher_fingerprint(self) -> str:
        t = self.params.teacher
        files = [file_digest(f) for f in (t.checkpoint, t.arch) if f] if t.source in ("checkpoint", "arch") else []
        return digest(self.params.seed, self.params.data, t, *files)

    def block_fingerprint(self, block: int) -> str:
        p = self.params
        space = p.space.model_dump(exclude={"blocks"}) | {"block": p.space.blocks[block].model_dump()}
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
    latency = latency_model(run) if check_profile else None
    if params.search.budgets:
        stages = [s.costs() for s in stage_tables(run.space, scored=False, latency=latency)]
        for axis, budget in params.search.budgets.items():
            if axis == "latency_ms" and latency is None:
                continue
            smallest = min_cost(stages, axis)
            if budget < smallest:
                shown = f"{smallest:.0f}" if float(smallest).is_integer() else f"{smallest:.6g}"
                raise ConfigError(f"search.budgets.{axis}={budget:g} is below the smallest network in the space "
                                  f"({axis}={shown})")


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


@locked("profile")
def stage_profile(run: Run) -> dict:
    """Time every candidate layer, the stem and the head in ONNX Runtime on this machine; write the latency table."""
    import time

    from dna.latency import fingerprint, host, profile_space, write_profile

    start = time.perf_counter()
    table = profile_space(run.space, run.params.profile)
    seconds = time.perf_counter() - start
    meta = {"fingerprint": digest(fingerprint(run.space, run.params.profile)), "host": host(),
            "settings": run.params.profile.model_dump(), "rows": len(table), "seconds": round(seconds, 1)}
    write_profile(table, meta, run.paths.profile_dir)
    summary = {"rows": len(table), "seconds": round(seconds, 1), "path": str(run.paths.latency),
               "overhead_ms": float(table.loc[table["kind"] == "overhead", "latency_ms"].iloc[0]),
               "layer_ms_median": float(table.loc[table["kind"] == "layer", "latency_ms"].median())}
    log.info("profile: %d pieces timed in %.1f s -> %s", len(table), seconds, run.paths.latency)
    return summary


# stages -----------------------------------------------------------------------------------------------------------
@locked("data")
def stage_data(run: Run) -> dict:
    from dna.data import write_splits

    summary = write_splits(run.params.data, run.params.seed, run.paths.splits)
    log.info("data: %s", summary["sizes"])
    return summary


HISTORY_COLUMNS = ["epoch", "loss", "train_accuracy", "rate_accuracy", "lr"]  # of a classifier's training


@locked("teacher")
def stage_teacher(run: Run, on_epoch: EpochHook = None) -> dict:
    import pandas as pd

    from dna.teacher import make_teacher, teacher_name

    out = run.paths.teacher_dir
    out.mkdir(parents=True, exist_ok=True)
    if not run.params.uses_teacher():  # DNA++: no teacher is built, trained or downloaded
        kind = run.params.supervision.kind
        metrics = {"test_accuracy": None, "epochs": 0, "model": None, "supervision": kind}
        if is_main():  # teacher.pt records that there is none (what the distill stage depends on in DVC)
            save_checkpoint(out / "teacher.pt", {"teacher": None, "supervision": kind})
            write_csv(out / "history.csv", pd.DataFrame(columns=HISTORY_COLUMNS))
            write_json(out / "metrics.json", metrics)
        return metrics
    _, result = make_teacher(run.params, run.data_for(run.params.teacher.train), out, run.device,
                             run.teacher_fingerprint(), on_epoch=on_epoch)
    metrics = {"test_accuracy": result.test_accuracy, "epochs": len(result.history),
               "model": teacher_name(run.params.teacher)}
    if is_main():
        history = pd.DataFrame(result.history, columns=None if result.history else HISTORY_COLUMNS)
        write_csv(out / "history.csv", history)  # a teacher taken as it is: the header alone
        write_json(out / "metrics.json", metrics)
    return metrics


@locked("features", wait=True)
def stage_features(run: Run) -> None:
    """Prepare the block targets once for all blocks (teacher: cache its boundary features); run before distilling.
    Of several processes, rank 0 prepares them while the others wait."""
    with main_first() as preparing:
        if preparing:
            run.supervision.prepare()


@locked("distill", per_block=True)
def stage_distill(run: Run, block: int, on_epoch: EpochHook = None) -> dict:
    """Distill one block; blocks are independent and may run in parallel once stage_features has run."""
    import pandas as pd

    from dna.distill import distill_block

    result = distill_block(run.space, run.supervision, block, run.params.distill, run.paths.supernet(block),
                           in_chans=run.data.in_chans, seed=run.distill_seed, fingerprint=run.block_fingerprint(block),
                           device=run.device, on_epoch=on_epoch)
    history = pd.DataFrame(result.history)
    if is_main():
        write_csv(run.paths.distill_history(block), history)
    return _distilled(block, history, result.resumed_from)


def distill_resumes_after(run: Run, block: int) -> int:
    """The epoch stage_distill resumes the block after (0: it starts afresh)."""
    from dna.engine import completed_epochs

    return completed_epochs(run.paths.supernet(block), run.block_fingerprint(block))


def distilled(run: Run, block: int, resumed_from: int) -> dict:
    """stage_distill's result read from the history it wrote, for a caller that ran it in other processes
    (resumed_from: distill_resumes_after, asked before they ran)."""
    import pandas as pd

    return _distilled(block, pd.read_csv(run.paths.distill_history(block)), resumed_from)


def _distilled(block: int, history: pd.DataFrame, resumed_from: int) -> dict:
    return {"block": block, "final_loss": float(history["loss"].iloc[-1]), "epochs": len(history),
            "resumed_from": resumed_from}


def trained_supernet(run: Run, block: int, shapes: list[tuple[int, int, int]]) -> torch.nn.Module:
    """The block's supernet as the distill stage of these settings left it, in eval mode.

    Raises ConfigError naming the block when its checkpoint was trained with other settings or stopped before
    distill.epochs (rating it would silently rate a stale or half-trained supernet), FileNotFoundError when there is
    none."""
    from dna.checkpoint import load_checkpoint
    from dna.distill import build_block

    path, epochs = run.paths.supernet(block), run.params.distill.epochs
    again = f"run `dna distill --block {block}`"
    if not path.is_file():
        raise FileNotFoundError(f"block {block}: the supernet {path} is missing: {again}")
    state = load_checkpoint(path)
    expected = run.block_fingerprint(block)
    if state.get("fingerprint") != expected:
        raise ConfigError(f"block {block}: the supernet {path} was trained with other settings (fingerprint "
                          f"{state.get('fingerprint')}; these settings give {expected}): {again}")
    if int(state["epoch"]) < epochs:
        raise ConfigError(f"block {block}: the supernet {path} finished {state['epoch']} of {epochs} epochs: {again}")
    supernet = build_block(run.space, block, shapes, run.data.in_chans)
    supernet.load_state_dict(state["model"])
    return supernet.eval()


@locked("rate", per_block=True)
def stage_rate(run: Run, block: int) -> pd.DataFrame:
    from dna.rate import rate_block

    targets = run.supervision.for_rating()
    supernet = trained_supernet(run, block, targets.shapes()).to(run.device)
    table = rate_block(run.space, supernet, targets, block, calibration_size=run.params.rating.calibration_size,
                       batch_size=run.params.rating.batch_size, seed=run.params.seed)
    frame = table.to_frame()
    write_csv(run.paths.rating(block), frame)
    return frame


def rating_summary(tables: list[pd.DataFrame]) -> dict:
    return {f"block_{i}": {"candidates": int(len(t.drop_duplicates(["cell", "path"]))), "best": float(t["score"].min()),
                           "median": float(t["score"].median()), "worst": float(t["score"].max())}
            for i, t in enumerate(tables)}


def stage_tables(space: SearchSpace, ratings: list[Candidates] | None = None, scored: bool = True,
                 latency=None) -> list[Candidates]:
    """Stem, block and head tables for the search; with a latency profile (LatencyTable), their latency."""
    blocks = ratings if ratings is not None else [space.candidate_table(b) for b in range(space.num_blocks)]
    stages = [space.stem_table(), *blocks, space.head_table()]
    return latency.annotate(space, stages) if latency is not None else stages


def choice_of(space: SearchSpace, stages: list[Candidates], rows: tuple[int, ...]) -> Arch:
    """The network of one row per stage (stem and head rows included)."""
    return space.arch([stage.choice(row) for stage, row in zip(stages[1:-1], rows[1:-1])])


@locked("search")
def stage_search(run: Run) -> dict:
    import pandas as pd

    from dna import plots
    from dna.search import BudgetError, best_under, front_table, near_best, pareto_front
    from dna.spaces.base import Candidates

    p, out = run.params.search, run.paths.search_dir
    ratings = [pd.read_csv(needed(run.paths.rating(b), "rate"), dtype={"path": str})
               for b in range(run.space.num_blocks)]
    predictor = predictor_of(run) if p.combine == "predictor" else None
    scored = ratings if predictor is None else predicted_scores(ratings, predictor)
    stages = stage_tables(run.space, [Candidates.from_frame(r) for r in scored], latency=latency_model(run))
    costs = [s.costs() for s in stages]
    try:
        best = best_under(costs, dict(p.budgets))
        near = near_best(costs, dict(p.budgets), p.front_axis, p.tie_tolerance)
    except BudgetError as exc:
        raise ConfigError(str(exc)) from None
    if p.tie_tolerance > 0:
        best = near[0]
        log.info("search: %d networks under the budgets are rated within search.tie_tolerance=%g of the best; "
                 "chose the cheapest on %s", len(near), p.tie_tolerance, p.front_axis)
    arch = choice_of(run.space, stages, best.rows)
    front = pareto_front(costs, p.front_axis)
    table = front_table(costs, front)
    table["arch"] = [choice_of(run.space, stages, sel.rows).tag() for sel in front]
    table["chosen"] = [sel.rows == best.rows for sel in front]
    out.mkdir(parents=True, exist_ok=True)
    arch.save(run.paths.arch)
    write_csv(out / "front.csv", table)
    plots.front(table, p.front_axis, best, out / "front.png")
    plots.rating_spread(ratings, out / "rating_spread.png")
    metrics = {"score": best.score, **{k: float(v) for k, v in best.costs.items()}, "front_size": len(front),
               "tie_tolerance": p.tie_tolerance, "within_tolerance": len(near),
               "space_size": str(run.space.size()), "budgets": dict(p.budgets), "ratings": rating_summary(ratings),
               "combine": p.combine}
    if predictor is not None:
        metrics |= {"predicted_accuracy": predictor["intercept"] - best.score,
                    "predictor_kendall_tau_loo": predictor["kendall_tau_loo"], "predictor_digest": predictor["digest"]}
    write_json(out / "metrics.json", metrics)
    log.info("search: chose score %.4f, %s", best.score, {k: float(f"{v:.4g}") for k, v in best.costs.items()})
    return metrics


def predictor_of(run: Run) -> dict:
    """The rank stage's fitted predictor (search.combine: predictor), checked against this run's blocks."""
    from dna.checkpoint import file_digest

    path = run.paths.rank_dir / "predictor.json"
    if not path.is_file():
        raise ConfigError(f"search.combine='predictor': {path} does not exist; the rank stage fits it (`dna rank`, "
                          "or `dvc repro rank/dvc.yaml`) once the search with search.combine: sum has run")
    predictor = json.loads(path.read_text())
    weights = predictor.get("weights") or {}
    expected = [f"rating_block_{b}" for b in range(run.space.num_blocks)]
    if not predictor.get("fitted") or sorted(weights) != sorted(expected):
        raise ConfigError(f"search.combine='predictor': {path} holds no predictor fitted on this run's "
                          f"{run.space.num_blocks} blocks (too few networks trained: rank.networks)")
    return predictor | {"digest": file_digest(path)}


def predicted_scores(ratings: list, predictor: dict) -> list:
    """Each block's scores as its term of the predictor, negated so that lower is better as for ratings: the sum over
    blocks is then the intercept minus the predicted accuracy, and the exact search over sums maximises it."""
    return [r.assign(score=-predictor["weights"][f"rating_block_{b}"] * r["score"]) for b, r in enumerate(ratings)]


def build_student(run: Run, arch: Arch) -> torch.nn.Module:
    import torch

    torch.manual_seed(run.params.seed)
    train = run.params.retrain.train
    return run.space.build(arch, drop_rate=train.drop_rate, drop_path_rate=train.drop_path_rate)


def init_from_supernet(run: Run, model: torch.nn.Module, arch: Arch):
    """Extract the chosen subnet's weights from the block supernets (dna.spaces.base.Extraction says what was and was
    not copied), then re-estimate every BatchNorm of the network on a class-stratified calibration batch of training
    images: the supernets' statistics are those of a mixture of paths fed the teacher's features."""
    from dna.checkpoint import load_checkpoint
    from dna.data import eval_view
    from dna.rate import calibrate

    supernets = [load_checkpoint(run.paths.supernet(b))["model"] for b in range(run.space.num_blocks)]
    extraction = run.space.extract(arch, supernets, model)
    data = eval_view(run.data)
    images = data.images("train", positions=data.stratified("train", run.params.rating.calibration_size,
                                                             run.params.seed))
    calibrate(model, images)
    for layer, reason in extraction.not_copied.items():
        log.info("retrain: %s not initialised from the supernet: %s", layer, reason)
    return extraction


@locked("retrain")
def stage_retrain(run: Run, on_epoch: EpochHook = None) -> dict:
    import pandas as pd

    from dna import plots
    from dna.arch import Arch, count_cost
    from dna.teacher import load_teacher
    from dna.train import train_classifier

    p, out = run.params.retrain, run.paths.retrain_dir
    out.mkdir(parents=True, exist_ok=True)
    arch = Arch.load(needed(run.paths.arch, "search"))
    model = build_student(run, arch)
    extraction = init_from_supernet(run, model, arch) if p.init == "supernet" else None
    teacher = load_teacher(run.params, run.paths.teacher, run.device) if p.kd_alpha > 0 else None
    start = [checkpoint_digest(run.paths.supernet(b)) for b in range(run.space.num_blocks)] if extraction else []
    result = train_classifier(model, run.data_for(p.train), p.train, out / "train_state.pt", seed=run.params.seed,
                              fingerprint=digest(run.params.seed, run.params.data, p, arch.to_dict(), start),
                              device=run.device, name="retrain", teacher=teacher, kd_alpha=p.kd_alpha,
                              kd_temperature=p.kd_temperature, on_epoch=on_epoch)
    params, macs, _ = count_cost(model.cpu(), (1, run.data.in_chans, run.data.image_size, run.data.image_size))
    metrics = {"test_accuracy": result.test_accuracy, "params": params, "macs": macs, "epochs": len(result.history),
               "init": p.init, **(extraction.summary() if extraction else {})}
    if is_main():
        save_checkpoint(run.paths.model, {"model": model.state_dict(), "arch": arch.to_yaml()})
        write_csv(out / "history.csv", pd.DataFrame(result.history))
        plots.curves(pd.DataFrame(result.history), out / "curves.png")
        write_json(out / "metrics.json", metrics)
    return metrics


@locked("export")
def stage_export(run: Run) -> dict:
    """Export the retrained student to ONNX (with the class names of the data and the digest of retrain/model.pt),
    check parity, and measure its test accuracy in ONNX Runtime batch by batch.

    The previous export's files go first, so an export that fails or is interrupted leaves none that a later stage
    could take for this one's."""
    from dna.arch import Arch
    from dna.checkpoint import load_checkpoint
    from dna.export import CHECKPOINT_DIGEST, export_onnx, onnx_accuracy

    for previous in (run.paths.export_dir / "metrics.json", run.paths.onnx):
        previous.unlink(missing_ok=True)
    # the digest before the weights: a model.pt replaced in between leaves the old digest, which registration refuses
    source = checkpoint_digest(run.paths.model)
    state = load_checkpoint(run.paths.model)
    arch = Arch.from_yaml(state["arch"])
    model = run.space.build(arch)
    model.load_state_dict(state["model"])
    retrain = json.loads(needed(run.paths.retrain_dir / "metrics.json", "retrain").read_text())
    images = run.data.images("test", 64)
    metadata = {"arch": arch.tag(), "arch_yaml": arch.to_yaml(), "test_accuracy": f"{retrain['test_accuracy']:.6f}",
                "params": str(retrain["params"]), "macs": str(retrain["macs"]),
                "input": json.dumps({"channels": run.data.in_chans, "size": run.data.image_size}),
                CHECKPOINT_DIGEST: source}
    report = export_onnx(model, images, run.paths.onnx, metadata, atol=run.params.export.atol,
                         opset=run.params.export.opset, class_names=run.data.class_names)
    onnx_acc = onnx_accuracy(run.paths.onnx, run.data.loader("test", EVAL_BATCH_SIZE))
    metrics = {"max_abs_diff": report.max_abs_diff, "parity_images": report.num_images, "opset": report.opset,
               "onnx_test_accuracy": onnx_acc, "atol": run.params.export.atol, CHECKPOINT_DIGEST: source}
    write_json(run.paths.export_dir / "metrics.json", metrics)
    return metrics
