"""Write the JPEG Lossless test fixtures beside this script (run by hand, not by the tests).

pydicom ships no JPEG Lossless (Process 14) test file offline, so these small files were
encoded by an implementation independent of the reader's decoder (GDCM, via python-gdcm)
from the hand-built pixels that ``tests/test_dicom_syntaxes.py`` rebuilds and compares
with exactly::

    pip install python-gdcm   # BSD; needed only to regenerate the fixtures
    python tests/data/make_jpeg_lossless_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fixture_pixels import lossless_fixture_pixels  # noqa: E402

FIXTURES = {
    # name: (transfer syntax (gdcm), bits stored, signed)
    "jpeg_lossless_p14_u12.dcm": ("JPEGLosslessProcess14", 12, False),
    "jpeg_lossless_sv1_s16.dcm": ("JPEGLosslessProcess14_1", 16, True),
    "jpeg_lossless_sv1_u8.dcm": ("JPEGLosslessProcess14_1", 8, False),
}


def write_uncompressed(path: Path, stored: np.ndarray, bits: int, signed: bool) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = "2.25.1234567890" + str(bits) + str(int(signed))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "fixture"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    allocated = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(allocated, signed)]
    ds.PixelData = stored.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    import gdcm

    for name, (syntax, bits, signed) in FIXTURES.items():
        plain = HERE / ("_plain_" + name)
        write_uncompressed(plain, lossless_fixture_pixels(bits, signed), bits, signed)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(HERE / name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        plain.unlink()
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
