"""Shared fixtures: where the real data lives, and small DICOM builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RSNA_DIR = SHARED_DATA / "rsna"
RSNA_DICOM_DIR = SHARED_DATA / "rsna-dicom"


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a real-data path is absent."""
    if not path.exists():
        pytest.skip(f"real RSNA data not available at {path} (see ../shared/README.md)")
    return path


@pytest.fixture
def rsna_dir() -> Path:
    return require(RSNA_DIR / "stage_2_train_labels.csv").parent


@pytest.fixture
def rsna_dicom_dir() -> Path:
    return require(RSNA_DICOM_DIR / "stage_2_train_labels.csv").parent


def make_uncompressed_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    sex: str = "F",
    age: str = "051Y",
    view: str = "PA",
) -> Path:
    """Write an Explicit VR Little Endian DICOM holding ``stored`` as its raw values."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "test-patient"
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = sex, age, view
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelSpacing = [0.143, 0.143]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (8, True): np.int8, (16, True): np.int16}[(allocated, signed)]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory):
    """The whole demo chain at toy size (about a minute): data, cache, runs and a bundle.

    Shared by the predictor, bundle, ONNX and service tests. The models are barely
    trained: these tests check plumbing and contracts, not accuracy.
    """
    from lungopacity.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("tiny_demo")
    settings = DemoSettings(
        n_patients=48, image_size=128, cache_size=64, classifier_folds=2, classifier_epochs=1,
        detector_epochs=1, n_predict=3,
    )
    return run_demo(out, settings)
