"""Box-aware augmentation: boxes move with the pixels; intensity stays in range."""

from __future__ import annotations

import numpy as np
import torch

from lungopacity.data.transforms import (
    AugmentConfig,
    BatchAugment,
    affine_boxes,
    apply_affine,
    augment_sample,
    random_affine_matrices,
)


def _bright_box_images(boxes: list[list[int]], size: int = 96) -> torch.Tensor:
    images = torch.zeros(len(boxes), 1, size, size)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        images[i, 0, y1:y2, x1:x2] = 1.0
    return images


def _extent(image: torch.Tensor, level: float = 0.5) -> list[float]:
    ys, xs = np.nonzero(image[0].numpy() > level)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_identity_config_changes_nothing() -> None:
    config = AugmentConfig(scale=(1, 1), max_shift=0, max_rotation=0, brightness=0, contrast=0, gamma=0)
    images = torch.rand(3, 1, 32, 32)
    boxes = [torch.tensor([[2.0, 3.0, 10.0, 20.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    out, out_boxes = BatchAugment(config, seed=0)(images, boxes)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    for a, b in zip(out_boxes, boxes):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_boxes_follow_the_pixels_under_scale_shift_and_flip() -> None:
    config = AugmentConfig(scale=(0.8, 1.2), max_shift=0.1, max_rotation=0.0, hflip_probability=0.5)
    gen = torch.Generator().manual_seed(1)
    boxes_px = [[20, 30, 50, 70], [40, 10, 60, 40], [10, 50, 30, 80], [30, 30, 70, 60]]
    images = _bright_box_images(boxes_px)
    forward = random_affine_matrices(len(boxes_px), config, gen)
    warped = apply_affine(images, forward)
    mapped, kept = affine_boxes([torch.tensor([b], dtype=torch.float32) for b in boxes_px], forward, 96, 96)
    for i in range(len(boxes_px)):
        assert kept[i].all()
        np.testing.assert_allclose(mapped[i][0].numpy(), _extent(warped[i]), atol=1.01)


def test_rotated_box_encloses_the_rotated_opacity() -> None:
    config = AugmentConfig(scale=(1, 1), max_shift=0, max_rotation=10.0)
    gen = torch.Generator().manual_seed(0)
    images = _bright_box_images([[30, 20, 60, 70]])
    forward = random_affine_matrices(1, config, gen)
    warped = apply_affine(images, forward)
    (mapped,), _ = affine_boxes([torch.tensor([[30.0, 20.0, 60.0, 70.0]])], forward, 96, 96)
    x1, y1, x2, y2 = _extent(warped[0], level=0.5)
    bx1, by1, bx2, by2 = mapped[0].tolist()
    assert bx1 <= x1 + 1 and by1 <= y1 + 1 and bx2 >= x2 - 1 and by2 >= y2 - 1


def test_box_shifted_out_of_view_is_dropped() -> None:
    forward = torch.eye(3)[None].clone()
    forward[0, 0, 2] = 1.8  # shift right by 90 % of the width: +86.4 px
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [0.0, 0.0, 20.0, 20.0]])
    (mapped,), (kept,) = affine_boxes([boxes], forward, 96, 96)
    # The first box leaves the image; the second keeps 9.6 of its 20 px width (48 %).
    assert kept.tolist() == [False, True]
    np.testing.assert_allclose(mapped.numpy(), [[86.4, 0.0, 96.0, 20.0]], atol=1e-4)


def test_intensity_stays_in_unit_range_and_sample_wrapper_keeps_keys() -> None:
    augment = BatchAugment(AugmentConfig(brightness=0.5, contrast=0.5, gamma=0.5), seed=3)
    sample = {"image": torch.rand(1, 40, 40), "boxes": torch.tensor([[5.0, 5.0, 20.0, 30.0]]), "label": 2}
    out = augment_sample(sample, augment)
    assert out["label"] == 2 and out["image"].shape == (1, 40, 40)
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert out["boxes"].shape == (1, 4)


def test_same_seed_same_augmentation() -> None:
    images = torch.rand(4, 1, 24, 24)
    a, _ = BatchAugment(seed=7)(images)
    b, _ = BatchAugment(seed=7)(images)
    torch.testing.assert_close(a, b)
