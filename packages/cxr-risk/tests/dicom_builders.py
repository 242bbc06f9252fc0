"""Tiny DICOM files with chosen attributes, for tests that pin pixel values per pipeline branch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
# In-package copy of shared/fixtures/cxr (Apache-2.0, see its README), so a fresh clone runs these tests.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cxr"
FIXTURES_MISSING = f"real CXR fixtures not found at {FIXTURES} (tests/fixtures/cxr is part of the package)"


def make_ds(
    stored: np.ndarray,
    *,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    raw: np.ndarray | None = None,
    **attrs: Any,
) -> Dataset:
    """A DX dataset with ``stored`` values (``raw`` overrides the bytes written, e.g. dirty high bits)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage if modality == "CT" else DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID-SECRET-123"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (bits_allocated, signed)
    ]
    data = raw if raw is not None else stored.astype(dtype)
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_raw_value(path: Path, tag: int, vr: str, old: bytes, new: bytes) -> Path:
    """Overwrite the value of one Explicit VR Little Endian element in ``path`` with ``new`` bytes.

    pydicom validates values on assignment, so a malformed header (``NumberOfFrames='1A'``) can only be
    made by editing the written bytes. ``old`` is the value as written, of the same length as ``new``.
    """
    if len(old) != len(new):
        raise ValueError(f"write_raw_value: old {old!r} and new {new!r} differ in length")
    group, element = tag >> 16, tag & 0xFFFF
    head = (
        group.to_bytes(2, "little")
        + element.to_bytes(2, "little")
        + vr.encode()
        + len(old).to_bytes(2, "little")
    )
    data = path.read_bytes()
    if data.count(head + old) != 1:
        raise ValueError(
            f"write_raw_value: element ({group:04X},{element:04X}) = {old!r} not found once in {path}"
        )
    path.write_bytes(data.replace(head + old, head + new))
    return path
