"""The timm classifier factory: shapes, gradients, learning, normalisation, configs and weight loading."""

from __future__ import annotations

import json
import logging
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lungopacity.constants import CLASS_NAMES
from lungopacity.models.classifier import (
    OpacityClassifier,
    PretrainedWeightsError,
    classifier_from_config,
    create_classifier,
    save_classifier_weights,
)
from lungopacity.models.pretrained import OFFLINE_WEIGHTS, offline_weights_path

EFFICIENTNET_LITE0_TENSOR_COUNT = OFFLINE_WEIGHTS["efficientnet-lite0"].num_tensors


def efficientnet_lite0_weights_path() -> Path:
    return offline_weights_path("efficientnet-lite0")

SMALL_BACKBONE = "resnet18"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: the test machine's two cores are shared with other jobs, and
    # oneDNN's spinning threads slow down several-fold when they compete for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _outputs(model: OpacityClassifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- building and training


def test_legacy_xception_builds_with_one_channel_and_three_logits() -> None:
    model = create_classifier()  # the defaults: legacy_xception, random init, 1 channel, 3 classes
    assert model.backbone == "legacy_xception"
    assert model.model.conv1.weight.shape[1] == 1
    assert model.pretrained_cfg["class_names"] == list(CLASS_NAMES)
    assert model.pretrained_cfg["input_size"] == [1, 299, 299]
    assert model.pretrained_cfg["mean"] == [0.5] and model.pretrained_cfg["std"] == [0.5]
    logits = _outputs(model, torch.rand(2, 1, 128, 128))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    # Grad-CAM target: the module whose output is the final 2048-channel feature map.
    assert model.gradcam_target_layer_name() == "act4"
    assert model.gradcam_target_layer() is model.model.act4


def test_every_parameter_receives_a_gradient() -> None:
    model = create_classifier("efficientnet_lite0", drop_rate=0.2).train()
    x = torch.rand(4, 1, 64, 64)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 1]))
    loss.backward()
    named = list(model.named_parameters())
    assert len(named) > 100
    no_grad = [name for name, p in named if p.grad is None]
    assert no_grad == []
    zero_or_bad = [name for name, p in named if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert zero_or_bad == []


def _two_class_batch(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright square top-left; class 2: bottom-right; both on noisy grey."""
    generator = torch.Generator().manual_seed(1)
    images = 0.3 + 0.1 * torch.rand(n, 1, size, size, generator=generator)
    labels = torch.tensor([0, 2] * (n // 2))
    quarter = size // 4
    for index, label in enumerate(labels.tolist()):
        if label == 0:
            images[index, 0, quarter : 2 * quarter, quarter : 2 * quarter] = 0.9
        else:
            images[index, 0, 2 * quarter : 3 * quarter, 2 * quarter : 3 * quarter] = 0.9
    return images, labels


def test_overfits_a_tiny_batch_to_near_zero_loss() -> None:
    # timm's tiny test_efficientnet (0.1 M parameters): the point is that the wrapper,
    # its normalisation and its 3-class head learn, not the capacity of a big backbone.
    model = create_classifier("test_efficientnet").train()
    images, labels = _two_class_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first_loss = None
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        first_loss = loss.item() if first_loss is None else first_loss
    with torch.no_grad():
        logits = model(images)  # train mode: the batch statistics it was fitted with
        final_loss = F.cross_entropy(logits, labels).item()
    assert first_loss > 0.5  # it started near chance (ln 3 = 1.1) ...
    assert final_loss < 0.05  # ... and memorised the batch
    assert logits.argmax(1).tolist() == labels.tolist()


# --------------------------------------------------------------------------- normalisation and config


def test_normalisation_inside_the_model_follows_its_config() -> None:
    model = create_classifier(SMALL_BACKBONE).eval()
    x = torch.rand(2, 1, 64, 64)
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    assert (mean, std) == pytest.approx(((0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3))
    with torch.no_grad():
        by_hand = model.model((x - mean) / std)
        assert torch.allclose(model(x), by_hand, atol=1e-6)
        # forward = forward_head(forward_features(x))
        assert torch.allclose(model.forward_head(model.forward_features(x)), by_hand, atol=1e-6)
        assert torch.allclose(model.predict_proba(x), torch.softmax(by_hand, 1), atol=1e-6)

    config = model.config()
    same = classifier_from_config(config)
    same.load_state_dict(model.state_dict())
    shifted_config = dict(config, mean=[0.1])
    shifted = classifier_from_config(shifted_config)
    shifted.load_state_dict(model.state_dict())  # same weights: only the config differs
    assert torch.equal(_outputs(same, x), _outputs(model, x))
    assert (_outputs(shifted, x) - _outputs(model, x)).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.allclose(shifted(x), model.model((x - 0.1) / std), atol=1e-6)

    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))


def test_config_round_trip_rebuilds_the_same_architecture_and_outputs() -> None:
    model = create_classifier("efficientnet_lite0", pretrained="efficientnet-lite0", drop_rate=0.3)
    config = json.loads(json.dumps(model.config()))  # must survive JSON
    assert config["mean"] == [0.5] and config["drop_rate"] == 0.3
    rebuilt = classifier_from_config(config)
    assert rebuilt.pretrained_cfg == model.pretrained_cfg  # mean 0.5, not timm's default 0.449
    assert rebuilt.drop_rate == 0.3
    original_state, rebuilt_state = model.state_dict(), rebuilt.state_dict()
    assert list(original_state) == list(rebuilt_state)
    assert all(original_state[key].shape == rebuilt_state[key].shape for key in original_state)
    assert not torch.equal(original_state["model.conv_stem.weight"], rebuilt_state["model.conv_stem.weight"])
    rebuilt.load_state_dict(original_state)  # strict: the checkpoint fits
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(_outputs(rebuilt, x), _outputs(model, x))


def test_rebuilding_from_a_config_logs_the_normalisation_it_applies(caplog: pytest.LogCaptureFixture) -> None:
    # Regression (issue 13): the rebuild logged timm's default mean 0.449 before the
    # config's 0.5 replaced it, so the log named a normalisation the model never applied.
    config = create_classifier("efficientnet_lite0", pretrained="none").config()
    config["mean"], config["std"] = [0.25], [0.125]
    with caplog.at_level(logging.INFO, logger="lungopacity.models.classifier"):
        classifier_from_config(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "lungopacity.models.classifier"]
    assert len(lines) == 1, lines
    assert "mean=[0.25], std=[0.125]" in lines[0] and "rebuilt" in lines[0]


# --------------------------------------------------------------------------- local weight files


def test_safetensors_file_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = create_classifier(SMALL_BACKBONE)
    path = tmp_path / "resnet18.safetensors"
    save_file({key: value.contiguous() for key, value in model.model.state_dict().items()}, str(path))
    loaded = create_classifier(SMALL_BACKBONE, pretrained=str(path))
    x = torch.rand(3, 1, 64, 64)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    assert loaded.pretrained_cfg["pretrained"] == f"file:{path}"


def test_saved_weights_carry_their_normalisation(tmp_path: Path) -> None:
    model = create_classifier(SMALL_BACKBONE)
    model.set_normalization([0.3], [0.2])
    x = torch.rand(2, 1, 64, 64)
    for name in ("weights.safetensors", "weights.pth"):
        path = save_classifier_weights(model, tmp_path / name)
        loaded = create_classifier(SMALL_BACKBONE, pretrained=path)
        assert loaded.pretrained_cfg["mean"] == [0.3] and loaded.pretrained_cfg["std"] == [0.2]
        assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    # an OpacityClassifier state dict ('model.' prefix) is accepted as well
    wrapped = tmp_path / "wrapped.pt"
    torch.save(model.state_dict(), wrapped)
    loaded = create_classifier(SMALL_BACKBONE, pretrained=wrapped)
    assert torch.equal(loaded.model.conv1.weight, model.model.conv1.weight)
    with pytest.raises(PretrainedWeightsError, match="holds weights for backbone 'resnet18'"):
        create_classifier("resnet34", pretrained=tmp_path / "weights.pth")


def test_rgb_file_stem_is_summed_and_other_sized_head_dropped(tmp_path: Path, caplog) -> None:
    rgb = create_classifier(SMALL_BACKBONE, num_classes=1000, in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save(rgb.model.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="lungopacity.models"):
        grey = create_classifier(SMALL_BACKBONE, pretrained=path)
    assert torch.allclose(grey.model.conv1.weight, rgb.model.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(grey.model.layer4[1].conv2.weight, rgb.model.layer4[1].conv2.weight)
    assert grey.model.fc.weight.shape == (3, 512)
    assert "dropped classifier head" in caplog.text and "fc.weight (1000, 512)" in caplog.text
    # A grey image through the summed stem equals the same grey image in all three RGB
    # channels through the RGB stem (with the same normalisation).
    grey.set_normalization([0.5], [0.25])
    rgb.set_normalization([0.5] * 3, [0.25] * 3)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(
            grey.eval().forward_features(x), rgb.eval().forward_features(x.expand(-1, 3, -1, -1)), atol=1e-4
        )


def test_file_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(create_classifier(SMALL_BACKBONE).model.state_dict(), str(path))
    with pytest.raises(PretrainedWeightsError) as error:
        create_classifier("efficientnet_lite0", pretrained=str(path))
    message = str(error.value)
    assert str(path) in message
    assert "not a state dict of efficientnet_lite0" in message
    assert "missing: conv_stem.weight" in message and "unexpected: conv1.weight" in message

    with pytest.raises(PretrainedWeightsError, match="no such weight file"):
        create_classifier(SMALL_BACKBONE, pretrained=str(tmp_path / "absent.safetensors"))
    other = tmp_path / "weights.ckpt"
    other.write_bytes(b"\0")
    with pytest.raises(PretrainedWeightsError, match="unsupported weight file type"):
        create_classifier(SMALL_BACKBONE, pretrained=str(other))


# --------------------------------------------------------------------------- timm hub


def test_timm_pretrained_without_network_names_the_offline_options(tmp_path: Path, monkeypatch) -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import: patch the live value
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(PretrainedWeightsError) as error:
        create_classifier(SMALL_BACKBONE, pretrained="timm")
    message = str(error.value)
    assert "cannot be reached" in message
    assert "--pretrained efficientnet-lite0" in message
    assert "--pretrained PATH" in message


# --------------------------------------------------------------------------- offline EfficientNet-Lite0 weights


def _package_tensors() -> list[tuple[str, torch.Tensor]]:
    """The package's own file, read independently of the factory."""
    return list(torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True).items())


def test_efficientnet_lite0_weights_load_into_a_one_channel_model() -> None:
    package = _package_tensors()
    assert len(package) == EFFICIENTNET_LITE0_TENSOR_COUNT == 296
    assert package[0][0] == "_conv_stem.weight" and package[-1][0] == "_fc.bias"

    model = create_classifier("efficientnet_lite0", pretrained="efficientnet-lite0", num_classes=1000)
    ours = list(model.model.state_dict().items())
    assert len(ours) == 296
    assert ours[0][0] == "conv_stem.weight"
    assert ours[0][1].shape == (32, 1, 3, 3)
    assert torch.allclose(ours[0][1], package[0][1].sum(dim=1, keepdim=True))
    copied = [torch.equal(tensor, package_tensor) for (_, tensor), (_, package_tensor) in zip(ours[1:], package[1:])]
    assert all(copied)  # the other 295 tensors, the ImageNet head included, are the package's
    by_name = dict(ours)
    assert torch.equal(by_name["blocks.0.0.conv_dw.weight"], dict(package)["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(by_name["bn2.running_var"], dict(package)["_bn1.running_var"])
    assert torch.equal(by_name["classifier.weight"], dict(package)["_fc.weight"])

    three_class = create_classifier("efficientnet_lite0", pretrained="efficientnet-lite0")
    assert three_class.model.classifier.weight.shape == (3, 1280)
    assert torch.equal(three_class.model.conv_head.weight, dict(package)["_conv_head.weight"])
    assert three_class.pretrained_cfg["mean"] == [0.5] and three_class.pretrained_cfg["std"] == [0.5]


def test_new_head_on_pretrained_features_starts_at_uniform_probabilities(tmp_path: Path) -> None:
    # timm's own EfficientNet head init gives logits of std ~8 on grey images (loss 4-6);
    # a head put on pretrained features must start near ln 3.
    model = create_classifier("efficientnet_lite0", pretrained="efficientnet-lite0").eval()
    head = model.model.classifier
    assert torch.count_nonzero(head.bias) == 0
    assert 0.008 < float(head.weight.std()) < 0.012
    x = torch.rand(4, 1, 128, 128) * 0.6 + 0.2
    with torch.no_grad():
        logits = model(x)
    assert float(logits.abs().max()) < 1.0
    labels = torch.tensor([0, 1, 2, 0])
    assert abs(float(F.cross_entropy(logits, labels)) - math.log(3)) < 0.1

    # A file that carries a head of the right size keeps it, exactly.
    trained = create_classifier(SMALL_BACKBONE)
    with torch.no_grad():
        trained.model.fc.weight.fill_(0.5)
    path = save_classifier_weights(trained, tmp_path / "trained.safetensors")
    assert torch.equal(create_classifier(SMALL_BACKBONE, pretrained=path).model.fc.weight, trained.model.fc.weight)
    # A file whose head is dropped gets the small fresh head.
    imagenet = create_classifier(SMALL_BACKBONE, num_classes=1000)
    torch.save(imagenet.model.state_dict(), tmp_path / "imagenet.pth")
    fresh = create_classifier(SMALL_BACKBONE, pretrained=tmp_path / "imagenet.pth").model.fc
    assert torch.count_nonzero(fresh.bias) == 0 and float(fresh.weight.std()) < 0.012


def test_efficientnet_lite0_weights_refuse_another_backbone() -> None:
    with pytest.raises(PretrainedWeightsError, match="--backbone efficientnet_lite0"):
        create_classifier("resnet18", pretrained="efficientnet-lite0")


def _rings(size: int = 224) -> torch.Tensor:
    """Black and white concentric rings, period ~19 px: a maze / spiral-like texture."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = torch.sqrt(((xx - size / 2) ** 2 + (yy - size / 2) ** 2).float())
    return (torch.sin(radius / 3) > 0).float()


def _checkerboard(size: int = 224, square: int = 28) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((xx // square + yy // square) % 2).float()


def _entropy(probabilities: torch.Tensor) -> float:
    return float(-(probabilities * probabilities.clamp_min(1e-12).log()).sum())


def test_efficientnet_lite0_weights_classify_imagenet_patterns() -> None:
    """RGB model + package weights + ImageNet head on synthetic images.

    What this proves: the weights were mapped onto timm's layers correctly enough that the
    network recognises textures the way an ImageNet classifier does (rings -> maze / coil,
    checkerboard -> crossword puzzle) with a confident, low-entropy softmax, while a
    randomly initialised network gives near-uniform, input-independent output. It does
    not measure ImageNet accuracy.
    """
    maze, coil, crossword = 646, 506, 918  # ImageNet-1k class indices
    pretrained = create_classifier("efficientnet_lite0", "efficientnet-lite0", num_classes=1000, in_chans=3).eval()
    random_init = create_classifier("efficientnet_lite0", "none", num_classes=1000, in_chans=3).eval()
    images = torch.stack([_rings(), _checkerboard()]).unsqueeze(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        probabilities = pretrained.predict_proba(images)
        again = pretrained.predict_proba(images)
        random_probabilities = random_init.predict_proba(images)
    assert torch.equal(probabilities, again)  # deterministic in eval mode

    rings, checker = probabilities
    assert rings.topk(2).indices.tolist() in ([maze, coil], [coil, maze])
    assert rings[maze] + rings[coil] > 0.6
    assert _entropy(rings) < 2.5 < math.log(1000)
    assert checker.argmax().item() == crossword
    # The random network is far less confident and (nearly) ignores what it sees.
    assert all(_entropy(p) > 5.0 for p in random_probabilities)
    assert random_probabilities[0].argmax() == random_probabilities[1].argmax()


def test_efficientnet_lite0_weights_recognise_a_photograph() -> None:
    """The one natural photograph available offline: matplotlib's portrait of Grace Hopper in uniform."""
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"matplotlib sample photograph not found at {photo}")
    image = Image.open(photo).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(224, 224, 3)
    x = x.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    model = create_classifier("efficientnet_lite0", "efficientnet-lite0", num_classes=1000, in_chans=3).eval()
    with torch.no_grad():
        probabilities = model.predict_proba(x)[0]
    military_uniform = 652
    assert probabilities.argmax().item() == military_uniform
    assert probabilities[military_uniform] > 0.15
