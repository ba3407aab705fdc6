"""Batches of a split: from worker processes or from decoded images in memory, always in the generator's order."""
import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.mnist_files import write_mnist
from dna.config import DataConfig
from dna.data import load_data, write_splits
from dna.loading import Decoded, seeded, usable_workers


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """MNIST's raw IDX files of 400 training and 100 test images, as torchvision reads them."""
    return write_mnist(tmp_path_factory.mktemp("mnist"), train=400, test=100)


def mnist(root, tmp_path, **kw):
    cfg = DataConfig(**{"source": "torchvision", "name": "MNIST", "root": str(root), "image_size": 24, "channels": 1,
                        **kw})
    write_splits(cfg, 0, tmp_path / "splits.json")
    return load_data(cfg, tmp_path / "splits.json")


def epoch(data, split="train", seed=5, batch_size=32, shuffle=True):
    return list(data.loader(split, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_batches_follow_the_generator_as_a_dataloader_does_whatever_the_workers(mnist_root, tmp_path):
    plain = mnist(mnist_root, tmp_path, cache_mb=0)
    reference = list(DataLoader(plain.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5)))
    workers = mnist(mnist_root, tmp_path, cache_mb=0, num_workers=2)
    assert same(epoch(plain), reference) and same(epoch(workers), reference)
    assert not same(epoch(workers, seed=6), reference)
    assert epoch(plain)[0][1].dtype == torch.long and len(plain.loader("train", 32)) == len(reference)


def test_decoded_cache_gives_the_batches_of_the_decoding_path(mnist_root, tmp_path):
    plain, cached = mnist(mnist_root, tmp_path, cache_mb=0), mnist(mnist_root, tmp_path, cache_mb=64)
    for split, shuffle in (("train", True), ("rate", False), ("test", False)):
        assert same(epoch(cached, split, shuffle=shuffle), epoch(plain, split, shuffle=shuffle)), split
    pool, test = cached.train.dataset, cached.test
    assert isinstance(pool, Decoded) and pool.images is not None and test.images is not None
    assert pool is cached.rate.dataset, "one decoded copy serves the train and rate splits"
    assert torch.equal(cached.images("train", 10), plain.images("train", 10))


def test_a_dataset_over_the_budget_is_decoded_every_pass(mnist_root, tmp_path):
    small = mnist(mnist_root, tmp_path, cache_mb=1, image_size=32)  # 400 images of 32x32 float32: 1.6 MiB
    plain = mnist(mnist_root, tmp_path, cache_mb=0, image_size=32)
    assert same(epoch(small), epoch(plain))
    assert small.train.dataset.images is None and small.train.dataset.refused
    assert small.test.images is None, "decoded when first passed over"
    assert same(epoch(small, "test", shuffle=False), epoch(plain, "test", shuffle=False))
    assert small.test.images is not None, "the 100 test images (0.4 MiB) fit"


def test_augmented_batches_depend_on_the_generator_only(mnist_root, tmp_path):
    """Random crops and flips are drawn per image from the pass's seed: the same in the training process and in
    workers, the same again for the same generator, and leaving the global random state alone."""
    one = mnist(mnist_root, tmp_path, augment=True)
    two = mnist(mnist_root, tmp_path, augment=True, num_workers=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = epoch(one)
    assert torch.equal(torch.get_rng_state(), before)
    assert same(first, epoch(two)) and same(first, epoch(one))
    assert not same(first, epoch(one, seed=6))
    plain = epoch(mnist(mnist_root, tmp_path))
    assert all(torch.equal(ya, yb) and not torch.equal(xa, xb) for (xa, ya), (xb, yb) in zip(first, plain)), \
        "the same order, other (augmented) images"
    assert one.train.dataset is not one.rate.dataset and not isinstance(one.train.dataset, Decoded)


def test_training_passes_reuse_their_worker_processes(mnist_root, tmp_path):
    data = mnist(mnist_root, tmp_path, cache_mb=0, num_workers=2)

    def worker_pids():
        (kept,) = [w for (_, persistent), w in data.loading._workers.items() if persistent]
        return [p.pid for p in kept.loader._iterator._workers]

    epoch(data)
    first = worker_pids()
    epoch(data, seed=6)
    assert worker_pids() == first and len(first) == 2


def test_a_pass_started_inside_another_of_the_same_split_gets_its_own_loader(mnist_root, tmp_path):
    data = mnist(mnist_root, tmp_path, cache_mb=0, num_workers=1)
    outer = data.loader("rate", 16)
    pairs = [(x, next(iter(outer))[0]) for x, _ in outer]
    assert len(pairs) == len(outer) and all(torch.equal(inner, pairs[0][0]) for _, inner in pairs)


def _report_workers(queue):
    queue.put(usable_workers(4))


def test_a_daemonic_process_loads_in_process():
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_report_workers, args=(queue,), daemon=True)
    child.start()
    child.join(30)
    assert queue.get(timeout=5) == 0 and usable_workers(4) == 4


def test_seeded_draws_repeat_and_restore_the_global_state():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with seeded(42):
        a = torch.rand(3)
    with seeded(42):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_training_resumes_exactly_with_workers_and_a_cache_decoded_on_first_use(mnist_root, tmp_path):
    """The resumed run decodes its cache in its first epoch, the uninterrupted run in epoch 1: neither draws from the
    random state the checkpoint restores (dropout's), so both end with the same weights."""
    from dna.arch import Arch
    from dna.config import TrainConfig
    from dna.train import train_classifier

    cfg = TrainConfig(epochs=3, lr=0.02, warmup_epochs=0, batch_size=64)

    def train(path, on_epoch=None):
        torch.manual_seed(0)
        arch = Arch(stem=8, stages=(("ds_r1_k3_s1_c8_se0.25",), ("ir_r1_k3_s2_e3_c16_se0.25",)), head=32)
        data = mnist(mnist_root, tmp_path, num_workers=1)
        model = arch.build(data.num_classes, 1, drop_rate=0.2)
        return train_classifier(model, data, cfg, path, seed=0, fingerprint="f", device=torch.device("cpu"),
                                on_epoch=on_epoch), model

    whole, model = train(tmp_path / "whole.pt")

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut.pt", crash)
    resumed, resumed_model = train(tmp_path / "cut.pt")
    assert resumed.resumed_from == 2 and resumed.history == whole.history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()))
