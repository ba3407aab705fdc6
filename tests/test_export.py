import copy

import numpy as np
import onnx
import pytest
import torch
from timm.layers import get_act_layer
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from dna.export import (
    EXPORTERS,
    ExportReport,
    ParityError,
    class_names,
    export_onnx,
    onnx_accuracy,
    onnx_outputs,
    onnx_predict,
    read_metadata,
)

ARCH = [["ds_r1_k3_s1_c16_se0.25"], ["ir_r1_k5_s2_e3_c24_se0.25"], ["ir_r1_k3_s2_e6_c40_se0.25"]]
METADATA = {"arch": "ds_r1_k3_s1_c16_se0.25|ir_r1_k5_s2_e3_c24_se0.25", "dataset": "mnist", "top1": "0.981"}


def _small_effnet(seed=0):
    torch.manual_seed(seed)
    model = EfficientNet(
        decode_arch_def(ARCH),
        num_classes=10,
        in_chans=1,
        stem_size=16,
        num_features=64,
        act_layer=get_act_layer("swish"),
    )
    # Non-trivial running stats so the exported (folded) batch norms are really checked.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _tiny_convnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 10),
    )


def _images(n, seed=1):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(EXPORTERS))
def exported(tmp_path_factory, request):
    """The small network exported by each of torch's exporters: every test of it holds for both."""
    model = _small_effnet().train()
    model.bn1.eval()  # a mixed train/eval state that export must give back unchanged
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    report = export_onnx(model, _images(4), path, METADATA, exporter=request.param)
    return model, report


def test_report_and_single_self_contained_file(exported):
    model, report = exported
    assert isinstance(report, ExportReport)
    assert report.path.is_file()
    assert 0.0 <= report.max_abs_diff <= 1e-4
    assert report.opset == 18
    assert report.num_images == 4
    assert model.training and model.blocks.training and not model.bn1.training
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["student.onnx"]
    onnx.checker.check_model(str(report.path))
    proto = onnx.load(str(report.path), load_external_data=False)
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    )
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "class_index"]


def test_metadata_round_trips(exported):
    _, report = exported
    assert read_metadata(report.path) == METADATA


def test_input_shape_per_image(exported, tmp_path):
    from dna.export import input_shape

    assert input_shape(exported[1].path) == "1x32x32"  # what registry versions must share to be compared
    wide = export_onnx(_tiny_convnet(), torch.randn(2, 1, 20, 24), tmp_path / "wide.onnx", {})
    assert input_shape(wide.path) == "1x20x24"


def test_batch_dimension_is_dynamic(exported):
    model, report = exported
    proto = onnx.load(str(report.path), load_external_data=False)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    model = copy.deepcopy(model).eval()
    for n in (3, 7):
        images = _images(n, seed=n)
        logits = onnx_predict(report.path, images.numpy())
        with torch.no_grad():
            expected = model(images).numpy()
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_probabilities_and_class_index_per_image(exported):
    model, report = exported
    images = _images(5, seed=5)
    out = onnx_outputs(report.path, images.numpy())
    assert list(out) == ["logits", "probabilities", "class_index"]
    with torch.no_grad():
        logits = copy.deepcopy(model).eval()(images)
    np.testing.assert_allclose(out["probabilities"], torch.softmax(logits, 1).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert out["class_index"].dtype == np.int64 and out["class_index"].shape == (5,)
    np.testing.assert_array_equal(out["class_index"], out["logits"].argmax(axis=1))
    assert class_names(report.path) is None  # none were given


def test_class_names_recorded_and_checked_against_the_outputs(tmp_path):
    names = [f"class {i}" for i in range(10)]
    report = export_onnx(_tiny_convnet(), _images(2), tmp_path / "named.onnx", {"k": "v"}, class_names=names)
    assert class_names(report.path) == names
    assert read_metadata(report.path)["k"] == "v"
    with pytest.raises(ValueError, match="3 class names for a model with 10 outputs"):
        export_onnx(_tiny_convnet(), _images(2), tmp_path / "wrong.onnx", {}, class_names=["a", "b", "c"])
    assert not (tmp_path / "wrong.onnx").exists()


def test_accuracy_batch_by_batch_equals_the_whole_split_at_once(tmp_path):
    """Evaluated through a DataLoader smaller than the split, with at most one earlier batch still alive whenever
    the next one is made (no batch is kept), the accuracy is that of all images in one run."""
    import weakref

    from torch.utils.data import DataLoader, TensorDataset, default_collate

    report = export_onnx(_tiny_convnet(), _images(2), tmp_path / "m.onnx", {})
    images = _images(23, seed=4)
    logits = onnx_predict(report.path, images.numpy())
    labels = torch.from_numpy(logits.argmax(axis=1))
    labels[::3] = (labels[::3] + 1) % 10  # a third of them wrong
    expected = int((torch.from_numpy(logits).argmax(1) == labels).sum()) / len(labels)
    alive, peak = [], []

    def collate(items):
        batch = default_collate(items)
        peak.append(sum(ref() is not None for ref in alive))
        alive.append(weakref.ref(batch[0]))
        return batch

    loader = DataLoader(TensorDataset(images, labels), batch_size=5, collate_fn=collate)
    assert onnx_accuracy(report.path, loader) == expected
    assert 0 < expected < 1 and len(alive) == 5 and max(peak) <= 1


def test_single_image_export(tmp_path):
    report = export_onnx(_small_effnet(seed=3), _images(1), tmp_path / "one.onnx", {})
    assert report.num_images == 1
    assert onnx_predict(report.path, _images(5).numpy()).shape == (5, 10)
    assert read_metadata(report.path) == {}


class EagerOnlyBias(torch.nn.Module):
    """Adds an offset in eager mode only: a Python branch that tracing cannot capture,
    so the exported graph genuinely disagrees with what the model computes."""

    def __init__(self, inner: torch.nn.Module, offset: float):
        super().__init__()
        self.inner = inner
        self.offset = offset

    def forward(self, x):
        out = self.inner(x)
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return out
        return out + self.offset


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_parity_failure_raises_and_removes_file(tmp_path, exporter):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"stale export from an earlier run")
    with pytest.raises(ParityError, match="max abs diff") as info:
        export_onnx(EagerOnlyBias(_tiny_convnet(), offset=1e-3), _images(3), path, {"k": "v"}, exporter=exporter)
    assert info.value.max_abs_diff == pytest.approx(1e-3, rel=0.05)
    assert list(tmp_path.iterdir()) == []


def test_the_torchscript_exporter_refuses_an_opset_it_cannot_write_naming_the_key():
    from dna.config import ExportConfig
    from dna.export import TORCHSCRIPT_MAX_OPSET

    ExportConfig(opset=TORCHSCRIPT_MAX_OPSET)
    ExportConfig(opset=TORCHSCRIPT_MAX_OPSET + 1, exporter="dynamo")
    with pytest.raises(ValueError, match="export.opset=21: the torchscript exporter writes opsets up to 20; set "
                                         "export.exporter: dynamo"):
        ExportConfig(opset=TORCHSCRIPT_MAX_OPSET + 1)
