"""Which keys of a config its fingerprint holds: every key, except that a key added to a section after the section's
results were first fingerprinted is left out while it is at its default, so that a config that does not set it
fingerprints (and resumes its checkpoints) as before the key existed. FIRST_KEYS is frozen: a key added from now on
needs no entry, it is left out at its default because it is not there."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, SerializationInfo, model_serializer

# the keys each section had when its results were first fingerprinted; never edited
FIRST_KEYS: dict[str, frozenset[str]] = {name: frozenset(keys) for name, keys in {
    "BlockConfig": ("cells", "depths", "down_positions", "stride", "widths"),
    "CoreParams": ("data", "device", "distill", "export", "outputs", "profile", "rank", "rating", "retrain", "search",
                   "seed", "space", "supervision", "teacher"),
    "DataConfig": ("augment", "cache_mb", "channels", "download", "image_size", "name", "num_workers", "rate_fraction",
                   "root", "source", "test_fraction"),
    "DistillConfig": ("batch_size", "cache_features", "epochs", "lr", "lr_decay", "weight_decay"),
    "ExportConfig": ("atol", "opset"),
    "ProfileConfig": ("batch_size", "percentile", "rounds", "runs", "threads", "warmup"),
    "RankConfig": ("cost_axis", "cost_bands", "networks", "pool", "random_networks", "seeds", "spos", "top_k", "train"),
    "RatingConfig": ("batch_size", "calibration_size"),
    "RetrainConfig": ("init", "kd_alpha", "kd_temperature", "train"),
    "RoundsConfig": ("count",),
    "SearchConfig": ("budgets", "front_axis"),
    "MBConvOptions": ("first_stage", "head", "join", "ops", "stem"),  # were SpaceConfig's, before kinds had options
    "SpaceConfig": ("blocks", "kind"),
    "SposConfig": ("epochs", "label_smoothing", "lr", "optimizer", "weight_decay"),
    "SslOptions": ("crop_scale", "ensemble", "momentum", "momentum_schedule", "predictor", "rating_target",
                   "rating_views"),
    "TeacherConfig": ("boundaries", "checkpoint", "model", "source", "train"),
    "TrainConfig": ("batch_size", "drop_rate", "epochs", "label_smoothing", "lr", "lr_decay", "optimizer", "schedule",
                    "warmup_epochs", "weight_decay"),
}.items()}


class Fingerprinted(BaseModel):
    """A config section (its first keys: those of the nearest class in its MRO that FIRST_KEYS names) whose dump in a
    fingerprint (`model_dump(context={"fingerprint": True})`, as
    dna.checkpoint.digest makes it) leaves out its keys added since FIRST_KEYS at their defaults, and the keys that
    change no result (`unfingerprinted_keys`: how, not what). A section whose other keys are its kind's options
    dumps them as the kind's options model does (`_kind_options`), defaults included."""

    unfingerprinted_keys: ClassVar[tuple[str, ...]] = ()

    def _kind_options(self, info: SerializationInfo) -> dict | None:
        return None

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict:
        out = handler(self)
        options = self._kind_options(info)
        if options is not None:
            out = {k: v for k, v in out.items() if k not in (self.model_extra or {})} | options
        if not (info.context or {}).get("fingerprint"):
            return out
        first = next((FIRST_KEYS[c.__name__] for c in type(self).__mro__ if c.__name__ in FIRST_KEYS), frozenset())
        fields = type(self).model_fields
        for key in list(out):
            added_at_default = key not in first and key in fields and \
                getattr(self, key) == fields[key].get_default(call_default_factory=True)
            if added_at_default or key in self.unfingerprinted_keys:
                out.pop(key)
        return out
