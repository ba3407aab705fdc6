"""The one typed schema for params.yaml; loading validates everything before any work starts."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
DEFAULT_OPS = [f"ir_k{k}_e{e}_se0.25" for e in (3, 6) for k in (3, 5, 7)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key, the value and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LOADING_KEYS = ("num_workers", "cache_mb")  # how the data are loaded, not which: no result depends on them


class DataConfig(Strict):
    source: Literal["digits", "torchvision", "imagefolder"] = "digits"
    name: str | None = None  # torchvision dataset class, e.g. CIFAR10
    root: str | None = None
    download: bool = False
    num_classes: PositiveInt | None = None  # used when the data is absent (inspecting a preset); checked against it
    image_size: PositiveInt = 32
    channels: Literal[1, 3] = 1
    rate_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    augment: bool = False
    num_workers: Annotated[int, Field(ge=0)] = 0  # loader processes; 0 loads in the training process
    cache_mb: Annotated[int, Field(ge=0)] = 1024  # memory for decoded images: a dataset that fits is decoded once

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

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict:
        """Unset num_classes is left out, so configs without it dump (and fingerprint) as they did before the key.
        A fingerprint (context {"fingerprint": True}) leaves out how the data are loaded, which changes no result."""
        out = handler(self)
        if self.num_classes is None:
            out.pop("num_classes", None)
        if (info.context or {}).get("fingerprint"):
            for key in LOADING_KEYS:
                out.pop(key, None)
        return out


class Precision(Strict):
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast (fp16 with a gradient scaler)

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        """fp32 is left out, so configs dump (and fingerprint) as they did before the key."""
        out = handler(self)
        if self.precision == "fp32":
            out.pop("precision", None)
        return out


class TrainConfig(Precision):
    epochs: Annotated[int, Field(ge=0)] = 30
    optimizer: Literal["sgd", "momentum", "adam", "adamw", "rmsprop"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    schedule: Literal["cosine", "exponential", "constant"] = "cosine"
    lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9  # per epoch, for schedule=exponential
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    drop_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    batch_size: PositiveInt = 64


class TeacherConfig(Strict):
    source: Literal["train", "timm", "checkpoint"] = "train"
    model: str = "efficientnet_b0"
    checkpoint: str | None = None
    boundaries: list[Annotated[int, Field(ge=1)]] = [2, 3, 4, 6]
    train: TrainConfig = TrainConfig()

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"teacher.model={name!r} is not a timm model (similar: {', '.join(close) or 'none'})")
        return name

    @model_validator(mode="after")
    def _checkpoint(self, info: ValidationInfo) -> TeacherConfig:
        check_paths = (info.context or {}).get("check_paths", True)
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("teacher.checkpoint is required when teacher.source='checkpoint'")
        if self.source == "checkpoint" and check_paths and not Path(self.checkpoint).is_file():
            raise ValueError(f"teacher.checkpoint={self.checkpoint!r} must be an existing file when "
                             "teacher.source='checkpoint'")
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"teacher.boundaries={self.boundaries} must be strictly increasing")
        return self


Width = Annotated[int, Field(ge=8, le=4096, multiple_of=8)]
Depth = Annotated[int, Field(ge=1, le=8)]


class BlockConfig(Strict):
    """A searched block: its stride and its cells, as depths x widths or as an explicit list of [depth, width]."""

    stride: Literal[1, 2] = 2
    depths: list[Depth] = []
    widths: list[Width] = []
    cells: list[tuple[Depth, Width]] = []

    @model_validator(mode="after")
    def _choices(self) -> BlockConfig:
        if self.cells and (self.depths or self.widths):
            raise ValueError("give a block either cells or depths and widths, not both")
        if not self.cells and not (self.depths and self.widths):
            raise ValueError("a block needs depths and widths (or cells): its search space is empty")
        choices = self.cell_choices()
        if len(set(choices)) != len(choices):
            raise ValueError(f"a block's cells must be distinct, got {choices}")
        return self

    def cell_choices(self) -> list[tuple[int, int]]:
        if self.cells:
            return [tuple(c) for c in self.cells]
        return [(d, w) for w in self.widths for d in self.depths]


class SpaceConfig(Strict):
    """The search space: `kind` picks one registered in dna.spaces, which reads the other keys its own way and
    checks them (the MBConv space: stem and head widths, a fixed first stage, the ops of a layer, the blocks)."""

    kind: str = "mbconv"
    stem: Annotated[int, Field(ge=8, multiple_of=8)] = 32
    first_stage: list[str] = ["ds_r1_k3_s1_c16_se0.25"]
    head: Annotated[int, Field(ge=8)] = 256
    ops: list[str] = DEFAULT_OPS
    blocks: list[BlockConfig]

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind: str) -> str:
        from dna.spaces import space_class

        space_class(kind)
        return kind

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("space.ops must list at least one op")
        if len(set(ops)) != len(ops):
            raise ValueError(f"space.ops lists an op twice: {ops}")
        return ops

    @field_validator("first_stage")
    @classmethod
    def _first_stage(cls, strings: list[str]) -> list[str]:
        from timm.models._efficientnet_builder import _decode_block_str

        if not strings:
            raise ValueError("space.first_stage must list at least one timm block string, e.g. ds_r1_k3_s1_c16_se0.25")
        for s in strings:
            try:
                _decode_block_str(s)
            except Exception:
                raise ValueError(f"space.first_stage: {s!r} is not a full timm block string "
                                 "(type, r, k, s, c, e.g. ds_r1_k3_s1_c16_se0.25)") from None
        return strings

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, blocks: list[BlockConfig]) -> list[BlockConfig]:
        if not blocks:
            raise ValueError("space.blocks must list at least one block (the search space is empty)")
        return blocks

    @model_validator(mode="after")
    def _buildable(self) -> SpaceConfig:
        from dna.spaces import space_class

        space_class(self.kind).check_config(self)
        return self


class DistillConfig(Precision):
    epochs: PositiveInt = 8
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 3e-3
    lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-4
    batch_size: PositiveInt = 64
    cache_features: bool = True


class SupervisionConfig(BaseModel):
    """What each block learns to reproduce and how its candidates are rated (dna.supervision). Keys other than
    `kind` are the kind's own options, checked against its `Options` model."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "teacher"

    @model_validator(mode="after")
    def _known_kind(self) -> SupervisionConfig:
        from dna.supervision import options_model

        model, given = options_model(self.kind), dict(self.model_extra or {})
        if model is None and given:
            raise ValueError(f"supervision: kind {self.kind!r} takes no options, got {', '.join(sorted(given))}")
        if model is not None:
            try:
                model.model_validate(given)
            except ValidationError as exc:
                raise ValueError("; ".join(f"supervision.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors())) from None
        return self

    def options(self) -> BaseModel | None:
        """The kind's options, validated (None when the kind has none)."""
        from dna.supervision import options_model

        model = options_model(self.kind)
        return None if model is None else model.model_validate(dict(self.model_extra or {}))


class RatingConfig(Strict):
    calibration_size: PositiveInt = 256
    batch_size: PositiveInt = 256


CostAxis = Literal["params", "macs", "latency_ms"]  # latency_ms needs a profile of the machine (dna profile)


class SearchConfig(Strict):
    budgets: dict[CostAxis, Annotated[float, Field(gt=0)]] = {}
    front_axis: CostAxis = "macs"

    def latency_keys(self) -> list[str]:
        """The keys that ask for latency (and so need a latency profile)."""
        keys = [f"search.budgets.{a}" for a in self.budgets if a == "latency_ms"]
        return keys + (["search.front_axis"] if self.front_axis == "latency_ms" else [])


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
    kd_temperature: Annotated[float, Field(gt=0.0)] = 4.0
    train: TrainConfig = TrainConfig()


class ExportConfig(Strict):
    opset: Annotated[int, Field(ge=13, le=23)] = 18
    atol: Annotated[float, Field(gt=0.0, le=1e-2)] = 1e-4


class CoreParams(Strict):
    """The sections of the method; other layers add theirs (extension_sections)."""

    seed: int = 0
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

    @model_validator(mode="after")
    def _boundaries_match_blocks(self) -> CoreParams:
        if len(self.teacher.boundaries) != len(self.space.blocks):
            raise ValueError(
                f"teacher.boundaries has {len(self.teacher.boundaries)} entries but space.blocks has "
                f"{len(self.space.blocks)}: one teacher boundary per searched block is required")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.outputs)


def extension_sections() -> dict[str, type[BaseModel]]:
    """Sections of params.yaml that installed packages own (entry points of the group `dna.sections`), such as the
    tracking and orchestration settings of the flows; each a pydantic model whose defaults are all set."""
    from importlib.metadata import entry_points

    return {e.name: e.load() for e in sorted(entry_points(group="dna.sections"), key=lambda e: e.name)}


def _params_model() -> type[CoreParams]:
    sections = extension_sections()
    if not sections:
        return CoreParams
    fields = {name: (model, model()) for name, model in sections.items()}
    return create_model("Params", __base__=CoreParams, __module__=__name__, **fields)


Params = _params_model()


def _allowed_keys(loc: tuple) -> list[str]:
    model: type = Params
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


def parse_params(raw: dict, check_paths: bool = True) -> Params:
    """Validate a raw mapping; check_paths=False skips checks of data and checkpoint paths (to inspect a preset)."""
    try:
        return Params.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def parse_overrides(items: list[str] | None) -> dict:
    """Command-line `-S key=value` items as an overrides mapping (values parsed as YAML: 0.004, [2, 3], null)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None, check_paths: bool = True) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for dotted, value in (overrides or {}).items():
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
    return parse_params(raw, check_paths)
