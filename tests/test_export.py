import copy

import numpy as np
import onnx
import pytest
import torch
from timm.layers import get_act_layer
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

from dna.export import ExportReport, ParityError, export_onnx, onnx_predict, read_metadata

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _small_effnet().train()
    model.bn1.eval()  # a mixed train/eval state that export must give back unchanged
    path = tmp_path_factory.mktemp("export") / "student.onnx"
    report = export_onnx(model, _images(4), path, METADATA)
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
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_metadata_round_trips(exported):
    _, report = exported
    assert read_metadata(report.path) == METADATA


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
        if torch.compiler.is_exporting():
            return out
        return out + self.offset


def test_parity_failure_raises_and_removes_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"stale export from an earlier run")
    with pytest.raises(ParityError, match="max abs diff") as info:
        export_onnx(EagerOnlyBias(_tiny_convnet(), offset=1e-3), _images(3), path, {"k": "v"})
    assert info.value.max_abs_diff == pytest.approx(1e-3, rel=0.05)
    assert list(tmp_path.iterdir()) == []
