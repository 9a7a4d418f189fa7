"""ONNX export of a bundle's networks, and running them with ONNX Runtime.

* The classifier ensemble is one graph: image ``(B, 1, S, S)`` in [0, 1] -> averaged
  logits ``(B, 3)``, every member's logits ``(B, K, 3)`` and pooled features ``(B, K, D)``
  (normalisation inside, as in PyTorch): the member spread and the applicability gate
  need the last two.
* The RetinaNet detector members are one graph exported up to their dense outputs (class
  logits and box deltas for every anchor, stacked over members: ``(B, M, A, ...)``). Its anchors depend only on the input size, so they are
  computed once at export and stored beside the graph; decoding, the per-level top-k,
  clipping and NMS then run in NumPy exactly as torchvision's ``postprocess_detections``
  does. That keeps the graph free of data-dependent control flow, which ONNX exports of
  detection models stumble on. Each member is decoded on its own and the members' boxes
  are pooled per image for the bundle's fusion step, as in PyTorch. (Faster R-CNN
  bundles run with the PyTorch runtime.)

Files written into ``MODEL/onnx/``: ``classifier.onnx``, ``detector.onnx``,
``detector_anchors.npz``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungopacity.errors import BundleError

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
OPSET = 17


class ClassifierEnsemble(nn.Module):
    """The bundle's classifiers as one module: mean logits, each member's logits and pooled features."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = [], []
        for member in self.members:
            feature_map = member.forward_features(x)
            features.append(member.forward_head(feature_map, pre_logits=True).flatten(1))
            logits.append(member.forward_head(feature_map))
        member_logits = torch.stack(logits, dim=1)
        return member_logits.mean(1), member_logits, torch.stack(features, dim=1)


class DenseRetinaNet(nn.Module):
    """RetinaNet up to the head: normalised image -> (class logits, box deltas) per anchor."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        retinanet = detector.model
        transform = retinanet.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1))
        self.backbone = retinanet.backbone
        self.head = retinanet.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.mean) / self.std
        features = list(self.backbone(x).values())
        out = self.head(features)
        return out["cls_logits"], out["bbox_regression"]


class DenseRetinaNets(nn.Module):
    """Every detector member's dense outputs, stacked: ``(B, M, A, C)`` and ``(B, M, A, 4)``."""

    def __init__(self, detectors: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(DenseRetinaNet(d) for d in detectors)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(x) for member in self.members]
        return torch.stack([o[0] for o in outputs], dim=1), torch.stack([o[1] for o in outputs], dim=1)


def _anchors_for_size(detector: nn.Module, size: int) -> tuple[np.ndarray, list[int]]:
    """Anchors (N, 4) of one image at ``size`` and the anchor count of each pyramid level."""
    from torchvision.models.detection.image_list import ImageList

    retinanet = detector.model
    with torch.no_grad():
        x = torch.zeros(1, 1, size, size)
        features = list(retinanet.backbone(x).values())
        anchors = retinanet.anchor_generator(ImageList(x, [(size, size)]), features)[0]
        per_level = [int(f.shape[-2] * f.shape[-1]) * retinanet.anchor_generator.num_anchors_per_location()[0] for f in features]
    return anchors.numpy(), per_level


def export_onnx(bundle_dir: str | Path) -> dict[str, Path]:
    """Export the bundle's classifier (and RetinaNet detector) to ``bundle_dir/onnx``."""
    from lungopacity.inference.bundle import load_classifiers, load_detectors, read_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    out = bundle_dir / ONNX_DIR
    out.mkdir(exist_ok=True)
    device = torch.device("cpu")
    written: dict[str, Path] = {}
    size = manifest.classifier.preprocessing.input_size
    ensemble = ClassifierEnsemble(load_classifiers(bundle_dir, manifest, device)).eval()
    _export(ensemble, torch.rand(2, 1, size, size), out / "classifier.onnx", ["image"],
            ["logits", "member_logits", "member_features"])
    written["classifier"] = out / "classifier.onnx"

    detectors = load_detectors(bundle_dir, manifest, device)
    if detectors:
        detector = detectors[0]  # the members share one architecture, so one set of anchors
        if detector.config().get("arch") != "retinanet":
            log.warning("ONNX export covers the RetinaNet detector only; this bundle's detector runs with PyTorch")
        else:
            dsize = manifest.detector.preprocessing.input_size
            _export(DenseRetinaNets(detectors).eval(), torch.rand(2, 1, dsize, dsize), out / "detector.onnx",
                    ["image"], ["cls_logits", "bbox_regression"])
            anchors, per_level = _anchors_for_size(detector, dsize)
            retinanet = detector.model
            np.savez(
                out / "detector_anchors.npz",
                anchors=anchors,
                per_level=np.asarray(per_level),
                score_thresh=retinanet.score_thresh,
                nms_thresh=retinanet.nms_thresh,
                detections_per_img=retinanet.detections_per_img,
                topk_candidates=retinanet.topk_candidates,
                weights=np.asarray(retinanet.box_coder.weights, dtype=np.float64),
                bbox_xform_clip=retinanet.box_coder.bbox_xform_clip,
                size=dsize,
            )
            written["detector"] = out / "detector.onnx"
    log.info("exported %s to %s", ", ".join(written), out)
    return written


def _export(module: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False,
        )


def _decode(deltas: np.ndarray, anchors: np.ndarray, weights: np.ndarray, clip: float) -> np.ndarray:
    """torchvision's BoxCoder.decode_single in NumPy (float32 like the PyTorch path)."""
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = np.minimum(deltas[:, 2] / ww, np.float32(clip))
    dh = np.minimum(deltas[:, 3] / wh, np.float32(clip))
    pred_ctr_x, pred_ctr_y = dx * widths + ctr_x, dy * heights + ctr_y
    pred_w, pred_h = np.exp(dw) * widths, np.exp(dh) * heights
    half_w, half_h = np.float32(0.5) * pred_w, np.float32(0.5) * pred_h
    return np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=1)


class OnnxModels:
    """ONNX Runtime sessions for a bundle's exported graphs."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self.classifier = ort.InferenceSession(str(folder / "classifier.onnx"), options, providers=providers)
        self.detector = None
        self.anchor_info: dict[str, Any] = {}
        if (folder / "detector.onnx").exists():
            self.detector = ort.InferenceSession(str(folder / "detector.onnx"), options, providers=providers)
            data = np.load(folder / "detector_anchors.npz")
            self.anchor_info = {k: data[k] for k in data.files}

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path) -> OnnxModels:
        folder = Path(bundle_dir) / ONNX_DIR
        if not (folder / "classifier.onnx").exists():
            raise BundleError(bundle_dir, f"no ONNX models; run `lungopacity export-onnx {bundle_dir}` first")
        return cls(folder)

    @property
    def has_detector(self) -> bool:
        return self.detector is not None

    def classifier_logits(self, x: np.ndarray) -> np.ndarray:
        return self.classifier.run(None, {"image": x.astype(np.float32)})[0]

    def member_outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Members' logits ``(K, B, 3)`` and pooled features ``(K, B, D)`` (None from an export without them)."""
        outputs = self.classifier.run(None, {"image": x.astype(np.float32)})
        if len(outputs) < 3:
            return outputs[0][None], None
        return np.transpose(outputs[1], (1, 0, 2)), np.transpose(outputs[2], (1, 0, 2))

    def detect(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every member's decoded boxes and scores per image (network pixels), pooled."""
        from lungopacity.postprocess import pool_detections

        assert self.detector is not None
        cls_logits, deltas = self.detector.run(None, {"image": x.astype(np.float32)})
        if cls_logits.ndim == 3:  # exported before detectors had members: one member
            cls_logits, deltas = cls_logits[:, None], deltas[:, None]
        return pool_detections([self._decode_member(cls_logits[:, m], deltas[:, m])
                                for m in range(cls_logits.shape[1])])

    def _decode_member(self, cls_logits: np.ndarray, deltas: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """torchvision's ``postprocess_detections`` for one member's dense outputs ``(B, A, ...)``."""
        from lungopacity.postprocess import nms

        info = self.anchor_info
        anchors = info["anchors"].astype(np.float32)
        bounds = np.cumsum([0, *info["per_level"].tolist()])
        size = float(info["size"])
        results = []
        for b in range(cls_logits.shape[0]):
            boxes_all, scores_all = [], []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                logits = cls_logits[b, lo:hi].reshape(-1)  # one class: one logit per anchor
                scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
                keep = np.flatnonzero(scores > float(info["score_thresh"]))
                k = min(len(keep), int(info["topk_candidates"]))
                order = keep[np.argsort(-scores[keep], kind="stable")[:k]]
                boxes = _decode(deltas[b, lo:hi][order], anchors[lo:hi][order], info["weights"], float(info["bbox_xform_clip"]))
                boxes = np.clip(boxes, 0.0, size)
                boxes_all.append(boxes)
                scores_all.append(scores[order])
            boxes = np.concatenate(boxes_all) if boxes_all else np.zeros((0, 4), np.float32)
            scores = np.concatenate(scores_all) if scores_all else np.zeros(0, np.float32)
            kept = nms(boxes, scores, float(info["nms_thresh"]))[: int(info["detections_per_img"])]
            results.append((boxes[kept], scores[kept]))
        return results


__all__ = ["ClassifierEnsemble", "DenseRetinaNet", "DenseRetinaNets", "OnnxModels", "export_onnx", "math"]
