"""Data splits and loading: seeded, stratified, disjoint splits of the digits and of an image folder."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dna.config import DataConfig
from dna.data import class_count, has_images, load_data, make_splits, write_splits
from dna.errors import ConfigError

SPLITS = ("train", "rate", "test")


@pytest.fixture(autouse=True)
def _data_sklearn_home(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path_factory.mktemp("sklearn_data")))


@pytest.fixture(scope="module")
def digits_target():
    from sklearn.datasets import load_digits

    return load_digits().target


def _digits_cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "digits", "image_size": 16, "channels": 1, "rate_fraction": 0.1,
                         "test_fraction": 0.2, **kw})


# digits ------------------------------------------------------------------------------------------------------------
def test_digits_splits_disjoint_and_cover(digits_target):
    splits = make_splits(_digits_cfg(), seed=0)
    sets = {k: set(v) for k, v in splits.items()}
    assert sorted(splits) == sorted(SPLITS)
    assert all(len(sets[k]) == len(splits[k]) for k in SPLITS)  # no index twice within a split
    assert not (sets["train"] & sets["rate"] or sets["train"] & sets["test"] or sets["rate"] & sets["test"])
    assert sets["train"] | sets["rate"] | sets["test"] == set(range(len(digits_target)))


@pytest.mark.parametrize("rate, test", [(0.1, 0.2), (0.15, 0.3), (0.05, 0.05)])
def test_digits_split_sizes_follow_fractions(digits_target, rate, test):
    n = len(digits_target)
    splits = make_splits(_digits_cfg(rate_fraction=rate, test_fraction=test), seed=1)
    assert abs(len(splits["rate"]) - rate * n) <= 1
    assert abs(len(splits["test"]) - test * n) <= 1
    assert len(splits["train"]) + len(splits["rate"]) + len(splits["test"]) == n


def test_digits_splits_are_stratified(digits_target):
    n = len(digits_target)
    overall = Counter(digits_target.tolist())
    splits = make_splits(_digits_cfg(), seed=0)
    for name, fraction in (("rate", 0.1), ("test", 0.2), ("train", 0.7)):
        counts = Counter(digits_target[splits[name]].tolist())
        assert set(counts) == set(range(10)), f"{name} lacks a class"
        for label, total in overall.items():
            # each class keeps its share of the split (up to rounding in the two-step split)
            assert abs(counts[label] - fraction * total) <= 2, (name, label, counts[label], fraction * total)
    assert sum(overall.values()) == n


def test_digits_splits_depend_only_on_seed():
    cfg = _digits_cfg()
    first, again, other = make_splits(cfg, 3), make_splits(cfg, 3), make_splits(cfg, 4)
    assert first == again
    assert first["rate"] != other["rate"] and first["test"] != other["test"]
    assert sorted(sum(first.values(), [])) == sorted(sum(other.values(), []))


@pytest.mark.parametrize("size, channels", [(16, 1), (24, 3), (32, 1)])
def test_digits_load_shapes_labels_and_normalisation(tmp_path, digits_target, size, channels):
    cfg = _digits_cfg(image_size=size, channels=channels)
    path = tmp_path / "data" / "splits.json"
    summary = write_splits(cfg, 0, path)
    saved = json.loads(path.read_text())
    assert summary["num_classes"] == saved["num_classes"] == 10
    assert summary["class_names"] == saved["class_names"] == [str(i) for i in range(10)]
    assert summary["sizes"] == {k: len(saved["splits"][k]) for k in SPLITS}
    assert summary["separate_test_set"] is False

    data = load_data(cfg, path)
    assert (data.num_classes, data.in_chans, data.image_size) == (10, channels, size)
    assert data.class_names == [str(i) for i in range(10)]
    assert [len(data.split(k)) for k in SPLITS] == [len(saved["splits"][k]) for k in SPLITS]
    for name in SPLITS:
        x, y = data.split(name)[5]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32
        assert int(y) == digits_target[saved["splits"][name][5]]  # label of the indexed digit
    images = data.images("train")
    assert images.shape == (len(data.train), channels, size, size)
    if channels == 3:
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert abs(images.mean().item()) < 0.1  # normalised: centred
    assert 0.5 < images.std().item() < 1.5  # and of unit order spread
    batch, labels = next(iter(data.loader("rate", batch_size=7)))
    assert batch.shape == (7, channels, size, size) and labels.dtype == torch.long


# image folders -----------------------------------------------------------------------------------------------------
CLASSES = {"ants": 30, "bees": 220}  # grey level of each class's images: dark ants, bright bees


def _write_pngs(folder, count, level, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(level + rng.integers(-20, 21, size=(20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{i}.png")


@pytest.fixture
def image_tree(tmp_path):
    """root/train/<class>/ with 6 PNGs per class and root/val/<class>/ with 2."""
    root = tmp_path / "images"
    for c, (name, level) in enumerate(CLASSES.items()):
        _write_pngs(root / "train" / name, 6, level, seed=c)
        _write_pngs(root / "val" / name, 2, level, seed=10 + c)
    return root


@pytest.fixture
def flat_image_tree(tmp_path):
    """root/<class>/ with 6 PNGs per class and no train/ or val/."""
    root = tmp_path / "flat"
    for c, (name, level) in enumerate(CLASSES.items()):
        _write_pngs(root / name, 6, level, seed=c)
    return root


def _check_labels_follow_folders(dataset, channels):
    assert len(dataset) > 0
    for i in range(len(dataset)):
        x, y = dataset[i]
        assert x.shape == (channels, 16, 16)
        # ants (label 0, sorted first) are dark and normalise below zero; bees (label 1) above
        assert (x.mean().item() < 0) == (y == 0), (i, y, x.mean().item())


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_with_train_and_val(tmp_path, image_tree, channels):
    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=channels, rate_fraction=0.25)
    splits = make_splits(cfg, seed=0)
    assert splits["test"] == [0, 1, 2, 3]  # val/ is the test set, whole
    assert len(splits["rate"]) == 3 and len(splits["train"]) == 9
    assert sorted(splits["train"] + splits["rate"]) == list(range(12))

    summary = write_splits(cfg, 0, tmp_path / "splits.json")
    assert summary["separate_test_set"] is True and summary["num_classes"] == 2
    data = load_data(cfg, tmp_path / "splits.json")
    assert summary["class_names"] == data.class_names == sorted(CLASSES)  # the folder names, by label
    assert (len(data.train), len(data.rate), len(data.test)) == (9, 3, 4)
    labels = {name: [int(data.split(name)[i][1]) for i in range(len(data.split(name)))] for name in SPLITS}
    assert set(labels["rate"]) == {0, 1} and set(labels["train"]) == {0, 1}  # stratified
    assert sorted(labels["test"]) == [0, 0, 1, 1]
    for name in SPLITS:
        _check_labels_follow_folders(data.split(name), channels)


def test_imagefolder_without_subfolders_splits_the_pool(tmp_path, flat_image_tree):
    cfg = DataConfig(source="imagefolder", root=str(flat_image_tree), image_size=16, channels=1,
                     rate_fraction=0.25, test_fraction=0.25)
    splits = make_splits(cfg, seed=0)
    assert [len(splits[k]) for k in SPLITS] == [6, 3, 3]
    assert sorted(splits["train"] + splits["rate"] + splits["test"]) == list(range(12))
    write_splits(cfg, 0, tmp_path / "splits.json")
    data = load_data(cfg, tmp_path / "splits.json")
    for name in SPLITS:
        _check_labels_follow_folders(data.split(name), 1)
        assert {int(data.split(name)[i][1]) for i in range(len(data.split(name)))} == {0, 1}


def test_class_names_come_from_the_split_file_and_older_files_without_them_get_the_labels(tmp_path, image_tree):
    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=1, rate_fraction=0.25)
    path = tmp_path / "splits.json"
    write_splits(cfg, 0, path)
    saved = json.loads(path.read_text())
    assert load_data(cfg, path).class_names == ["ants", "bees"]
    del saved["class_names"]  # a split file written before class names were recorded
    path.write_text(json.dumps(saved))
    assert load_data(cfg, path).class_names == ["0", "1"]


def test_has_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "readme.txt").write_text("text")
    (tmp_path / "a" / "b" / "png").write_text("a file named png is not an image")
    assert not has_images(tmp_path)
    (tmp_path / "a" / "b" / "photo.PNG").write_bytes(b"")
    assert has_images(tmp_path)
    assert not has_images(tmp_path / "missing")


def test_stratified_sample_is_seeded_proportional_and_holds_every_class(digits_target, tmp_path):
    cfg = _digits_cfg()
    write_splits(cfg, 0, tmp_path / "splits.json")
    data = load_data(cfg, tmp_path / "splits.json")
    labels = data.labels["train"]
    assert np.array_equal(labels, [int(data.train[i][1]) for i in range(len(data.train))])
    sample = data.stratified("train", 100, seed=0)
    assert len(sample) == len(set(sample)) == 100 and sample == sorted(sample)
    counts = Counter(labels[sample].tolist())
    assert set(counts) == set(range(10))
    for label, total in Counter(labels.tolist()).items():
        assert abs(counts[label] - 100 * total / len(labels)) <= 2  # in proportion to the class's size
    assert data.stratified("train", 100, seed=0) == sample != data.stratified("train", 100, seed=1)
    assert Counter(labels[data.stratified("train", 10, seed=5)].tolist()) == Counter(range(10)), "one of each"
    assert data.stratified("train", 10**6, seed=0) == list(range(len(labels)))


# torchvision datasets that are not prepared ------------------------------------------------------------------------
@pytest.mark.parametrize("prepared", ["empty root", "only the .gz files"])
def test_an_unprepared_torchvision_dataset_stops_in_one_line_before_anything_is_written(tmp_path, prepared):
    """torchvision's MNIST wants the unpacked files under <root>/MNIST/raw/; without them (and download off) the
    command says so in one line naming data.root and data.name, exit code 2, and writes nothing."""
    import gzip

    import yaml
    from typer.testing import CliRunner

    from dna.cli import app
    from tests.conftest import tiny_raw

    root = tmp_path / "mnist"
    root.mkdir()
    if prepared == "only the .gz files":
        (root / "MNIST" / "raw").mkdir(parents=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            with gzip.open(root / "MNIST" / "raw" / f"{name}.gz", "wb") as f:
                f.write(bytes(16))
    project = tmp_path / "project"
    project.mkdir()
    raw = tiny_raw(project / "outputs")
    raw["data"] = {"source": "torchvision", "name": "MNIST", "root": str(root), "image_size": 16, "channels": 1}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    for command in (["data"], ["run"]):
        result = CliRunner().invoke(app, [*command, "--params", str(project / "params.yaml")])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"data.root={str(root)!r}" in lines[0] and "data.name='MNIST'" in lines[0]
        assert "MNIST/raw" in lines[0] and "Traceback" not in result.output
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]


# the number of classes ---------------------------------------------------------------------------------------------
def _absent_imagefolder(tmp_path, **kw) -> DataConfig:
    raw = {"source": "imagefolder", "root": str(tmp_path / "absent"), "channels": 3, **kw}
    return DataConfig.model_validate(raw, context={"check_paths": False})


def test_class_count_from_the_digits():
    assert class_count(_digits_cfg()) == 10
    assert class_count(_digits_cfg(num_classes=10)) == 10
    with pytest.raises(ConfigError, match=r"data\.num_classes=1000 but the data has 10 classes"):
        class_count(_digits_cfg(num_classes=1000))


def test_class_count_from_the_config_when_the_data_is_absent(tmp_path):
    assert class_count(_absent_imagefolder(tmp_path, num_classes=1000), tmp_path / "no-splits.json") == 1000
    with pytest.raises(ConfigError, match=r"data\.num_classes is not set") as err:
        class_count(_absent_imagefolder(tmp_path))
    assert "absent" in str(err.value)  # names the missing root


def test_class_count_from_the_class_folders(tmp_path, image_tree, flat_image_tree):
    for root in (image_tree, flat_image_tree):
        assert class_count(DataConfig(source="imagefolder", root=str(root))) == len(CLASSES)
    assert class_count(DataConfig(source="imagefolder", root=str(image_tree), num_classes=2)) == 2
    with pytest.raises(ConfigError, match=r"data\.num_classes=1000 but the data has 2 classes") as err:
        class_count(DataConfig(source="imagefolder", root=str(image_tree), num_classes=1000))
    assert str(image_tree) in str(err.value)


def test_class_count_of_a_run_comes_from_its_splits(tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"num_classes": 7, "splits": {}}))
    assert class_count(_absent_imagefolder(tmp_path), splits) == 7  # the data was split elsewhere: its count is here
    assert class_count(_absent_imagefolder(tmp_path, num_classes=7), splits) == 7
    with pytest.raises(ConfigError, match=r"data\.num_classes=1000 but the data has 7 classes") as err:
        class_count(_absent_imagefolder(tmp_path, num_classes=1000), splits)
    assert "splits.json" in str(err.value)


def test_unset_num_classes_is_left_out_of_dumps():
    """Fingerprints of configs written before the key existed stay the same."""
    assert "num_classes" not in _digits_cfg().model_dump(context={"fingerprint": True})
    assert _digits_cfg(num_classes=10).model_dump(mode="json")["num_classes"] == 10


def test_class_count_of_a_torchvision_root_without_its_files(tmp_path):
    cfg = DataConfig(source="torchvision", name="CIFAR10", root=str(tmp_path), download=True, num_classes=10)
    assert class_count(cfg) == 10  # nothing downloaded, nothing read: the config's count
    assert list(tmp_path.iterdir()) == []


def _rand_augmented(dataset) -> bool:
    from timm.data.auto_augment import RandAugment

    pool = dataset.dataset if hasattr(dataset, "indices") else dataset
    pool = getattr(pool, "base", pool)  # the images under the decoded-image cache
    return any(isinstance(t, RandAugment) for t in pool.transform.transforms)


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_transforms_training_images_only(tmp_path, image_tree, channels):
    from dna.data import eval_view

    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=channels, rate_fraction=0.25)
    write_splits(cfg, 0, tmp_path / "splits.json")
    data = load_data(cfg, tmp_path / "splits.json", rand_augment="rand-m9-mstd0.5")
    assert _rand_augmented(data.train)
    assert not any(_rand_augmented(d) for d in (data.rate, data.test, eval_view(data).train))
    reads = [data.train[0][0] for _ in range(8)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:]), "each read of a training image is transformed anew"
    for name in ("rate", "test"):
        first = data.split(name)[0][0]
        assert all(torch.equal(first, data.split(name)[0][0]) for _ in range(3)), f"{name} images are not augmented"
    plain = load_data(cfg, tmp_path / "splits.json")
    assert not _rand_augmented(plain.train) and torch.equal(plain.train[0][0], plain.train[0][0])


# what the data stage refuses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    ("val lacks bees", ["lacks the class(es) bees"]),
    ("val has wasps", ["has class(es)", "lacks: wasps"]),
])
def test_a_test_folder_with_other_classes_than_the_training_folder_is_refused(tmp_path, image_tree, change, named):
    """ImageFolder numbers each folder's classes on its own, so the folders must hold the same classes."""
    import shutil

    if change == "val lacks bees":
        shutil.rmtree(image_tree / "val" / "bees")
    else:
        _write_pngs(image_tree / "val" / "wasps", 2, 120, seed=7)
    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=1, rate_fraction=0.25)
    with pytest.raises(ConfigError) as err:
        make_splits(cfg, seed=0)
    message = str(err.value)
    assert str(image_tree / "val") in message and str(image_tree / "train") in message
    for part in named:
        assert part in message, message


def test_a_val_folder_without_the_first_class_would_shift_labels_and_is_refused(tmp_path, image_tree):
    """Without ants, val/'s bees would be numbered 0 (ants) and every one of them scored wrong."""
    import shutil

    shutil.rmtree(image_tree / "val" / "ants")
    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=1, rate_fraction=0.25)
    with pytest.raises(ConfigError, match=r"lacks the class\(es\) ants"):
        write_splits(cfg, 0, tmp_path / "splits.json")
    assert not (tmp_path / "splits.json").exists()


def test_a_one_class_dataset_is_refused(tmp_path):
    root = tmp_path / "one"
    _write_pngs(root / "ants", 8, 30, seed=0)
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=16, channels=1)
    with pytest.raises(ConfigError, match=r"holds 1 class \(ants\); a classifier needs at least two"):
        write_splits(cfg, 0, tmp_path / "splits.json")
    assert not (tmp_path / "splits.json").exists()


def test_a_class_too_small_for_the_splits_is_refused_naming_it(tmp_path):
    root = tmp_path / "small"
    _write_pngs(root / "ants", 8, 30, seed=0)
    _write_pngs(root / "bees", 1, 220, seed=1)  # scikit-learn: "The least populated class in y has only 1 member"
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=16, channels=1, rate_fraction=0.25,
                     test_fraction=0.25)
    with pytest.raises(ConfigError) as err:
        make_splits(cfg, seed=0)
    assert "1 of 2 classes have fewer than the 4 images" in str(err.value) and "bees (1)" in str(err.value)
    assert "ants" not in str(err.value).split(":")[-1]


def test_fractions_too_small_for_the_number_of_classes_are_refused():
    """1797 digits: 0.5% of them (8) cannot hold one of each of 10 classes; scikit-learn raised a traceback."""
    with pytest.raises(ConfigError, match=r"10 of 10 classes have fewer than the 200 images.*"
                                          r"data\.rate_fraction=0\.005 takes the smallest share"):
        make_splits(_digits_cfg(rate_fraction=0.005), seed=0)


def test_the_smallest_classes_that_split_are_accepted(tmp_path):
    """The limit is exact: 4 images of a class at fractions of 0.25 give every split one."""
    root = tmp_path / "four"
    for c, name in enumerate(("ants", "bees", "wasps")):
        _write_pngs(root / name, 4, 30 + 80 * c, seed=c)
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=16, channels=1, rate_fraction=0.25,
                     test_fraction=0.25)
    splits = make_splits(cfg, seed=0)
    assert [len(splits[k]) for k in SPLITS] == [6, 3, 3]


def test_corrupt_and_truncated_images_are_all_named_by_the_data_stage(tmp_path, image_tree):
    truncated = image_tree / "train" / "ants" / "img_0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    not_an_image = image_tree / "val" / "bees" / "notes.jpg"
    not_an_image.write_text("not a JPEG")
    cfg = DataConfig(source="imagefolder", root=str(image_tree), image_size=16, channels=1, rate_fraction=0.25)
    with pytest.raises(ConfigError) as err:
        write_splits(cfg, 0, tmp_path / "splits.json")
    message = str(err.value)
    assert "2 of 17 image files cannot be read" in message and "data.verify: false" in message
    assert str(truncated) in message and str(not_an_image) in message
    assert "img_1.png" not in message
    assert not (tmp_path / "splits.json").exists()
    unchecked = cfg.model_copy(update={"verify": False})
    assert write_splits(unchecked, 0, tmp_path / "splits.json")["sizes"] == {"train": 9, "rate": 3, "test": 5}
