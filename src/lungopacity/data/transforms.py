"""Augmentation on image tensors, written once for batches and moving boxes with the image.

Every transform works on a batch ``(B, 1, H, W)`` of float images in [0, 1] on any device
(so on the GPU it costs the data loader nothing) and, where it moves pixels, on the
boxes of each image (xyxy in the same pixels). A single image is a batch of one.

The geometric part is one affine map per image (scale, shift, rotation, optional
horizontal flip) applied with ``grid_sample``; each box is replaced by the box that
encloses its four mapped corners, clipped to the image. Boxes that fall (almost)
outside are dropped, so a shifted positive image can become a negative one only when
its opacity really left the field of view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Ranges of the random transforms (0 disables one)."""

    scale: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.06  # fraction of the image side
    max_rotation: float = 7.0  # degrees
    hflip_probability: float = 0.0  # off by default: the heart's side is anatomy, not noise
    brightness: float = 0.08  # additive, in [0, 1] units
    contrast: float = 0.15  # multiplicative about the mean: 1 +- contrast
    gamma: float = 0.2  # exponent in exp(+-gamma)
    min_box_area_kept: float = 0.25  # a box keeps at least this share of its area or is dropped

    def to_dict(self) -> dict:
        return asdict(self)


def random_affine_matrices(
    batch: int, config: AugmentConfig, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Forward maps ``(B, 3, 3)`` in normalised coordinates [-1, 1]: input point -> output point."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    scale = uniform(*config.scale)
    angle = uniform(-config.max_rotation, config.max_rotation) * math.pi / 180.0
    shift_x = uniform(-config.max_shift, config.max_shift) * 2.0
    shift_y = uniform(-config.max_shift, config.max_shift) * 2.0
    flip = torch.where(torch.rand(batch, generator=generator) < config.hflip_probability, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    matrices = torch.zeros(batch, 3, 3)
    matrices[:, 0, 0] = cos * flip
    matrices[:, 0, 1] = -sin
    matrices[:, 1, 0] = sin * flip
    matrices[:, 1, 1] = cos
    matrices[:, 0, 2] = shift_x
    matrices[:, 1, 2] = shift_y
    matrices[:, 2, 2] = 1.0
    return matrices.to(device)


def apply_affine(images: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Warp a batch with forward maps (normalised coords, align_corners=False); outside is black."""
    inverse = torch.linalg.inv(forward.to(images.dtype if images.is_floating_point() else torch.float32))
    grid = F.affine_grid(inverse[:, :2, :], list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_boxes(
    boxes: list[torch.Tensor], forward: torch.Tensor, height: int, width: int, min_area_kept: float = 0.25
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Map each image's xyxy boxes (pixels) with its forward map.

    Returns the new boxes and, per image, the boolean mask of the input boxes kept.
    """
    out_boxes, kept = [], []
    for b, image_boxes in enumerate(boxes):
        if image_boxes.numel() == 0:
            out_boxes.append(image_boxes.reshape(0, 4))
            kept.append(torch.zeros(0, dtype=torch.bool, device=image_boxes.device))
            continue
        m = forward[b].to(image_boxes.device, torch.float32)
        x1, y1, x2, y2 = image_boxes.float().unbind(1)
        corners_x = torch.stack([x1, x2, x2, x1], 1)
        corners_y = torch.stack([y1, y1, y2, y2], 1)
        # pixels -> normalised (align_corners=False): u = (x + 0.5) / W * 2 - 1 ... we use edges: u = x / W * 2 - 1
        u = corners_x / width * 2 - 1
        v = corners_y / height * 2 - 1
        mu = m[0, 0] * u + m[0, 1] * v + m[0, 2]
        mv = m[1, 0] * u + m[1, 1] * v + m[1, 2]
        px = (mu + 1) / 2 * width
        py = (mv + 1) / 2 * height
        new = torch.stack([px.min(1).values, py.min(1).values, px.max(1).values, py.max(1).values], 1)
        unclipped_area = (new[:, 2] - new[:, 0]) * (new[:, 3] - new[:, 1])
        new[:, [0, 2]] = new[:, [0, 2]].clamp(0, width)
        new[:, [1, 3]] = new[:, [1, 3]].clamp(0, height)
        area = (new[:, 2] - new[:, 0]).clamp(min=0) * (new[:, 3] - new[:, 1]).clamp(min=0)
        keep = area >= min_area_kept * unclipped_area.clamp(min=1e-6)
        keep &= (new[:, 2] - new[:, 0] >= 1) & (new[:, 3] - new[:, 1] >= 1)
        out_boxes.append(new[keep].to(image_boxes.dtype))
        kept.append(keep)
    return out_boxes, kept


def random_intensity(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image brightness, contrast and gamma; the result stays in [0, 1]."""
    batch = images.shape[0]
    shape = (batch, 1, 1, 1)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(batch, generator=generator)).view(shape).to(images.device, images.dtype)

    gamma = torch.exp(uniform(-config.gamma, config.gamma))
    out = images.clamp(0, 1) ** gamma
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(1 - config.contrast, 1 + config.contrast) + mean
    out = out + uniform(-config.brightness, config.brightness)
    return out.clamp(0, 1)


class BatchAugment:
    """Random geometry + intensity for a batch, boxes moved with the pixels.

    ``augment(images)`` or ``augment(images, boxes)`` -> ``(images, boxes)``.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int | None = None) -> None:
        self.config = config or AugmentConfig()
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(
        self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        forward = random_affine_matrices(images.shape[0], self.config, self.generator, images.device)
        images = apply_affine(images, forward)
        if boxes is not None:
            boxes, _ = affine_boxes(boxes, forward, images.shape[-2], images.shape[-1], self.config.min_box_area_kept)
        images = random_intensity(images, self.config, self.generator)
        return images, boxes

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def augment_sample(sample: dict, augment: BatchAugment) -> dict:
    """Dict wrapper: augment one sample ``{"image": (1,H,W) float, "boxes": (N,4), ...}``."""
    images, boxes = augment(sample["image"][None], [sample["boxes"]] if "boxes" in sample else None)
    out = dict(sample)
    out["image"] = images[0]
    if boxes is not None:
        out["boxes"] = boxes[0]
    return out
