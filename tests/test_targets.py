import torch

from dna.data import eval_view
from dna.targets import TeacherTargets, teacher_shapes


def test_boundary_shapes_match_the_meta_device_probe(prepared_run):
    p = prepared_run.params
    targets = prepared_run.teacher_targets()
    assert targets.shapes() == teacher_shapes(p.teacher.model, 1, p.data.image_size, p.teacher.boundaries)


def test_cached_pairs_equal_pairs_computed_on_the_fly(prepared_run):
    cached = prepared_run.rating_targets()
    assert cached.cache_dir is not None and (cached.cache_dir / "cache.json").is_file()
    live = TeacherTargets(cached.teacher, cached.boundaries, eval_view(prepared_run.data), torch.device("cpu"))
    for block in range(prepared_run.space.num_blocks):
        for split in ("train", "rate"):
            (xa, ya), (xb, yb) = next(cached.pairs(block, split, 32)), next(live.pairs(block, split, 32))
            assert torch.allclose(xa, xb, atol=1e-5) and torch.allclose(ya, yb, atol=1e-5)
    x, _ = next(cached.pairs(0, "train", 8))
    assert torch.equal(x, prepared_run.data.images("train", 8)), "block 0 takes the image itself"


def test_shuffled_pairs_follow_the_generator(prepared_run):
    t = prepared_run.teacher_targets()
    a = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(3)))[1]
    b = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(3)))[1]
    c = next(t.pairs(1, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(4)))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
