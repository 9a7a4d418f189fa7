"""Facts shared by every layer: class names, label codes and the image size of RSNA.

This module imports nothing from the package, so ``io``, ``data``, ``models``,
``metrics``, ``engine``, ``inference`` and ``service`` may all depend on it
without breaking the one-way import rule.
"""

from __future__ import annotations

#: The three RSNA classes, in label-code order (0, 1, 2).  The index of a class
#: here is its integer label everywhere in the package and the column order of
#: every probability array.
CLASS_NAMES: tuple[str, str, str] = (
    "Normal",
    "No Lung Opacity / Not Normal",
    "Lung Opacity",
)
#: Short names used for file columns (``p_normal``, ...).
CLASS_KEYS: tuple[str, str, str] = ("normal", "not_normal", "lung_opacity")

NORMAL, NOT_NORMAL, LUNG_OPACITY = 0, 1, 2
#: P(opacity) of the classifier is the probability of this class.
OPACITY_CLASS = LUNG_OPACITY

#: RSNA radiographs are 1024 x 1024.
RSNA_IMAGE_SIZE = 1024

VIEWS: tuple[str, str] = ("AP", "PA")
SEXES: tuple[str, str] = ("M", "F")
