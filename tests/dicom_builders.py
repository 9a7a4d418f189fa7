"""Small DICOM builders for the reader tests: hand-built pixels in, file bytes out."""

from __future__ import annotations

import io

import numpy as np


def dataset(stored: np.ndarray, *, bits_stored: int, signed: bool = False, photometric: str = "MONOCHROME2"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = "2.25.42"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("fuzz", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "fuzz"
    ds.PatientSex, ds.PatientAge, ds.ViewPosition, ds.Modality = "F", "051Y", "PA", "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = [0.14, 0.14]
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (8, True): np.int8, (16, True): np.int16}[(allocated, signed)]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    return ds


def save(ds, syntax: str | None = None) -> bytes:
    buf = io.BytesIO()
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated(ds, codestream: bytes, syntax: str) -> bytes:
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return save(ds, syntax)
