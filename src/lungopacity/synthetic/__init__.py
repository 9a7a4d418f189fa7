"""Synthetic RSNA-format data: procedural chest radiograph phantoms.

The embedded default dataset for the demo and the tests.  :func:`make_phantom` draws one
phantom in memory (pixels in [0, 1], opacity boxes xyxy, RSNA-like header facts);
:func:`write_demo_dataset` writes ``n`` of them as an RSNA-format folder (label CSVs and
JPEG Baseline DICOMs); :func:`write_dicom` writes any 2-D array as a chest DICOM.
Synthetic DICOMs carry :data:`SYNTHETIC_MARKER` in ImageComments and
DeidentificationMethod.
"""

from lungopacity.synthetic.phantom import (
    NOT_NORMAL_FINDINGS,
    PatientSpec,
    PhantomCase,
    allocate_view_class,
    make_phantom,
    make_phantom_for,
    plan_patients,
    sample_patient,
)
from lungopacity.synthetic.rsna_writer import (
    CLASS_INFO_CSV,
    IMAGES_DIR,
    LABELS_CSV,
    SYNTHETIC_MARKER,
    DemoDatasetSummary,
    uid_from_name,
    write_demo_dataset,
    write_dicom,
)

__all__ = [
    "CLASS_INFO_CSV",
    "IMAGES_DIR",
    "LABELS_CSV",
    "NOT_NORMAL_FINDINGS",
    "SYNTHETIC_MARKER",
    "DemoDatasetSummary",
    "PatientSpec",
    "PhantomCase",
    "allocate_view_class",
    "make_phantom",
    "make_phantom_for",
    "plan_patients",
    "sample_patient",
    "uid_from_name",
    "write_demo_dataset",
    "write_dicom",
]
