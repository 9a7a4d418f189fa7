"""The reader's guarantee under hostile input (issue 12, deliverables 1, 2 and 6).

A few hundred seeded mutations of real-format files (tests/fuzzing.py: the synthetic
RSNA writer's JPEG DICOM, 12/16-bit, Deflated, RLE, JPEG 2000, JPEG-LS, JPEG Lossless and
12-bit JPEG DICOMs, PNG/JPEG/TIFF, and the 16 shared real DICOMs when present), plus
decompression bombs. For every case ``read_image`` either returns a finite float32
``H x W`` image in [0, 1] or raises ImageReadError with a one-line ``"<name>: <cause>"``;
``read_dicom_header`` raises nothing else either. benchmarks/bench_fuzz.py runs the same
generator at 10,000 cases and measures memory.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from fuzzing import check_outcome, iter_cases, make_bombs, make_seeds
from lungopacity.io import ImageReadError, read_image
from lungopacity.io.dicom import read_dicom_header

N_CASES = 1000


@pytest.fixture(scope="module")
def corpus():
    return make_seeds(), make_bombs(scale=1)


def test_every_mutated_file_is_read_or_refused_with_one_line(corpus, caplog: pytest.LogCaptureFixture) -> None:
    seeds, bombs = corpus
    caplog.set_level(logging.ERROR)
    outcomes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in iter_cases(N_CASES, seed=12, seeds=seeds, bombs=bombs, bomb_every=40):
            outcome = check_outcome(case, read_image, ImageReadError)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if case.data[128:132] == b"DICM":
                try:
                    header = read_dicom_header(case.data, name=f"case{case.index}")
                except ImageReadError as exc:
                    assert str(exc).startswith(f"case{case.index}: ") and "\n" not in str(exc)
                else:
                    assert isinstance(header, dict) and "window" in header
    # Both outcomes occur in quantity: the corpus exercises decoding, not only refusals.
    assert outcomes.get("ok", 0) > N_CASES // 10 and outcomes.get("refused", 0) > N_CASES // 4, outcomes


def test_every_bomb_is_refused_or_bounded(corpus) -> None:
    seeds, bombs = corpus
    expected_refusals = {
        "bomb_deflate_declares_20000": "exceeds the limit",
        "bomb_deflate_long_pixels": "decompression bomb",
        "bomb_deflate_private_element": "header inflates to more than",
        "bomb_png_declares_60000": "exceeds the limit",
    }
    for name, data in bombs.items():
        try:
            pixels, header = read_image(data, name=name)
        except ImageReadError as exc:
            assert name not in ("bomb_deflate_valid_large", "bomb_png_valid_large", "bomb_jpeg_valid_large"), str(exc)
            if name in expected_refusals:
                assert expected_refusals[name] in str(exc), str(exc)
            continue
        assert name not in expected_refusals, f"{name} was accepted"
        assert pixels.dtype.name == "float32" and float(pixels.max()) <= 1.0


def test_the_corpus_is_deterministic(corpus) -> None:
    seeds, bombs = corpus
    first = [(c.seed, c.mutation, c.data) for c in iter_cases(30, seed=3, seeds=seeds, bombs=bombs)]
    again = [(c.seed, c.mutation, c.data) for c in iter_cases(30, seed=3, seeds=seeds, bombs=bombs)]
    assert first == again and len({d for _, _, d in first}) > 25
