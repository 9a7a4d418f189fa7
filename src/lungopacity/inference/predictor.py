"""The predictor: a bundle loaded once, radiographs in, readings out.

For each image: decode it to the prepared size exactly as the training cache did, and
make the network input with the same function training used
(:mod:`lungopacity.data.preprocess`); run every classifier member (logits and pooled
features in one pass); average the logits and divide by the calibration temperature:
``image_probability`` is that P(opacity). When the bundle's decision source is the fusion
network, it takes sex / age / view and the ensemble's *uncalibrated* class probabilities
(what it was trained on: the out-of-fold probabilities), and its output is calibrated by
its own temperature. That calibrated probability of the deciding component is
``opacity_probability``; the same computed with each member alone gives the spread
(``member_*``, ``uncertain``). The applicability gate (header checks and the feature
distance, :mod:`lungopacity.inference.applicability`) decides whether the image gets a
decision at all. Boxes come from the detector, their scores multiplied by the
classifier's uncalibrated P(opacity) when the post-processing gates (the quantity it was
tuned with), post-processed as tuned on validation, in original pixels, and only for a
positive decision. docs/OUTPUTS.md defines every field.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungopacity.constants import CLASS_KEYS, LUNG_OPACITY
from lungopacity.data.preprocess import decode_prepared_with_pixels, network_input
from lungopacity.devices import resolve_device
from lungopacity.errors import BundleError, ConfigError
from lungopacity.inference.applicability import Applicability, ApplicabilityGate, dicom_tags, member_outputs
from lungopacity.inference.bundle import load_classifiers, load_detectors, load_fusion_part, read_manifest
from lungopacity.inference.manifest import BundleManifest, Preprocessing, scale_probability
from lungopacity.inference.metadata import METADATA_FIELDS, SOURCE_MISSING, resolve_metadata
from lungopacity.inference.schemas import Box, Prediction, Reading
from lungopacity.io.errors import ImageReadError
from lungopacity.io.images import DEFAULT_MAX_PIXELS, read_image
from lungopacity.metrics.classification import softmax
from lungopacity.postprocess import PostprocessConfig, apply_postprocess, pool_detections

log = logging.getLogger(__name__)

#: Longest side of the pictures made for people (the page's image, predict's PNGs).
DISPLAY_SIDE = 1024
#: JPEG quality of the page's display image: 80 keeps a noisy 1024-pixel radiograph under 200 kB.
DISPLAY_JPEG_QUALITY = 80
#: Longest side of the heatmap layer the page stretches over its image (the map is coarse).
HEAT_LAYER_SIDE = 256
#: zlib level of predict's PNGs: 1 writes about 3x faster than Pillow's 6 for ~15% more bytes.
PNG_COMPRESS_LEVEL = 1


@dataclass
class ImageInput:
    """One decoded image waiting for prediction.

    ``prepared`` holds the image as the training caches held it (uint8, one entry per
    (prepared size, window policy) the bundle's networks need); the full-resolution pixels
    for pictures are decoded from ``data`` only when asked for (:meth:`full_pixels`), with
    the classifier's window policy.
    """

    id: str
    data: bytes = field(repr=False)
    header: dict[str, Any]
    prepared: dict[tuple[int, str], np.ndarray] = field(repr=False)
    read_seconds: float = 0.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    window: str = "none"
    _pixels: np.ndarray | None = field(default=None, repr=False)
    _display: np.ndarray | None = field(default=None, repr=False)
    _tags: dict[str, str | None] | None = field(default=None, repr=False)

    @property
    def tags(self) -> dict[str, str | None]:
        """Modality, body part and raw view of a DICOM ({} for other formats), read once."""
        if self._tags is None:
            self._tags = dicom_tags(self.data)
        return self._tags

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) of the original image."""
        return int(self.header["rows"]), int(self.header["cols"])

    def full_pixels(self) -> np.ndarray:
        """The image at its original resolution, float32 in [0, 1] (decoded once, on demand)."""
        if self._pixels is None:
            self._pixels, _ = read_image(self.data, name=self.id, max_pixels=self.max_pixels, window=self.window)
        return self._pixels

    def display_pixels(self) -> np.ndarray:
        """The image at most :data:`DISPLAY_SIDE` pixels on its long side, float32 in [0, 1] (made once)."""
        if self._display is None:
            self._display = _display_pixels(self.full_pixels())
        return self._display

    def keep_display(self, decoded: np.ndarray) -> None:
        """Keep the display picture of pixels already decoded with the classifier's window.

        A reader may have decoded a JPEG at a reduced scale; when that is smaller than the
        display size, the file is decoded again in full when a picture is asked for.
        """
        rows, cols = self.size
        wanted = min(DISPLAY_SIDE, max(rows, cols))
        if max(decoded.shape) >= wanted:
            self._display = _display_pixels(np.asarray(decoded, dtype=np.float32))


class Predictor:
    """Everything needed to read radiographs, loaded from a bundle without training code paths."""

    def __init__(self, path: Path, manifest: BundleManifest, device: torch.device, max_pixels: int) -> None:
        self.path, self.manifest, self.device, self.max_pixels = path, manifest, device, max_pixels
        self.classifiers = load_classifiers(path, manifest, device)
        self.temperature = manifest.classifier.temperature
        self.classifier_preprocessing = manifest.classifier.preprocessing
        self.input_size = self.classifier_preprocessing.input_size
        self.fusion = load_fusion_part(path, manifest)
        self.detectors = load_detectors(path, manifest, device)
        self.detector_preprocessing = manifest.detector.preprocessing if manifest.detector else None
        # The members' boxes are pooled per image: WBF rescales by the number of sets pooled.
        self.postprocess = (replace(PostprocessConfig.from_dict(manifest.detector.postprocess),
                                    n_models=len(manifest.detector.members)) if manifest.detector else None)
        self.threshold = manifest.threshold.value
        self.decision_source = manifest.decision_source
        self.gate = ApplicabilityGate.from_bundle(path, manifest.applicability)
        self.warnings: list[str] = manifest.warnings()
        self.onnx = None
        # Each (prepared size, window policy) a network was trained on: decoded once per file.
        self.prepared_keys = sorted(
            {(p.prepared_size, p.window) for p in (self.classifier_preprocessing, self.detector_preprocessing)
             if p is not None}
        )

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        *,
        runtime: str = "torch",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Predictor:
        """Load a bundle folder (see :mod:`lungopacity.inference.bundle`).

        Args:
            path: the bundle folder.
            device: 'auto' (a CUDA GPU when there is one), 'cpu', 'cuda', 'cuda:N'.
            runtime: 'torch' or 'onnx' (ONNX Runtime on the models exported by
                ``lungopacity export-onnx``).
            max_pixels: refuse larger images (decompression bombs).

        Raises:
            BundleError: incompatible version, a missing or damaged part.
        """
        path = Path(path)
        device = resolve_device(device)
        manifest = read_manifest(path)
        predictor = cls(path, manifest, device, max_pixels)
        if runtime == "onnx":
            from lungopacity.inference.onnx import OnnxModels

            predictor.onnx = OnnxModels.from_bundle(path)
        elif runtime != "torch":
            raise ConfigError("--runtime", f"must be 'torch' or 'onnx', got {runtime!r}")
        log.info("loaded bundle %s (%s)", path, predictor.version)
        return predictor

    @property
    def version(self) -> str:
        return f"lungopacity {self.manifest.lungopacity_version} bundle {self.manifest.created}"

    @property
    def model_card(self) -> dict[str, Any]:
        return self.manifest.model_card

    # ----------------------------------------------------------------- inputs

    def load(self, source: str | Path | bytes, name: str | None = None, *, keep_display: bool = False) -> ImageInput:
        """Read one file (or its bytes) into an :class:`ImageInput`; raises ImageReadError.

        ``keep_display``: keep the display-size picture of the decode (for pictures
        later), so the file is not decoded a second time.
        """
        start = time.perf_counter()
        if name is None:
            name = Path(str(source)).name
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise ImageReadError(source, f"cannot read the file ({exc.strerror or exc})") from None
        prepared: dict[tuple[int, str], np.ndarray] = {}
        header: dict[str, Any] = {}
        decoded: np.ndarray | None = None
        for size, window in self.prepared_keys:
            prepared[(size, window)], decoded_header, pixels = decode_prepared_with_pixels(
                data, size, name=name, max_pixels=self.max_pixels, window=window
            )
            if window == self.classifier_preprocessing.window or not header:
                header = decoded_header  # the classifier's reading of the header (its window record)
            if window == self.classifier_preprocessing.window and (decoded is None or pixels.size > decoded.size):
                decoded = pixels
            del pixels
        image_id = Path(name).stem if name else "image"
        image = ImageInput(image_id, data, header, prepared, time.perf_counter() - start, self.max_pixels,
                           self.classifier_preprocessing.window)
        if keep_display and decoded is not None:
            image.keep_display(decoded)
        return image

    def network_batch(self, images: Sequence[ImageInput], preprocessing: Preprocessing) -> torch.Tensor:
        """The network input of a batch: the same :func:`network_input` as in training."""
        batch = np.stack([img.prepared[(preprocessing.prepared_size, preprocessing.window)] for img in images])
        return network_input(batch, size=preprocessing.input_size, device=self.device)

    def classifier_input(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self.network_batch(images, self.classifier_preprocessing)

    def detector_input(self, images: Sequence[ImageInput]) -> torch.Tensor:
        assert self.detector_preprocessing is not None
        return self.network_batch(images, self.detector_preprocessing)

    # -------------------------------------------------------------- prediction

    def member_logits_and_features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Every member's logits ``(K, B, 3)`` and pooled features ``(K, B, D)`` (None if the runtime has none)."""
        if self.onnx is not None:
            return self.onnx.member_outputs(x.cpu().numpy())
        return member_outputs(self.classifiers, x)

    def classify(self, x: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities (B, 3) of the ensemble for network inputs in [0, 1]."""
        logits, _ = self.member_logits_and_features(x)
        return softmax(logits.mean(0).astype(np.float64), self.temperature)

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Raw detector boxes (network pixels, xyxy) and scores per image, every member's pooled."""
        if self.onnx is not None and self.onnx.has_detector:
            return self.onnx.detect(x.cpu().numpy())
        per_member = []
        for detector in self.detectors:
            outputs = detector([img for img in x])
            per_member.append([(o["boxes"].cpu().numpy(), o["scores"].cpu().numpy()) for o in outputs])
        return pool_detections(per_member)

    def _fused(self, metadata: list[dict[str, Any]], probabilities: np.ndarray) -> tuple[np.ndarray, Any]:
        """Calibrated fused P(opacity) from uncalibrated class probabilities ``(B, 3)``, and the raw prediction."""
        assert self.fusion is not None and self.manifest.fusion is not None
        rows = [{**meta, **{f"p_{k}": float(p[i]) for i, k in enumerate(CLASS_KEYS)}}
                for meta, p in zip(metadata, probabilities)]
        fused = self.fusion.predict(rows)
        raw = np.asarray(fused.probability, dtype=np.float64).reshape(-1)
        return scale_probability(raw, self.manifest.fusion.temperature), fused

    def _imputed(self, missing: list[str]) -> dict[str, float]:
        """The fusion input values that replaced the missing fields (training statistics)."""
        encoder = self.fusion.encoder
        values = {"sex": ("sex_male", encoder.fraction_male), "age": ("age", encoder.median_age_years),
                  "view": ("view_ap", encoder.fraction_ap)}
        return {values[k][0]: round(float(values[k][1]), 4) for k in missing
                if k in values and values[k][0] in encoder.features and values[k][1] is not None}

    def predict_images(
        self,
        images: Sequence[ImageInput],
        given: Sequence[dict[str, Any] | None] | None = None,
        *,
        override: bool = False,
    ) -> list[Prediction]:
        """Predictions for a batch of decoded images.

        Args:
            images: decoded images (:meth:`load`).
            given: per image, validated sex / age / view given by the user
                (:func:`lungopacity.inference.metadata.parse_given`), or None.
            override: given values replace the header's (default: fill only what it lacks).
        """
        if not images:
            return []
        given = given or [None] * len(images)
        t0 = time.perf_counter()
        member_logits, member_features = self.member_logits_and_features(self.classifier_input(images))
        member_logits = member_logits.astype(np.float64)
        mean_logits = member_logits.mean(0)
        probs = softmax(mean_logits, self.temperature)  # calibrated: what is reported
        raw = softmax(mean_logits)  # uncalibrated: the fusion input and the box gating factor
        t1 = time.perf_counter()
        resolved = [resolve_metadata(img.header, g, override=override) for img, g in zip(images, given)]
        metadata = [values for values, _ in resolved]
        if self.decision_source == "fusion":
            opacity, fused = self._fused(metadata, raw)
            members = np.stack([self._fused(metadata, softmax(z))[0] for z in member_logits])
            missing = [fused.missing_fields(i) for i in range(len(images))]
        else:
            opacity = probs[:, LUNG_OPACITY]
            members = np.stack([softmax(z, self.temperature)[:, LUNG_OPACITY] for z in member_logits])
            missing = [[k for k in METADATA_FIELDS if sources[k] == SOURCE_MISSING] for _, sources in resolved]
        distances = self.gate.feature_distance(member_features) if member_features is not None else None
        verdicts = [
            self.gate.check(img.size, meta, img.tags, None if distances is None else float(distances[i]),
                            modality=img.header.get("modality"))
            for i, (img, meta) in enumerate(zip(images, metadata))
        ]
        t2 = time.perf_counter()
        gates = self.postprocess is not None and self.postprocess.gating != "none"
        boxes_per_image: list[list[Box]] = [[] for _ in images]
        has_detector = bool(self.detectors) or (self.onnx is not None and self.onnx.has_detector)
        if has_detector:
            for i, (img, (boxes, scores)) in enumerate(zip(images, self.detect(self.detector_input(images)))):
                boxes_per_image[i] = self._final_boxes(img, boxes, scores, float(raw[i, LUNG_OPACITY]))
        t3 = time.perf_counter()
        predictions = []
        n = len(images)
        for i, img in enumerate(images):
            verdict = verdicts[i]
            decision = bool(opacity[i] >= self.threshold) if verdict.applicable else None
            spread = members[:, i]
            boxes = boxes_per_image[i] if decision else []
            predictions.append(
                Prediction(
                    id=img.id,
                    probabilities={k: float(probs[i, j]) for j, k in enumerate(CLASS_KEYS)},
                    opacity_probability=float(opacity[i]),
                    decision=decision,
                    threshold=self.threshold,
                    image_probability=float(probs[i, LUNG_OPACITY]),
                    decision_source=self.decision_source,
                    boxes=boxes,
                    boxes_note=_boxes_note(decision, verdict, has_detector, boxes),
                    box_gating_factor=round(float(raw[i, LUNG_OPACITY]), 4) if has_detector and gates else None,
                    member_probabilities=[round(float(v), 4) for v in spread],
                    member_std=float(spread.std()),
                    member_min=float(spread.min()),
                    member_max=float(spread.max()),
                    uncertain=bool(spread.min() < self.threshold <= spread.max()),
                    applicable=verdict.applicable,
                    not_applicable_reasons=verdict.reasons,
                    unchecked=verdict.unchecked,
                    feature_distance=verdict.feature_distance,
                    metadata=metadata[i],
                    metadata_source=resolved[i][1],
                    missing=missing[i],
                    imputed=self._imputed(missing[i]) if self.decision_source == "fusion" else {},
                    image_size=img.size,
                    timings={
                        "read": round(img.read_seconds, 4),
                        "classify": round((t1 - t0) / n, 4),
                        "fuse_and_check": round((t2 - t1) / n, 4),
                        "detect": round((t3 - t2) / n, 4),
                    },
                    model_version=self.version,
                    model_warnings=list(self.warnings),
                )
            )
        return predictions

    def _final_boxes(self, img: ImageInput, boxes: np.ndarray, scores: np.ndarray, gating_factor: float) -> list[Box]:
        """Post-processed boxes in original pixels; ``box_confidence`` = detector score x gating factor."""
        assert self.detector_preprocessing is not None and self.postprocess is not None
        rows, cols = img.size
        side = float(self.detector_preprocessing.input_size)
        scale = np.array([cols, rows, cols, rows], dtype=np.float32) / side
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale
        boxes, confidence = apply_postprocess(boxes, np.asarray(scores, dtype=np.float32), gating_factor,
                                              self.postprocess)
        factor = gating_factor if self.postprocess.gating != "none" else 1.0
        return [Box(*(round(float(v), 1) for v in b), box_confidence=round(float(c), 4),
                    detector_score=round(float(c) / factor, 4) if factor > 0 else None)
                for b, c in zip(boxes, confidence)]

    # ------------------------------------------------------------- pictures

    def heatmaps(self, images: Sequence[ImageInput], *, native: bool = False) -> list[np.ndarray]:
        """Grad-CAM maps of the Lung Opacity class, at each image's original size.

        ``native``: leave each map at the network's input size (what a picture resizes
        to its own size anyway).
        """
        from lungopacity.inference.gradcam import grad_cam

        maps = grad_cam(self.classifiers, self.classifier_input(images))
        if native:
            return [np.asarray(cam, dtype=np.float32) for cam in maps]
        return [_resize_float(cam, *img.size) for img, cam in zip(images, maps)]

    def pictures(self, image: ImageInput, prediction: Prediction, heatmap: np.ndarray | None) -> tuple[bytes, bytes | None]:
        """``predict``'s pictures at display size: the overlay PNG (boxes and scores over the
        image) and the heatmap PNG (the map over the image, the boxes on top, a colour bar)."""
        from lungopacity.reports.overlays import heatmap_picture, overlay_image, png_bytes

        display = image.display_pixels()
        scale = (display.shape[1] / image.size[1], display.shape[0] / image.size[0])
        boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in prediction.boxes], dtype=np.float32).reshape(-1, 4)
        scores = np.array([b.box_confidence for b in prediction.boxes], dtype=np.float32)
        overlay = png_bytes(overlay_image(display, None, boxes, scores, scale=scale), compress_level=PNG_COMPRESS_LEVEL)
        heat_png = None
        if heatmap is not None:
            from lungopacity.inference.gradcam import HEATMAP_TITLE

            picture = heatmap_picture(display, heatmap, boxes, scores, scale=scale, title=HEATMAP_TITLE)
            heat_png = png_bytes(picture, compress_level=PNG_COMPRESS_LEVEL)
        return overlay, heat_png

    def display_jpeg(self, image: ImageInput) -> bytes:
        """The radiograph at display size as a grey JPEG (what the page draws its boxes over)."""
        from PIL import Image

        grey = np.clip(np.rint(image.display_pixels() * 255.0), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buffer, format="JPEG", quality=DISPLAY_JPEG_QUALITY)
        return buffer.getvalue()

    def heatmap_layer_png(self, image: ImageInput, heatmap: np.ndarray) -> bytes:
        """The heatmap as an RGBA PNG layer (viridis, transparent outside the content and where low),
        at most :data:`HEAT_LAYER_SIDE` on its long side, with the display image's aspect ratio."""
        from lungopacity.reports.overlays import heatmap_layer, png_bytes

        display = image.display_pixels()
        factor = min(1.0, HEAT_LAYER_SIDE / max(display.shape))
        size = (max(1, round(display.shape[0] * factor)), max(1, round(display.shape[1] * factor)))
        return png_bytes(heatmap_layer(display, heatmap, size=size), mode="RGBA")

    def read(
        self,
        data: bytes,
        name: str,
        *,
        sex: str | None = None,
        age: float | None = None,
        view: str | None = None,
        with_images: bool = True,
        with_heatmap: bool = False,
        override: bool = True,
    ) -> Reading:
        """One upload in, one reading out (what the web service calls).

        ``sex``/``age``/``view`` are values a person gave for this image (already
        validated); they replace the header's unless ``override`` is False.
        ``with_images``: add the display-size grey JPEG (:meth:`display_jpeg`; the page
        draws the boxes itself). ``with_heatmap``: add the Grad-CAM layer
        (:meth:`heatmap_layer_png`), which costs a backward pass of every member.

        Raises:
            ImageReadError: the content is not a readable radiograph.
        """
        start = time.perf_counter()
        image = self.load(data, name=name, keep_display=with_images or with_heatmap)
        (prediction,) = self.predict_images([image], [{"sex": sex, "age": age, "view": view}], override=override)
        reading = Reading(prediction)
        if with_images:
            t = time.perf_counter()
            reading.display_jpeg = self.display_jpeg(image)
            reading.display_size = tuple(int(v) for v in image.display_pixels().shape)
            prediction.timings["display_image"] = round(time.perf_counter() - t, 4)
        if with_heatmap:
            t = time.perf_counter()
            (heatmap,) = self.heatmaps([image], native=True)
            reading.heatmap_layer_png = self.heatmap_layer_png(image, heatmap)
            prediction.timings["heatmap"] = round(time.perf_counter() - t, 4)
        prediction.timings["total"] = round(time.perf_counter() - start, 4)
        return reading

    def iter_predict(
        self,
        items: Sequence[tuple[Path, str, dict[str, Any] | None]],
        *,
        batch_size: int = 16,
        with_images: bool = False,
        override: bool = False,
    ) -> Iterator[BatchOutcome]:
        """Predict files batch by batch; every failure stays with its file and the batches go on.

        Args:
            items: ``(path, id, given metadata or None)`` per file.
            batch_size: images per forward pass.
            with_images: also make the overlay and heatmap PNGs.
            override: given metadata replaces the header's (default: fills only what it lacks).

        Yields:
            One :class:`BatchOutcome` per batch: the readings, and ``(path, reason)`` for
            each file that could not be read or predicted. With pictures, the batch's
            Grad-CAM maps are made in one pass and its pictures drawn and encoded by a
            pool of threads (Pillow and NumPy release the interpreter lock there).
        """
        if not with_images:
            yield from self._iter_predict(items, batch_size, override, None)
            return
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                thread_name_prefix="pictures") as pool:
            yield from self._iter_predict(items, batch_size, override, pool)

    def _iter_predict(
        self,
        items: Sequence[tuple[Path, str, dict[str, Any] | None]],
        batch_size: int,
        override: bool,
        pool: ThreadPoolExecutor | None,
    ) -> Iterator[BatchOutcome]:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            outcome = BatchOutcome()
            loaded: list[tuple[Path, ImageInput, dict[str, Any] | None]] = []
            for path, image_id, given in chunk:
                try:
                    image = self.load(path, name=str(path), keep_display=pool is not None)
                except ImageReadError as exc:
                    outcome.errors.append((path, exc.cause))
                    log.warning("%s", exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - one file must never stop the batch
                    outcome.errors.append((path, f"could not be read ({type(exc).__name__}: {exc})"))
                    log.warning("%s: could not be read", path, exc_info=True)
                    continue
                image.id = image_id
                loaded.append((path, image, given))
            for group in self._predictable_groups(loaded, override, outcome):
                if pool is None:
                    outcome.readings.extend((path, Reading(prediction)) for path, _, prediction in group)
                else:
                    outcome.readings.extend(self._with_pictures(group, pool))
            yield outcome

    def _predictable_groups(
        self,
        loaded: list[tuple[Path, ImageInput, dict[str, Any] | None]],
        override: bool,
        outcome: BatchOutcome,
    ) -> Iterator[list[tuple[Path, ImageInput, Prediction]]]:
        """The batch's predictions; when the batch fails, each image alone, so only the bad one is lost."""
        if not loaded:
            return
        try:
            predictions = self.predict_images([img for _, img, _ in loaded], [g for _, _, g in loaded], override=override)
        except Exception as exc:  # noqa: BLE001 - a batch that fails is retried image by image
            if len(loaded) == 1:
                log.warning("%s: prediction failed", loaded[0][0], exc_info=True)
                outcome.errors.append((loaded[0][0], f"prediction failed ({type(exc).__name__}: {exc})"))
                return
            for item in loaded:
                yield from self._predictable_groups([item], override, outcome)
            return
        yield [(path, img, p) for (path, img, _), p in zip(loaded, predictions)]

    def _with_pictures(self, group: list[tuple[Path, ImageInput, Prediction]],
                       pool: ThreadPoolExecutor) -> list[tuple[Path, Reading]]:
        """The group's readings with their pictures: one Grad-CAM pass, the drawing in the pool."""
        try:
            maps: list[np.ndarray | None] = list(self.heatmaps([img for _, img, _ in group], native=True))
        except Exception:  # noqa: BLE001 - the overlays can still be drawn
            log.warning("Grad-CAM failed for a batch; its pictures have no heatmap", exc_info=True)
            maps = [None] * len(group)
        jobs = [pool.submit(self.pictures, img, prediction, heat) for (_, img, prediction), heat in zip(group, maps)]
        readings = []
        for (path, image, prediction), job in zip(group, jobs):
            try:
                overlay, heat_png = job.result()
            except Exception:  # noqa: BLE001 - the reading stands without its pictures
                log.warning("%s: pictures could not be drawn; the reading is kept without them", image.id,
                            exc_info=True)
                readings.append((path, Reading(prediction)))
                continue
            image._display = image._pixels = None  # the batch's pictures are done: free the pixels
            readings.append((path, Reading(prediction, overlay, heat_png)))
        return readings


def _boxes_note(decision: bool | None, verdict: Applicability, has_detector: bool, boxes: list[Box]) -> str | None:
    """Why there is no box where a reader would expect one (None when nothing needs saying)."""
    if decision is None:
        return "no decision: the image failed the applicability check, so no boxes are given"
    if not decision or boxes:
        return None
    if not has_detector:
        return "opacity found, but this bundle has no detector: no location is given"
    return "opacity found, but no box passed the detector's threshold: the location is not known"


@dataclass
class BatchOutcome:
    """What one batch of :meth:`Predictor.iter_predict` produced."""

    readings: list[tuple[Path, Reading]] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)


def _resize_float(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from PIL import Image

    if array.shape == (rows, cols):
        return array.astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def _display_pixels(pixels: np.ndarray, longest: int = DISPLAY_SIDE) -> np.ndarray:
    """The image at most ``longest`` pixels on its long side (pictures for people, not models)."""
    rows, cols = pixels.shape
    scale = min(1.0, longest / max(rows, cols))
    if scale >= 1.0:
        return pixels
    return _resize_float(pixels, max(1, round(rows * scale)), max(1, round(cols * scale)))


__all__ = ["BatchOutcome", "BundleError", "ImageInput", "Predictor"]
