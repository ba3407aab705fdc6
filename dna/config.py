"""The one typed schema for params.yaml; loading validates everything before any work starts."""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from dna.errors import ConfigError
from dna.fingerprint_keys import Fingerprinted
from dna.paths import DEFAULT_TARGET

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


def deep_checks(info: ValidationInfo) -> bool:
    """Whether to run the checks that import the model libraries (timm, the spaces, the supervisions): a stage that
    reads none of the keys they check validates without them (context {"deep": False})."""
    return (info.context or {}).get("deep", True)


class Strict(Fingerprinted):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # a budget of inf is no budget


MAX_IMAGE_SIZE = 1024  # the largest ImageNet-style inputs are 600-800 px (EfficientNet-B7, -L2)
LOADING_KEYS = ("num_workers", "cache_mb")  # how the data are loaded, not which: no result depends on them


class DataConfig(Strict):
    unfingerprinted_keys = (*LOADING_KEYS, "verify")
    source: Literal["digits", "torchvision", "imagefolder"] = "digits"
    name: str | None = None  # torchvision dataset class, e.g. CIFAR10
    root: str | None = None
    download: bool = False
    num_classes: PositiveInt | None = None  # used when the data is absent (inspecting a preset); checked against it
    # at most MAX_IMAGE_SIZE: the checks before any work build the space's layers on images of this size
    image_size: Annotated[int, Field(gt=0, le=MAX_IMAGE_SIZE)] = 32
    channels: Literal[1, 3] = 1
    rate_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    augment: bool = False
    num_workers: Annotated[int, Field(ge=0)] = 0  # loader processes; 0 loads in the training process
    cache_mb: Annotated[int, Field(ge=0)] = 1024  # memory for decoded images: a dataset that fits is decoded once
    verify: bool = True  # the data stage decodes every image file once and names those that do not decode

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, raw):
        if isinstance(raw, dict) and "batch_size" in raw:
            raise ValueError("data.batch_size is no longer a key (it was never read): remove it; batch sizes are "
                             "set per stage: teacher.train.batch_size, distill.batch_size, rating.batch_size, "
                             "retrain.train.batch_size")
        return raw

    @model_validator(mode="after")
    def _source_fields(self, info: ValidationInfo) -> DataConfig:
        check_paths = (info.context or {}).get("check_paths", True)
        if self.source == "torchvision":
            import torchvision.datasets as tvd

            known = sorted(n for n in tvd.__all__ if n[0].isupper())
            if self.name not in known:
                raise ValueError(f"data.name={self.name!r} is not a torchvision dataset; allowed: {', '.join(known)}")
        if self.source in ("torchvision", "imagefolder"):
            if not self.root:
                raise ValueError(f"data.root is required when data.source={self.source!r}")
            if check_paths and not (self.download and self.source == "torchvision") and not Path(self.root).is_dir():
                raise ValueError(f"data.root={self.root!r} does not exist (a directory is required)")
        if self.rate_fraction + self.test_fraction >= 0.9:
            raise ValueError("data.rate_fraction + data.test_fraction must leave at least 10% for training")
        return self


class Precision(Strict):
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast (fp16 with a gradient scaler)


LrBatch = Annotated[int, Field(gt=0)] | None  # `lr` is per this many images, scaled linearly to the global batch
RAND_AUGMENT = re.compile(r"rand(-(m|n|mmax|inc)\d+|-(mstd|p)\d+(\.\d*)?|-t\w+)*")


Optimizer = Literal["sgd", "momentum", "adam", "adamw", "rmsprop"]  # rmsprop: timm's rmsproptf


class Recipe(Precision):
    """How weights train: the optimizer, the lr (per lr_batch images), weight decay and the lr schedule. The one recipe
    of every training loop, each section with its own defaults: the teacher and retraining (TrainConfig), the block
    supernets (DistillConfig: Adam, x lr_decay per epoch, as the paper) and the one-shot baseline (SposConfig);
    dna/recipe.py builds the optimizer and the schedule from it."""

    epochs: Annotated[int, Field(ge=0)] = 30
    optimizer: Optimizer = "adamw"
    optimizer_eps: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # None: timm's default for the optimizer
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 3e-3
    lr_batch: LrBatch = None  # None: `lr` as given, whatever the batch
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # cosine, exponential, constant: per epoch, warmup (e+1)/(w+1); step: timm's step scheduler
    schedule: Literal["cosine", "exponential", "constant", "step"] = "cosine"
    lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # per epoch (exponential), per decay_epochs (step)
    decay_epochs: Annotated[float, Field(gt=0.0)] = 1.0  # step: epochs between decays, fractions allowed
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    warmup_lr: Annotated[float, Field(ge=0.0, le=10.0)] = 1e-6  # step: the lr warmup starts from
    lr_updates: Literal["epoch", "step"] = "epoch"  # step: the lr is updated after every optimizer step

    @field_validator("lr_updates")
    @classmethod
    def _lr_updates(cls, updates: str, info: ValidationInfo) -> str:
        if updates == "step" and info.data.get("schedule") != "step":
            raise ValueError(f"updates per optimizer step need schedule 'step' (timm's scheduler); schedule "
                             f"{info.data.get('schedule')!r} updates once per epoch (allowed: epoch)")
        return updates


class TrainConfig(Recipe):
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    drop_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # stochastic depth, deepest layer's rate
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # weight EMA (timm's ModelEmaV3), evaluated
    ema_warmup: bool = False  # timm's EMA warmup: the decay grows towards ema_decay over the first steps
    rand_augment: str | None = None  # timm's RandAugment of the training images, e.g. rand-m9-mstd0.5
    batch_size: PositiveInt = 64

    @field_validator("rand_augment")
    @classmethod
    def _rand_augment(cls, config: str | None) -> str | None:
        if config is None:
            return config
        from timm.data.auto_augment import rand_augment_transform

        try:
            if not RAND_AUGMENT.fullmatch(config):
                raise ValueError
            rand_augment_transform(config, {})
        except (AssertionError, ValueError, KeyError):
            raise ValueError("not a timm RandAugment string: 'rand' then sections -m<magnitude> -n<ops per image> "
                             "-mstd<magnitude std> -mmax<max> -inc<0|1> -p<prob> -t<op set>, e.g. rand-m9-mstd0.5"
                             ) from None
        return config

    @field_validator("ema_warmup")
    @classmethod
    def _ema_warmup(cls, warmup: bool, info: ValidationInfo) -> bool:
        if warmup and info.data.get("ema_decay") is None:
            raise ValueError("EMA warmup needs ema_decay set (the EMA is off)")
        return warmup


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def arch_stages(path: str | Path) -> list:
    """The stages an architecture file lists, read as YAML only (no model library); raises ValueError with a
    one-line reason when the file is not a mapping with an `arch` list of stages."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(_one_line(exc)) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("arch"), list):
        raise ValueError("expected a mapping with stem, head and arch (a list of stages of timm block strings)")
    return raw["arch"]


def _stage_stride(stage: object) -> int:
    """The stride of a stage's first layer, read from its `s` token (1 where the stage is not a list of strings)."""
    first = stage[0] if isinstance(stage, list) and stage and isinstance(stage[0], str) else ""
    strides = [int(t[1:]) for t in first.split("_")[1:] if len(t) > 1 and t[0] == "s" and t[1:].isdigit()]
    return strides[0] if strides else 1


def arch_block_ends(path: str | Path, block_strides: list[int]) -> list[int]:
    """teacher.boundaries of a teacher of source arch: the forward_intermediates index (i: after the network's
    stage i, 0: the stem) where each block of the space ends. A block ends after its stage, or after the next where
    its stride sits in a later layer (dna.spaces.base.block_stages); a file whose stages do not make the space's
    blocks has one boundary per stage after the first."""
    from dna.spaces.base import block_stages

    stages = arch_stages(path)
    groups, left = block_stages([_stage_stride(s) for s in stages], block_strides)
    if len(groups) == len(block_strides) and left == len(stages):
        return [group[-1] + 1 for group in groups]
    return list(range(2, len(stages) + 1))


Multiplier = Annotated[float, Field(ge=1.0, le=8.0)]


class TeacherConfig(Strict):
    # train: `model` trained here; timm: `model` with timm's pretrained weights; checkpoint: `model` with the weights
    # of `checkpoint`; arch: the network of the architecture file `arch` (as the search stage writes arch.yaml),
    # built as the retrain stage builds it, with the weights of `checkpoint` (as the retrain stage writes model.pt);
    # none: no teacher, for a supervision that learns without one (DNA++): the teacher stage builds nothing
    source: Literal["train", "timm", "checkpoint", "arch", "none"] = "train"
    model: str = "efficientnet_b0"  # a timm model name; not read when source is arch
    checkpoint: str | None = None
    arch: str | None = None
    # forward_intermediates indices (0 = stem, i = after stage i), one per searched block. Source arch, when not
    # given: the end of every stage after the first, 2..(its stages), which for a network found by a search are
    # the ends of its searched blocks (the first stage is the space's fixed one)
    boundaries: list[Annotated[int, Field(ge=1)]] = [2, 3, 4, 6]
    # timm's output_stride: 8 or 16 dilate the stages past that stride instead of striding them, so the late
    # boundaries keep larger feature maps at the same input size (the space's blocks there then take stride 1);
    # a timm model's setting: source arch takes the strides its file states (32 here)
    output_stride: Literal[8, 16, 32] = 32
    # source arch: the network of `arch` scaled up as timm scales EfficientNets (Arch.scaled), then trained here
    # from scratch (no checkpoint: the weights of the unscaled network do not fit it); DNA+ scales a round's teacher
    width_multiplier: Multiplier = 1.0
    depth_multiplier: Multiplier = 1.0
    train: TrainConfig = TrainConfig()

    @property
    def scaled(self) -> bool:
        return (self.width_multiplier, self.depth_multiplier) != (1.0, 1.0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str, info: ValidationInfo) -> str:
        if not deep_checks(info) or info.data.get("source") == "arch":
            return name
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"teacher.model={name!r} is not a timm model (similar: {', '.join(close) or 'none'})")
        return name

    @model_validator(mode="after")
    def _checkpoint(self, info: ValidationInfo) -> TeacherConfig:
        check_paths = (info.context or {}).get("check_paths", True)
        if self.scaled:
            self._check_scaled()
        elif self.source in ("checkpoint", "arch") and not self.checkpoint:
            raise ValueError(f"teacher.checkpoint is required when teacher.source={self.source!r}")
        if self.checkpoint and self.source in ("checkpoint", "arch") and check_paths and \
                not Path(self.checkpoint).is_file():
            raise ValueError(f"teacher.checkpoint={self.checkpoint!r} must be an existing file when "
                             f"teacher.source={self.source!r}")
        if self.source == "arch":
            self._check_arch(check_paths, deep_checks(info))
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"teacher.boundaries={self.boundaries} must be strictly increasing")
        return self

    def _check_scaled(self) -> None:
        scale = f"teacher.width_multiplier={self.width_multiplier}, depth_multiplier={self.depth_multiplier}"
        if self.source != "arch":
            raise ValueError(f"{scale} scale a network of teacher.source 'arch', not of source {self.source!r}")
        if self.checkpoint:
            raise ValueError(f"{scale} with teacher.checkpoint={self.checkpoint!r}: the weights of the unscaled "
                             "network do not fit the scaled one; leave checkpoint out (it is trained here)")
        if self.train.epochs < 1:
            raise ValueError(f"{scale}: the scaled network is trained here from scratch; teacher.train.epochs must be "
                             f"at least 1, not {self.train.epochs}")

    def _check_arch(self, check_paths: bool, deep: bool) -> None:
        if not self.arch:
            raise ValueError("teacher.arch is required when teacher.source='arch' (an architecture file, as the "
                             "search stage writes search/arch.yaml)")
        if self.output_stride != 32:
            raise ValueError(f"teacher.output_stride={self.output_stride} dilates a timm model's stages; a teacher of "
                             "source 'arch' has the strides its file states: leave output_stride out (32)")
        if not Path(self.arch).is_file():
            if check_paths:
                raise ValueError(f"teacher.arch={self.arch!r} must be an existing file when teacher.source='arch'")
            return
        try:
            arch_stages(self.arch)
            if deep:
                from dna.arch import Arch

                Arch.load(self.arch)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"teacher.arch={self.arch!r} is not an architecture file: {_one_line(exc)}") from None


Width = Annotated[int, Field(ge=8, le=4096, multiple_of=8)]
Depth = Annotated[int, Field(ge=1, le=8)]


class BlockConfig(Strict):
    """A searched block: its stride, its cells as depths x widths or as an explicit list of [depth, width], and the
    layers that may carry its stride (`down_positions`, 0: the first; each position is searched in every cell deep
    enough to have it)."""

    stride: Literal[1, 2] = 2
    depths: list[Depth] = []
    widths: list[Width] = []
    cells: list[tuple[Depth, Width]] = []
    down_positions: list[Annotated[int, Field(ge=0, le=7)]] = [0]

    @model_validator(mode="after")
    def _choices(self) -> BlockConfig:
        if self.cells and (self.depths or self.widths):
            raise ValueError("give a block either cells or depths and widths, not both")
        if not self.cells and not (self.depths and self.widths):
            raise ValueError("a block needs depths and widths (or cells): its search space is empty")
        choices = self.cell_choices()
        if len(set(choices)) != len(choices):
            raise ValueError(f"a block's cells must be distinct, got {choices}")
        positions = self.down_positions
        if not positions or len(set(positions)) != len(positions):
            raise ValueError(f"down_positions must list distinct layer positions (0: the first), got {positions}")
        if self.stride == 1 and positions != [0]:
            raise ValueError(f"down_positions {positions} on a block of stride 1: only a strided block has a layer "
                             "that carries its stride")
        deepest = max(d for d, _ in choices)
        if max(positions) >= deepest:
            raise ValueError(f"down_positions: position {max(positions)} is past the last layer of the deepest cell "
                             f"(depth {deepest}); positions count from 0")
        return self

    def cell_choices(self) -> list[tuple[int, int]]:
        if self.cells:
            return [tuple(c) for c in self.cells]
        return [(d, w) for w in self.widths for d in self.depths]


def kind_options(section: str, model: type[BaseModel], given: dict, own: tuple[str, ...] = ("kind",),
                 context: dict | None = None) -> BaseModel:
    """A section's keys beside its `own` (kind, ...), validated by the kind's options model; ValueError naming each
    wrong key."""
    try:
        return model.model_validate(given, context=context)
    except ValidationError as exc:
        def describe(e: dict) -> str:
            key = ".".join([section, *map(str, e["loc"])])
            if e["type"] == "extra_forbidden":
                return f"{key}: unknown key; allowed keys here: {', '.join([*own, *sorted(model.model_fields)])}"
            msg = e["msg"].removeprefix("Value error, ")
            return msg if msg.startswith(section) else f"{key}={e.get('input')!r}: {msg}"

        raise ValueError("; ".join(describe(e) for e in exc.errors())) from None


SPACE_KEYS = ("kind", "blocks")  # the space section's keys of every kind


class SpaceConfig(Fingerprinted):
    """The search space: `kind` picks one registered in dna.spaces, `blocks` are its searched blocks, and every
    other key is the kind's own option, checked against its space class's `Options` model (the MBConv kinds: stem and
    head widths, a fixed first stage, the ops of a layer, the join before a transformer layer)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    kind: str = "mbconv"
    blocks: list[BlockConfig]

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, blocks: list[BlockConfig]) -> list[BlockConfig]:
        if not blocks:
            raise ValueError("space.blocks must list at least one block (the search space is empty)")
        return blocks

    @property
    def options(self) -> BaseModel:
        """The kind's options, validated (this imports the kind's space)."""
        from dna.spaces import space_class

        try:
            return kind_options("space", space_class(self.kind).Options, dict(self.model_extra or {}), SPACE_KEYS)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _kind_options(self, info) -> dict:
        return self.options.model_dump(mode=info.mode, context=info.context)

    @model_validator(mode="before")
    @classmethod
    def _kind_keys(cls, data, info: ValidationInfo):
        """The kind's keys checked, and held with their defaults (a space equals itself dumped and loaded again)."""
        if not deep_checks(info) or not isinstance(data, dict):
            return data
        from dna.spaces import space_class

        kind = data.get("kind", cls.model_fields["kind"].default)
        given = {k: v for k, v in data.items() if k not in cls.model_fields}
        options = kind_options("space", space_class(kind).Options, given, SPACE_KEYS, info.context)
        return {k: v for k, v in data.items() if k in cls.model_fields} | options.model_dump()

    @model_validator(mode="after")
    def _buildable(self, info: ValidationInfo) -> SpaceConfig:
        if not deep_checks(info):
            return self
        from dna.spaces import space_class

        space_class(self.kind).check_config(self)
        return self


class DistillConfig(Recipe):
    epochs: PositiveInt = 8
    optimizer: Optimizer = "adam"
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    schedule: Literal["cosine", "exponential", "constant", "step"] = "exponential"  # x lr_decay per epoch
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    batch_size: PositiveInt = 64
    cache_features: bool = True
    # the path a cell trains at a step: uniform (each op of each layer at random), fair (FairNAS: every op of a
    # layer once in each run of as many steps as there are ops)
    sampling: Literal["uniform", "fair"] = "uniform"


class SupervisionConfig(BaseModel):
    """What each block learns to reproduce and how its candidates are rated (dna.supervision). Keys other than
    `kind` are the kind's own options, checked against its `Options` model."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "teacher"

    @model_validator(mode="after")
    def _known_kind(self, info: ValidationInfo) -> SupervisionConfig:
        if not deep_checks(info):
            return self
        from dna.supervision import options_model

        model, given = options_model(self.kind), dict(self.model_extra or {})
        if model is None and given:
            raise ValueError(f"supervision: kind {self.kind!r} takes no options, got {', '.join(sorted(given))}")
        if model is not None:
            kind_options("supervision", model, given)
        return self


class RatingConfig(Strict):
    calibration_size: PositiveInt = 256
    batch_size: PositiveInt = 256


CostAxis = Literal["params", "macs", "latency_ms"]  # latency_ms needs a profile of the machine (dna profile)


Budget = Annotated[float, Field(gt=0)]
TARGET_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")  # a folder, a DVC stage key (no "-": DVC -S), a model name part


class TargetConfig(Strict):
    """One deployment target: its budgets, and where its latency is measured (a profile a device wrote from
    `dna profile --device-kit`; none: this machine's profile, outputs/profile)."""

    params: Budget | None = None
    macs: Budget | None = None
    latency_ms: Budget | None = None
    latency_profile: str | None = None  # a device's latency.csv, inside the project

    def budgets(self) -> dict[str, float]:
        return {axis: getattr(self, axis) for axis in ("params", "macs", "latency_ms") if getattr(self, axis)}

    @field_validator("latency_profile")
    @classmethod
    def _inside_project(cls, value: str | None) -> str | None:
        if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError(f"{value!r} must be a path inside the project, relative to it")
        return value


class SearchConfig(Strict):
    budgets: dict[CostAxis, Budget] = {}
    # named deployment targets, each its own budgets (and device): one network per target from the one rating,
    # each retrained, exported and registered on its own; search.budgets is the one target "default"
    targets: dict[str, TargetConfig] = {}
    front_axis: CostAxis = "macs"
    # > 0: of the networks under the budgets rated within this much of the best (the rating's own noise: the rank
    # stage's rating_seed_noise), the cheapest on front_axis is chosen
    tie_tolerance: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    # how block ratings make a network's: sum (DNA, equal weights) or predictor (DONNA: the linear model the rank
    # stage fitted from block ratings to trained accuracy, rank/predictor.json; the search maximises its prediction)
    combine: Literal["sum", "predictor"] = "sum"

    @field_validator("targets")
    @classmethod
    def _target_names(cls, value: dict) -> dict:
        for name in value:
            if not TARGET_NAME.fullmatch(name):
                raise ValueError(f"target name {name!r}: lower-case letters, digits and '_' (at most 40), starting "
                                 "with a letter")
        return value

    @model_validator(mode="after")
    def _budgets_or_targets(self):
        if self.budgets and self.targets:
            raise ValueError("set search.budgets (one target) or search.targets (named targets), not both")
        return self

    def named_targets(self) -> dict[str, TargetConfig]:
        """Every target by name, in order (the first is the primary: DNA+ rounds and the rank stage use its network);
        search.budgets alone is the one target "default"."""
        return dict(self.targets) or {DEFAULT_TARGET: TargetConfig(**self.budgets)}

    def target_key(self, name: str) -> str:
        """The params key of a target's budgets, for messages."""
        return f"search.targets.{name}" if self.targets else "search.budgets"

    def latency_keys(self, local: bool = True) -> list[str]:
        """The keys that ask for latency (and so need a latency profile): with local, those measured on this
        machine (outputs/profile); without, those measured on a device (a target's latency_profile)."""
        keys = [f"{self.target_key(n)}.latency_ms" for n, t in self.named_targets().items()
                if t.latency_ms and (t.latency_profile is None) == local]
        return keys + (["search.front_axis"] if local and self.front_axis == "latency_ms" else [])


class ProfileConfig(Strict):
    """Latency profile: every candidate layer, the stem and the head timed alone in ONNX Runtime (dna profile)."""

    batch_size: PositiveInt = 1
    threads: PositiveInt = 1      # ONNX Runtime intra-op threads, as the deployed model will run
    runs: PositiveInt = 500       # timed runs per piece, taken in `rounds` rounds over all pieces in turn
    rounds: PositiveInt = 50
    warmup: Annotated[int, Field(ge=0)] = 30
    percentile: Annotated[float, Field(ge=0, le=100)] = 10  # of the runs' times: low resists other processes' load


class RetrainConfig(Strict):
    init: Literal["scratch", "supernet"] = "scratch"
    kd_alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # weight of the teacher-logit loss; 0 turns it off
    kd_temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 4.0  # the loss is scaled by its square
    train: TrainConfig = TrainConfig()


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    atol: Annotated[float, Field(gt=0.0, le=1e-2)] = 1e-4
    # torch's ONNX exporter (dna.export.EXPORTERS): "torchscript" takes a tenth of the time of "dynamo" (torch's
    # default, torch.export-based) for these networks, and writes opsets up to 20
    exporter: Literal["torchscript", "dynamo"] = "torchscript"

    @model_validator(mode="after")
    def _opset_written(self) -> ExportConfig:
        if self.exporter == "torchscript" and self.opset > 20:  # dna.export.TORCHSCRIPT_MAX_OPSET (imports torch)
            raise ValueError(f"export.opset={self.opset}: the torchscript exporter writes opsets up to 20; set "
                             f"export.exporter: dynamo for a later one")
        return self


class SposConfig(Recipe):
    """The single-path one-shot baseline: one supernet of whole networks, one uniformly sampled path per step.

    epochs: None gives it the training compute of the block supernets: distill.epochs x (cells of all blocks) /
    (blocks) epochs at distill.batch_size, so it trains as many (block path, batch) pairs as distillation does."""

    epochs: Annotated[int, Field(gt=0)] | None = None
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1


class RankConfig(Strict):
    """The ranking-quality stage (`dna rank`): K networks sampled over rating and cost, plus the searched one and
    random networks under the search budgets, each trained from scratch with one short recipe."""

    networks: Annotated[int, Field(ge=3)] = 12  # K, stratified over cost bands and, within a band, over rating
    cost_axis: CostAxis = "macs"  # the cost that bands are made on
    cost_bands: PositiveInt = 3
    top_k: PositiveInt = 3  # precision of the top-k by rating among the top-k by accuracy
    pool: Annotated[int, Field(ge=100)] = 4096  # random networks drawn from the space to stratify from
    random_networks: Annotated[int, Field(ge=0)] = 10  # random search at equal budget (search.budgets)
    seeds: Annotated[int, Field(ge=1, le=5)] = 1  # trainings per network; accuracy is their mean
    # distillations of every block (the run's own, then again from other seeds): 2 measures the rating's own noise
    rating_seeds: Annotated[int, Field(ge=1, le=5)] = 2
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = 2000  # resamples of the networks for every interval
    train: TrainConfig = TrainConfig(epochs=4, lr=0.005, warmup_epochs=0, drop_rate=0.0)
    spos: SposConfig = SposConfig()

    @model_validator(mode="after")
    def _sizes(self) -> RankConfig:
        if self.cost_bands * 2 > self.networks:
            raise ValueError(f"rank.cost_bands={self.cost_bands}: each band needs at least 2 of the rank.networks="
                             f"{self.networks} networks (at most {self.networks // 2} bands)")
        if self.top_k >= self.networks:
            raise ValueError(f"rank.top_k={self.top_k} must be below rank.networks={self.networks}")
        return self


class RoundsConfig(Strict):
    """DNA+ (progressive teachers): `count` rounds of the whole search. Every round after the first takes the network
    the round before it found and retrained (its search/arch.yaml and retrain/model.pt) as its teacher, of source
    arch, and writes under <outputs>/rounds/round_<r> (dna/rounds.py). With a width or depth multiplier above 1, that
    network is scaled up by them and trained from scratch as the teacher (teacher.train) instead of taken as it is."""

    count: Annotated[int, Field(ge=1, le=10)] = 1
    width_multiplier: Multiplier = 1.0
    depth_multiplier: Multiplier = 1.0


class CoreParams(Strict):
    """The sections of the method; an application adds its own (use_sections)."""


    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # numpy's and scikit-learn's seeds are 32-bit
    outputs: str = "outputs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    space: SpaceConfig
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)  # built when used: it imports torch
    distill: DistillConfig = DistillConfig()
    rating: RatingConfig = RatingConfig()
    search: SearchConfig = SearchConfig()
    profile: ProfileConfig = ProfileConfig()
    retrain: RetrainConfig = RetrainConfig()
    export: ExportConfig = ExportConfig()
    rank: RankConfig = RankConfig()
    rounds: RoundsConfig = RoundsConfig()

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, outputs: str) -> str:
        path = Path(outputs)
        if not outputs.strip() or path == Path(".") or path == Path(path.anchor):
            raise ValueError(f"outputs={outputs!r} must name a folder of its own for the run's files (e.g. outputs): "
                             "the stages write data/, teacher/, ratings/... under it, and DVC deletes a stage's "
                             "outputs before it runs the stage")
        return outputs

    @model_validator(mode="after")
    def _rand_augment_needs_images(self) -> CoreParams:
        for key, train in (("teacher.train", self.teacher.train), ("retrain.train", self.retrain.train)):
            if train.rand_augment is not None and self.data.source == "digits":
                raise ValueError(f"{key}.rand_augment needs images to transform; data.source='digits' holds tensors "
                                 "(allowed with data.source: torchvision, imagefolder)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _arch_teacher_boundaries(cls, raw, info: ValidationInfo):
        """teacher.boundaries of a teacher of source arch, when not given: where each block of the space ends in its
        file (arch_block_ends; 2..(the stages of the file) when its stages are not the space's blocks); a file that
        is absent (paths not checked) or unreadable (its own check says why) is taken as one of this space."""
        teacher = raw.get("teacher") if isinstance(raw, dict) else None
        if not isinstance(teacher, dict) or teacher.get("source") != "arch" or "boundaries" in teacher:
            return raw
        blocks = (raw.get("space") or {}).get("blocks") if isinstance(raw.get("space"), dict) else None
        strides = [b.get("stride", 2) if isinstance(b, dict) else 2 for b in blocks] if isinstance(blocks, list) else []
        try:
            boundaries = arch_block_ends(teacher["arch"], strides)
        except (KeyError, TypeError, ValueError):
            boundaries = list(range(2, len(blocks) + 2)) if isinstance(blocks, list) else None
        if boundaries is None:
            return raw
        return {**raw, "teacher": {**teacher, "boundaries": boundaries}}

    @model_validator(mode="after")
    def _teacher_as_the_supervision_needs(self, info: ValidationInfo) -> CoreParams:
        """A supervision that reads a teacher has one, and one that does not has none (teacher.source: none), so
        that the teacher stage builds a teacher exactly when one is read, from the teacher section alone."""
        if not deep_checks(info):
            return self
        from dna.supervision import uses_teacher

        kind, source, reads = self.supervision.kind, self.teacher.source, uses_teacher(self)
        if reads and source == "none":
            raise ValueError(f"teacher.source='none', but supervision.kind={kind!r} learns from a teacher; set "
                             "teacher.source to train, timm, checkpoint or arch")
        if not reads and source != "none":
            raise ValueError(f"supervision.kind={kind!r} uses no teacher: set teacher.source: none (with "
                             f"teacher.source={source!r} the teacher stage would build a teacher nothing reads)")
        return self

    @model_validator(mode="after")
    def _boundaries_match_blocks(self) -> CoreParams:
        if len(self.teacher.boundaries) != len(self.space.blocks) and self.teacher.source != "none":
            raise ValueError(
                f"teacher.boundaries has {len(self.teacher.boundaries)} entries but space.blocks has "
                f"{len(self.space.blocks)}: one teacher boundary per searched block is required"
                + (" (source 'arch' defaults to the end of every stage of teacher.arch after its first)"
                   if self.teacher.source == "arch" else ""))
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.outputs)


Params = CoreParams  # what a params file holds, to the method; an application's schema subclasses it (schema())
_sections: dict[str, type[BaseModel]] = {}
_schema: list[type[CoreParams]] = []


def use_sections(sections: dict[str, type[BaseModel]]) -> None:
    """Add the sections an application owns to the schema every params file is validated with (e.g. the pipeline's
    `mlflow` and `orchestration`); each a pydantic model whose defaults are all set. The method reads none of them."""
    clash = sorted(set(sections) & set(CoreParams.model_fields))
    if clash:
        raise ValueError(f"sections {clash} are the method's own")
    if any(_sections.get(name, model) is not model for name, model in sections.items()):
        raise ValueError(f"sections {sorted(sections)}: another model is in use under one of these names")
    _sections.update(sections)
    _schema.clear()


def schema() -> type[CoreParams]:
    """The schema params files are validated with: the method's sections and those the application added."""
    if not _schema:
        fields = {name: (model, model()) for name, model in sorted(_sections.items())}
        _schema.append(create_model("Params", __base__=CoreParams, __module__=__name__, **fields) if fields
                       else CoreParams)
    return _schema[0]


def _allowed_keys(loc: tuple) -> list[str]:
    model: type = schema()
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(model).get(part)
        for arg in (hint, *typing.get_args(hint)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
        else:
            return []
    return sorted(model.model_fields)


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; allowed keys here: {', '.join(_allowed_keys(error['loc']))}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if not key or msg.startswith(key.split(".")[0]) or "=" in msg.split(" ")[0]:
        return msg  # the validator's message already names its key
    return f"{key}={error.get('input')!r}: {msg}"


def parse_params(raw: dict, check_paths: bool = True, deep: bool = True) -> Params:
    """Validate a raw mapping; check_paths=False skips checks of data and checkpoint paths (to inspect a preset);
    deep=False skips the checks that import the model libraries (see deep_checks)."""
    try:
        return schema().model_validate(raw, context={"check_paths": check_paths, "deep": deep})
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


REMOVED = "~"  # an override key that starts with it removes the key (DVC's and Hydra's `-S ~key`)


def parse_overrides(items: list[str] | None) -> dict:
    """Command-line `-S key=value` items as an overrides mapping (values parsed as YAML: 0.004, [2, 3], null); `-S
    ~key` removes the key."""
    out = {}
    for item in items or []:
        if item.startswith(REMOVED) and "=" not in item:
            out[item.strip()] = None
            continue
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


TARGET_KEYS = ("budgets", "targets")  # of search: a preset that sets either chooses its targets as a whole


def merged(base: dict, overlay: dict, prefix: str = "") -> dict:
    """overlay over base: mappings merge key by key, anything else (values, lists) is replaced; but the targets are
    chosen as a whole: an overlay that sets search.budgets or search.targets replaces the base's targets."""
    out = dict(base)
    if prefix == "search." and any(k in overlay for k in TARGET_KEYS):
        out = {k: v for k, v in out.items() if k not in TARGET_KEYS}
    for key, value in overlay.items():
        out[key] = merged(out[key], value, f"{prefix}{key}.") if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out


def read_params(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A params file as a raw mapping. A preset may name its `base` (a params file, relative to the preset's own
    folder, inside the project) and hold only what differs from it: it is merged over its base."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base={base!r}: expected the path of a params file, relative to {path.parent}")
    target = (path.parent / base).resolve()
    if not target.is_relative_to(Path.cwd().resolve()):
        raise ConfigError(f"{path}: base={base!r} is outside the project ({Path.cwd()})")
    if target in seen or target == path.resolve():
        raise ConfigError(f"{path}: base={base!r} leads back to itself")
    if not target.is_file():
        raise ConfigError(f"{path}: base={base!r}: {target} does not exist")
    return merged(read_params(target, (*seen, path.resolve())), raw)


def differences(base: dict, preset: dict, prefix: str = "") -> dict:
    """The dotted keys whose values `preset` sets otherwise than `base` (mappings compared key by key, anything else
    whole): what a run of `base` needs overridden to be a run of `preset` (e.g. `dvc exp run -S key=value`). The
    base's search targets that the preset does not have are removed (`~key`: the preset chose its targets whole)."""
    out = {}
    if prefix == "search." and any(k in preset for k in TARGET_KEYS):
        kept = preset.get("targets") or {}
        out |= {f"{REMOVED}search.targets.{name}": None for name in base.get("targets") or {} if name not in kept}
        if base.get("budgets") and not preset.get("budgets"):
            out[f"{REMOVED}search.budgets"] = None
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out |= differences(base[key], value, f"{prefix}{key}.")
        elif key not in base or base[key] != value:
            out[f"{prefix}{key}"] = value
    return out


def preset_overrides(preset: str | Path, base: str | Path = "params.yaml") -> dict:
    """The overrides that make `base` the preset (resolved over its own base); a preset that leaves out a key the base
    sets keeps the base's value."""
    return differences(read_params(base), read_params(preset))


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None, check_paths: bool = True,
                deep: bool = True) -> Params:
    raw = read_params(path)
    for dotted, value in (overrides or {}).items():
        if dotted.startswith(REMOVED):
            *parents, leaf = dotted[len(REMOVED):].split(".")
            node = raw
            for part in parents:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                break
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {dotted}: {'.'.join(parents[:depth + 1])} is a value, not a section")
        if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
            node[int(leaf)] = value
        elif isinstance(node, dict):
            node[leaf] = value
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parents)} has no key {leaf!r}")
    return parse_params(raw, check_paths, deep)
