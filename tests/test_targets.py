import json

import numpy as np
import pytest
import torch

from dna.data import eval_view
from dna.targets import TeacherTargets, teacher_shapes


def test_boundary_shapes_match_the_meta_device_probe(prepared_run):
    p = prepared_run.params
    targets = prepared_run.supervision
    assert targets.shapes() == teacher_shapes(p.teacher.model, 1, p.data.image_size, p.teacher.boundaries)


def test_cached_pairs_equal_pairs_computed_on_the_fly(prepared_run):
    cached = prepared_run.supervision.for_rating()
    assert cached.cache_dir is not None and (cached.cache_dir / "cache.json").is_file()
    live = TeacherTargets(cached.teacher, cached.boundaries, eval_view(prepared_run.data), torch.device("cpu"))
    for block in range(prepared_run.space.num_blocks):
        for split in ("train", "rate"):
            (xa, ya), (xb, yb) = next(cached.pairs(block, split, 32)), next(live.pairs(block, split, 32))
            assert torch.equal(ya, ya.half().float()), "features are cached in float16"
            # float16 keeps 11 significant bits: a relative error of at most 2**-11, plus float32 noise
            assert torch.allclose(xa, xb, rtol=2**-10, atol=1e-5) and torch.allclose(ya, yb, rtol=2**-10, atol=1e-5)
            assert not torch.equal(ya, yb), "the live features are float32"
    x, _ = next(cached.pairs(0, "train", 8))
    assert torch.equal(x, prepared_run.data.images("train", 8)), "block 0 takes the image itself, in float32"


def test_ratings_from_the_float16_cache_match_those_from_live_features(prepared_run):
    from scipy.stats import spearmanr

    from dna.distill import load_block
    from dna.rate import rate_block

    run = prepared_run
    cached = run.supervision.for_rating()
    live = TeacherTargets(cached.teacher, cached.boundaries, eval_view(run.data), torch.device("cpu"))
    tables = []
    for targets in (cached, live):
        supernet = load_block(run.space, 1, targets.shapes(), run.data.in_chans, run.paths.supernet(1))
        tables.append(rate_block(run.space, supernet, targets, 1, calibration_size=64, batch_size=128).to_frame())
    a, b = tables[0]["score"].to_numpy(), tables[1]["score"].to_numpy()
    assert len(a) == len(b) > 4 and abs(a / b - 1).max() < 1e-3
    assert spearmanr(a, b).statistic > 0.99


def test_the_teacher_stops_at_the_last_boundary_a_block_needs(prepared_run):
    targets = prepared_run.supervision
    ran = []
    hooks = [blk.register_forward_hook(lambda *_, i=i: ran.append(i))
             for i, blk in enumerate(targets.teacher.blocks, start=1)]
    try:
        x = prepared_run.data.images("rate", 4)
        inputs, target = targets.levels(x, 0)
        assert max(ran) == targets.boundaries[0]
        ran.clear()
        full = targets.teacher.forward_intermediates(x, indices=targets.boundaries, intermediates_only=True,
                                                     extra_blocks=True)
        assert max(ran) == len(targets.teacher.blocks), "without stopping early every stage runs"
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(inputs, x) and torch.equal(target, full[0])
    assert torch.equal(targets.levels(x, 1)[1], full[1])


def test_shuffled_pairs_follow_the_generator(prepared_run):
    t = prepared_run.supervision
    a = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(3)))[1]
    b = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(3)))[1]
    c = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(4)))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_batch_holds_every_class_of_a_class_sorted_image_folder(tmp_path):
    """An ImageFolder's indices are sorted by class: the first images of its training split are one class. The
    calibration batch that rating (and supernet initialisation) use is a seeded sample holding every class."""
    import timm

    from dna.config import DataConfig
    from dna.data import load_data, write_splits
    from tests.test_data import _write_pngs

    levels = [20, 70, 120, 170, 220]  # grey level of each class's images
    for c, level in enumerate(levels):
        _write_pngs(tmp_path / "images" / f"class_{c}", 12, level, seed=c)
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "images"), image_size=16, channels=1,
                     rate_fraction=0.2, test_fraction=0.2)
    write_splits(cfg, 0, tmp_path / "splits.json")
    data = load_data(cfg, tmp_path / "splits.json")
    teacher = timm.create_model("tinynet_e", num_classes=5, in_chans=1).eval()
    targets = TeacherTargets(teacher, [2], eval_view(data), torch.device("cpu"))

    def classes(images):
        grey = (images.mean(dim=(1, 2, 3)) * 0.5 + 0.5) * 255  # undo Normalize(0.5, 0.5)
        return {int(torch.tensor(levels, dtype=torch.float32).sub(g).abs().argmin()) for g in grey}

    assert classes(data.images("train", 8)) == {0, 1}, "the first images of the split hold two classes"
    x, y = targets.sample(0, "train", 8, seed=0)
    assert x.shape == (8, 1, 16, 16) and y.shape[0] == 8
    assert classes(x) == set(range(5))
    again, _ = targets.sample(0, "train", 8, seed=0)
    other, _ = targets.sample(0, "train", 8, seed=1)
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_a_new_seed_rebuilds_the_feature_cache(prepared_run, tmp_path):
    """Same teacher, another seed: other splits, so the cached features (of the old training images, some of them
    now test images) must not be reused."""
    import json
    import shutil

    import numpy as np

    from dna.pipeline import Run, stage_data, stage_features

    for name in ("data", "teacher", "distill/features"):
        shutil.copytree(prepared_run.paths.root / name, tmp_path / "outputs" / name)
    moved = Run(prepared_run.params.model_copy(update={"outputs": str(tmp_path / "outputs")}))
    before = json.loads((moved.paths.features / "cache.json").read_text())["fingerprint"]
    stage_features(moved)  # same seed, same splits: kept
    assert json.loads((moved.paths.features / "cache.json").read_text())["fingerprint"] == before

    reseeded = Run(moved.params.model_copy(update={"seed": 1}))
    stage_data(reseeded)
    stage_features(reseeded)
    assert json.loads((reseeded.paths.features / "cache.json").read_text())["fingerprint"] != before
    cached = np.load(reseeded.paths.features / "train_0.npy")
    assert np.array_equal(cached, eval_view(reseeded.data).images("train").numpy())


def _targets(prepared_run, cache_dir, key, scale=1.0):
    """The prepared run's teacher targets cached under cache_dir; a scale != 1 gives a teacher of other weights."""
    import copy

    t = prepared_run.supervision
    teacher = copy.deepcopy(t.teacher)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(scale)
    return TeacherTargets(teacher, t.boundaries, t.data, torch.device("cpu"), cache_dir, key)


def _contents(directory):
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def test_a_killed_rebuild_of_the_feature_cache_leaves_it_as_it_was(prepared_run, tmp_path, monkeypatch):
    import dna.targets

    cache = tmp_path / "distill" / "features"
    first = _targets(prepared_run, cache, ("first",))
    first.prepare()
    before = _contents(cache)
    real, calls = dna.targets.stored, []

    def killed(*args):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(dna.targets, "stored", killed)
    with pytest.raises(KeyboardInterrupt):
        _targets(prepared_run, cache, ("second",), scale=1.5).prepare()
    assert len(calls) == 4, "the rebuild started, then was killed"
    assert _contents(cache) == before
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == ["features"], "no half-built folder is left"
    _, y = next(first.pairs(1, "rate", 16))
    assert torch.equal(y, torch.from_numpy(np.load(cache / "rate_2.npy")[:16]).float())


def test_the_feature_cache_is_read_only_when_its_marker_names_these_targets(prepared_run, tmp_path, caplog):
    cache = tmp_path / "features"
    cached = _targets(prepared_run, cache, ("mine",))
    cached.prepare()
    live = TeacherTargets(cached.teacher, cached.boundaries, cached.data, torch.device("cpu"))
    for level in (1, 2):  # as a killed or concurrent rebuild of other settings leaves them
        np.save(cache / f"rate_{level}.npy", np.zeros_like(np.load(cache / f"rate_{level}.npy")))
    marker = json.loads((cache / "cache.json").read_text())
    for damage in ("other", "missing"):
        if damage == "other":
            (cache / "cache.json").write_text(json.dumps(marker | {"fingerprint": "0123456789abcdef"}))
        else:
            (cache / "cache.json").unlink()
        reader = _targets(prepared_run, cache, ("mine",))
        (xa, ya), (xb, yb) = next(reader.pairs(1, "rate", 32)), next(live.pairs(1, "rate", 32))
        assert torch.equal(xa, xb) and torch.equal(ya, yb), "computed, not read from the cache"
        sample, expected = reader.sample(1, "rate", 8, 0), live.sample(1, "rate", 8, 0)
        assert torch.equal(sample[1], expected[1])
    assert "not read" in caplog.text and str(cache) in caplog.text


def test_a_rebuild_of_the_feature_cache_writes_through_no_link(prepared_run, tmp_path):
    """DVC may link an output's files to its cache: a rebuild replaces the links, never writes into their targets."""
    cache, store = tmp_path / "features", tmp_path / "dvc-cache"
    _targets(prepared_run, cache, ("old",)).prepare()
    cache.rename(store)
    cache.mkdir()
    for f in store.iterdir():
        (cache / f.name).symlink_to(f)
    stored = _contents(store)
    rebuilt = _targets(prepared_run, cache, ("new",), scale=1.5)
    rebuilt.prepare()
    assert _contents(store) == stored
    assert not any(f.is_symlink() for f in cache.iterdir())
    assert json.loads((cache / "cache.json").read_text())["fingerprint"] == rebuilt.fingerprint()
    assert _contents(cache)["train_1.npy"] != stored["train_1.npy"], "the rebuild wrote other features"
