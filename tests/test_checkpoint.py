import hashlib
import io

import pytest
import torch

from dna.checkpoint import (
    HEADER_SIZE,
    MAGIC,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
    staged_dir,
)


def _state():
    gen = torch.Generator().manual_seed(123)
    return {
        "weights": {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64)},
        "step": 7,
        "lr": 0.125,
        "name": "block-2",
        "history": [1.5, 2.5, {"nested": torch.ones(2)}],
        "cpu_rng": torch.get_rng_state(),
        "gen_rng": gen.get_state(),
    }


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    state = _state()
    digest = save_checkpoint(path, state)
    return path, state, digest


def test_round_trip(ckpt):
    path, state, digest = ckpt
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert torch.equal(loaded["weights"]["b"], state["weights"]["b"])
    assert loaded["step"] == 7 and loaded["lr"] == 0.125 and loaded["name"] == "block-2"
    assert loaded["history"][:2] == [1.5, 2.5]
    assert torch.equal(loaded["history"][2]["nested"], torch.ones(2))
    assert checkpoint_digest(path) == digest
    assert hashlib.sha256(path.read_bytes()[HEADER_SIZE:]).hexdigest() == digest


def test_rng_states_restore_same_draws(ckpt):
    path, state, _ = ckpt
    loaded = load_checkpoint(path)

    gen = torch.Generator()
    gen.set_state(state["gen_rng"])
    expected = torch.randn(5, generator=gen)
    gen.set_state(loaded["gen_rng"])
    assert torch.equal(torch.randn(5, generator=gen), expected)

    saved_global = torch.get_rng_state()
    try:
        torch.set_rng_state(state["cpu_rng"])
        expected = torch.rand(5)
        torch.manual_seed(999)
        torch.set_rng_state(loaded["cpu_rng"])
        assert torch.equal(torch.rand(5), expected)
    finally:
        torch.set_rng_state(saved_global)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match="missing") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_digest(path)


@pytest.mark.parametrize("keep", [HEADER_SIZE - 5, None])
def test_truncated(ckpt, keep):
    path, _, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_flipped_payload_byte(ckpt):
    path, _, _ = ckpt
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + len(data[HEADER_SIZE:]) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_wrong_magic(ckpt, tmp_path):
    path, _, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(b"NOTACKPT" + data[len(MAGIC):])
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(plain)


class Arbitrary:
    def __init__(self):
        self.payload = "would run arbitrary code on unpickle"


def test_arbitrary_object_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"obj": Arbitrary()}, buf)
    payload = buf.getvalue()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="weights-only") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_failed_save_keeps_old_file(ckpt):
    path, _, digest = ckpt
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda: whatever the pickler raises
        save_checkpoint(path, {"fn": lambda x: x, "w": torch.ones(3)})
    assert path.read_bytes() == before
    assert checkpoint_digest(path) == digest
    assert _leftovers(path.parent) == []


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode, "same permissions as a normal write"


def test_atomic_write_failure_leaves_old_file(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_staged_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    path = tmp_path / "features"
    path.mkdir()
    (path / "old.npy").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(path) as building:
            (building / "new.npy").write_text("half")
            raise KeyboardInterrupt  # killed while building
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"] and (path / "old.npy").read_text() == "old"
    with staged_dir(path) as building:
        assert not path.samefile(building)
        (building / "new.npy").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]
    assert sorted(p.name for p in path.iterdir()) == ["new.npy"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert path.stat().st_mode == plain.stat().st_mode, "same permissions as a normal folder"


def test_staged_dir_replaces_links_and_never_writes_into_their_targets(tmp_path):
    elsewhere, path = tmp_path / "elsewhere", tmp_path / "features"
    elsewhere.mkdir()
    (elsewhere / "a.npy").write_text("kept")
    path.symlink_to(elsewhere)  # the folder a link
    with staged_dir(path) as building:
        (building / "a.npy").write_text("new")
    assert not path.is_symlink() and (path / "a.npy").read_text() == "new"
    (path / "a.npy").unlink()
    (path / "a.npy").symlink_to(elsewhere / "a.npy")  # a file a link
    with staged_dir(path) as building:
        (building / "a.npy").write_text("newer")
    assert (elsewhere / "a.npy").read_text() == "kept" and sorted(p.name for p in elsewhere.iterdir()) == ["a.npy"]
    assert (path / "a.npy").read_text() == "newer" and not (path / "a.npy").is_symlink()
