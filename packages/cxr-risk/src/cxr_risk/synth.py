"""A synthetic chest-radiograph cohort whose survival depends on the pixels through a known hazard.

Each patient gets a phantom chest (body, two lungs, heart, spine, rib texture) with one lung lesion of
radius ``r`` and texture amplitude ``q``. The true log-hazard is

    log h = 1.2 * (r - 0.07) / 0.03 + 0.6 * (q - 0.5) / 0.29 + 0.3 * (age - 62) / 6

and event times are exponential with that hazard (baseline median about 8 years), censored uniformly
over 2..14 years and administratively at 12 years (CXR-risk's horizon, Lu et al. 2019). Diagnostic
labels are noisy functions of the lesion (``label_nodule``: radius, ``label_opacity``: texture) and of the
heart size (``label_cardiomegaly``, unrelated to risk), with uncertain (-1) and missing entries. A model
that reads the pixels therefore beats one that sees only age and sex; ``truth.csv`` holds ``r``, ``q`` and
the log-hazard for checking that.

Files exercise every reader branch in turn (see :data:`VARIANTS`): CR and DX; MONOCHROME1 and 2
(with PresentationLUTShape INVERSE); 8, 12 and 16 bits, signed and unsigned; rescale slope/intercept;
LINEAR, LINEAR_EXACT and SIGMOID windows; a VOI LUT Sequence; percentile windowing (no VOI); RLE
Lossless, JPEG 2000 Lossless and JPEG Baseline compression; PixelSpacing and ImagerPixelSpacing with a
magnification factor; collimation borders; and 8/16-bit PNG and 16-bit TIFF copies.

``shift="external"`` writes a second site: every DICOM is 10-bit MONOCHROME1 DX with a SIGMOID window,
the display contrast is changed (``external_gamma``, default 1.3: mid-greys darken, so the lesion reads
dimmer against lung) and the noise is higher (``external_noise``, default 0.04, twice the development
site's), with the same hazard function. The reader undoes the encoding exactly; the gamma and the noise are
what a model must generalise across (``external_gamma=1, external_noise=0.02`` leaves only the encoding).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

# Each variant: (name, kind) where kind picks the encoder below.
VARIANTS: tuple[str, ...] = (
    "cr_mono2_12bit_linear",
    "dx_mono1_16bit_rescale_linear_exact_inverse",
    "dx_mono2_8bit_percentile",
    "cr_mono2_signed_voi_lut_sequence",
    "cr_mono2_12bit_rle",
    "dx_mono1_12bit_j2k",
    "dx_mono2_12bit_sigmoid",
    "cr_mono2_8bit_jpeg_baseline",
    "png_8bit",
    "png_16bit",
    "tiff_16bit",
)
EXTERNAL_VARIANTS: tuple[str, ...] = ("ext_dx_mono1_10bit_sigmoid",)
DEVELOPMENT_NOISE = 0.02  # pixel noise s.d. of the development site (display units, [0, 1])
EXTERNAL_GAMMA = 1.3  # display-curve exponent of the external site
EXTERNAL_NOISE = 0.04  # pixel noise s.d. of the external site

FIELD_OF_VIEW_MM = 350.0
LUNG_CENTERS_X = (0.32, 0.68)  # lung ellipses: centre x, centre y 0.5, half-axes 0.15 x 0.3 (fractions)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class Lesion:
    """A lesion's radius (fraction of the image width), texture amplitude and centre (fractions)."""

    radius: float
    texture: float
    center: tuple[float, float]


def true_log_hazard(radius: np.ndarray, texture: np.ndarray, age: np.ndarray) -> np.ndarray:
    """The generator's log-hazard (see the module docstring)."""
    return 1.2 * (radius - 0.07) / 0.03 + 0.6 * (texture - 0.5) / 0.29 + 0.3 * (age - 62.0) / 6.0


def render(
    size: int,
    lesion: Lesion,
    heart: float,
    rng: np.random.Generator,
    noise: float = DEVELOPMENT_NOISE,
    border: float = 0.0,
) -> np.ndarray:
    """A display-space phantom in ``[0, 1]`` (0 black = air/lung, 1 white = bone), ``(size, size)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.full((size, size), 0.03)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.52) ** 2 < 1
    img[body] = 0.55
    # Heart first: the lungs are drawn over it, so only its silhouette between them shows.
    heart_mask = ((xx - 0.55) / (0.08 + 0.08 * heart)) ** 2 + ((yy - 0.66) / 0.12) ** 2 < 1
    img[heart_mask] = 0.72
    ribs = 0.06 * np.sin(2 * math.pi * yy * 14 + 3 * np.abs(xx - 0.5)) ** 2
    for cx in LUNG_CENTERS_X:
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 0.18 + ribs[lung]
    spine = np.abs(xx - 0.5) < 0.035
    img[spine] = np.maximum(img[spine], 0.8)
    # Lesion: a disc of radius r (soft edge over its outer quarter), +0.3 bright, with a ring texture of
    # amplitude 0.15 q whose period scales with r, so it is visible at any resolution.
    dy, dx = yy - lesion.center[0], xx - lesion.center[1]
    dist = np.sqrt(dx**2 + dy**2) / max(lesion.radius, 1e-3)
    disc = np.clip((1.0 - dist) * 4.0, 0.0, 1.0)
    rings = np.sin(2 * math.pi * 2.5 * dist) * np.cos(2 * math.pi * 2.5 * dx / max(lesion.radius, 1e-3))
    img = img + disc * (0.3 + 0.15 * lesion.texture * rings)
    img = img + rng.normal(0.0, noise, img.shape)
    if border > 0:
        b = max(1, int(border * size))
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 0.0, 0.0, 0.0, 0.0
    return np.clip(img, 0.0, 1.0)


def _base_dataset(modality: str, patient_id: str, view: str, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE if modality == "CR" else DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, bits_allocated: int, bits_stored: int, signed: bool) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {8: np.uint8, 16: np.uint16}[bits_allocated]
    if signed:
        dtype = {8: np.int8, 16: np.int16}[bits_allocated]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()


def _spacing(ds: Dataset, size: int, detector: bool) -> None:
    spacing = FIELD_OF_VIEW_MM / size
    if detector:
        factor = 1.1
        ds.ImagerPixelSpacing = [round(spacing * factor, 6)] * 2
        ds.EstimatedRadiographicMagnificationFactor = factor
    else:
        ds.PixelSpacing = [round(spacing, 6)] * 2


#: The variants that pydicom compresses (JPEG Baseline is written through Pillow, always installed).
COMPRESSED_VARIANTS: dict[str, str] = {
    "cr_mono2_12bit_rle": RLELossless,
    "dx_mono1_12bit_j2k": JPEG2000Lossless,
}


def _encoder_available(uid: str) -> bool:
    """Whether pydicom can compress to ``uid`` here (JPEG 2000 needs ``pip install cxr-risk[jpeg]``)."""
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def missing_encoders(variants: tuple[str, ...] = VARIANTS) -> dict[str, str]:
    """Variant -> transfer syntax name for the variants that would be written uncompressed here."""
    return {
        v: COMPRESSED_VARIANTS[v].name
        for v in variants
        if v in COMPRESSED_VARIANTS and not _encoder_available(COMPRESSED_VARIANTS[v])
    }


def _compress(ds: Dataset, uid: str) -> None:
    """Compress ``ds`` to ``uid``, or leave it uncompressed (Explicit VR Little Endian) without an encoder."""
    if _encoder_available(uid):
        ds.compress(uid, generate_instance_uid=False)


def encode_dicom(display: np.ndarray, variant: str, patient_id: str, view: str) -> Dataset:
    """A DICOM dataset whose correct reading reproduces ``display`` (up to quantisation / the window)."""
    rows, cols = display.shape
    y = np.clip(display, 0.0, 1.0)
    modality = "CR" if variant.startswith("cr") else "DX"
    ds = _base_dataset(modality, patient_id, view, rows, cols)
    _spacing(ds, cols, detector=modality == "DX")
    mono = "MONOCHROME1" if "mono1" in variant else "MONOCHROME2"
    ds.PhotometricInterpretation = mono
    if variant in ("cr_mono2_12bit_linear", "cr_mono2_12bit_rle"):
        _set_pixels(ds, np.round(y * 4095), 16, 12, False)
        ds.WindowCenter, ds.WindowWidth = 2048, 4096  # LINEAR: x / 4095 exactly
        if variant.endswith("rle"):
            _compress(ds, RLELossless)
    elif variant == "dx_mono1_16bit_rescale_linear_exact_inverse":
        # MONO1: VOI output v = 1 - y; LINEAR_EXACT v = (m - c) / w + 0.5; m = 2 * stored - 1000.
        c, w = 30000.0, 60000.0
        m = ((1.0 - y) - 0.5) * w + c
        _set_pixels(ds, np.round((m + 1000.0) / 2.0), 16, 16, False)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1000, "US"
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, "LINEAR_EXACT"
        ds.PresentationLUTShape = "INVERSE"
    elif variant == "dx_mono2_8bit_percentile":
        _set_pixels(ds, np.round(y * 255), 8, 8, False)
    elif variant == "cr_mono2_signed_voi_lut_sequence":
        # Signed 12-bit stored values, rescale intercept +2048 -> m in 0..4095, LUT(m) = 65535 sqrt(m/4095).
        m = np.round(4095 * y**2)
        _set_pixels(ds, m - 2048, 16, 12, True)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 2048, "US"
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        lut = np.round(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)
        item.add_new(0x00283006, "US", lut.tolist())  # LUT Data; VR is ambiguous (US or OW), set it
        item.LUTExplanation = "square root"
        ds.VOILUTSequence = DicomSequence([item])
    elif variant == "dx_mono1_12bit_j2k":
        # MONO1 without a window: percentile window then inversion.
        _set_pixels(ds, np.round((1.0 - y) * 4095), 16, 12, False)
        _compress(ds, JPEG2000Lossless)
    elif variant == "dx_mono2_12bit_sigmoid":
        c, w = 2048.0, 1200.0
        p = np.clip(y, 1e-3, 1 - 1e-3)
        m = np.clip(np.round(c + w / 4.0 * np.log(p / (1 - p))), 0, 4095)
        _set_pixels(ds, m, 16, 12, False)
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, "SIGMOID"
    elif variant == "cr_mono2_8bit_jpeg_baseline":
        from PIL import Image
        from pydicom.encaps import encapsulate

        stored = np.round(y * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=95)
        _set_pixels(ds, stored, 8, 8, False)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    elif variant == "ext_dx_mono1_10bit_sigmoid":
        c, w = 512.0, 500.0
        p = np.clip(1.0 - y, 1e-3, 1 - 1e-3)
        m = np.clip(np.round(c + w / 4.0 * np.log(p / (1 - p))), 0, 1023)
        _set_pixels(ds, m, 16, 10, False)
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, "SIGMOID"
    else:
        raise ValueError(f"encode_dicom: unknown DICOM variant {variant!r}")
    return ds


def _write_raster(path: Path, display: np.ndarray, variant: str) -> None:
    from PIL import Image

    if variant == "png_8bit":
        Image.fromarray(np.round(display * 255).astype(np.uint8), mode="L").save(path)
    elif variant == "png_16bit":
        Image.fromarray(np.round(display * 65535).astype(np.uint16)).save(path)
    elif variant == "tiff_16bit":
        import tifffile

        tifffile.imwrite(path, np.round(display * 65535).astype(np.uint16), photometric="minisblack")
    else:
        raise ValueError(f"unknown raster variant {variant!r}")


def make_cohort(
    out_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    shift: str | None = None,
    size: int = 128,
    late_fraction: float = 0.2,
    copies: bool = False,
    external_gamma: float = EXTERNAL_GAMMA,
    external_noise: float = EXTERNAL_NOISE,
) -> Path:
    """Write ``n`` synthetic images, ``cohort.csv`` and ``truth.csv`` under ``out_dir``; return the CSV.

    Args:
        n: number of images; patients have one image, every fourth patient two.
        seed: everything (lesions, noise, times, labels, variants' order) follows from it.
        shift: ``None`` for the development site, ``"external"`` for the shifted external site.
        size: image side in pixels (square images; field of view 350 mm).
        late_fraction: probability that a patient's second image is dated after the index date (the
            cohort loader drops such images; they test that filter).
        copies: also write an 8-bit PNG and a 16-bit TIFF of each DICOM's display image under
            ``copies/`` (``truth.csv`` columns ``png_copy``/``tiff_copy``), to compare readers on one image.
        external_gamma: display-curve exponent of the external site (``shift="external"`` only).
        external_noise: pixel noise s.d. of the external site (the development site has 0.02).
    """
    if n < 1:
        raise ValueError(f"make_cohort: n={n} must be >= 1")
    if shift not in (None, "external"):
        raise ValueError(f"make_cohort: shift={shift!r} must be None or 'external'")
    if not 0.0 <= late_fraction <= 1.0:
        raise ValueError(f"make_cohort: late_fraction={late_fraction} must be in [0, 1]")
    if size < 32:
        raise ValueError(f"make_cohort: size={size} must be >= 32 pixels")
    if not external_gamma > 0:
        raise ValueError(f"make_cohort: external_gamma={external_gamma} must be > 0 (1 = no change)")
    if not external_noise >= 0:
        raise ValueError(f"make_cohort: external_noise={external_noise} must be >= 0")
    variants = EXTERNAL_VARIANTS if shift == "external" else VARIANTS
    missing = missing_encoders(variants)
    if missing:  # known before any file is written; the reader handles uncompressed files on every branch
        warnings.warn(
            "make_cohort: no encoder for "
            + ", ".join(f"{name} ({v})" for v, name in missing.items())
            + "; those images are written uncompressed (Explicit VR Little Endian), see truth.csv "
            "'transfer_syntax'. pip install cxr-risk[jpeg] to write them compressed",
            UserWarning,
            stacklevel=2,
        )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Patients: one image each, every fourth patient two, until n images.
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(2 if len(counts) % 4 == 0 else 1, n - sum(counts)))
    n_pat = len(counts)
    radius = rng.uniform(0.02, 0.12, n_pat)
    texture = rng.uniform(0.0, 1.0, n_pat)
    age = rng.normal(62.0, 6.0, n_pat)
    heart = rng.uniform(0.0, 1.0, n_pat)
    sex = rng.choice(np.array(["M", "F"]), n_pat)
    smoking = np.round(rng.gamma(2.0, 15.0, n_pat), 1)
    log_h = true_log_hazard(radius, texture, age)
    base_rate = math.log(2) / 8.0
    event_time = rng.exponential(1.0 / (base_rate * np.exp(log_h)))
    censor = np.minimum(rng.uniform(2.0, 14.0, n_pat), 12.0)
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(int)
    index_day = rng.integers(0, 3650, n_pat)
    centers = np.stack([rng.uniform(0.35, 0.6, n_pat), np.where(rng.random(n_pat) < 0.5, 0.32, 0.68)], 1)

    def noisy_label(score: np.ndarray, threshold: float) -> np.ndarray:
        lab = (score + rng.normal(0, 0.15 * score.std() + 1e-9, score.shape) > threshold).astype(float)
        u = rng.random(score.shape)
        lab[u < 0.10] = -1.0  # uncertain
        lab[(u >= 0.10) & (u < 0.18)] = np.nan  # missing
        return lab

    nodule = noisy_label(radius, 0.07)
    opacity = noisy_label(texture, 0.5)
    cardiomegaly = noisy_label(heart, 0.7)
    noise = external_noise if shift == "external" else DEVELOPMENT_NOISE
    rows, truth = [], []
    image_no = 0
    base_date = np.datetime64("2000-01-01")
    for p in range(n_pat):
        pid = f"{'EXT' if shift else 'DEV'}{seed:03d}P{p:05d}"
        index_date = base_date + np.timedelta64(int(index_day[p]), "D")
        lesion = Lesion(float(radius[p]), float(texture[p]), (float(centers[p, 0]), float(centers[p, 1])))
        for j in range(counts[p]):
            variant = variants[image_no % len(variants)]
            border = 0.05 if image_no % 3 == 0 else 0.0
            display = render(size, lesion, float(heart[p]), rng, noise=noise, border=border)
            if shift == "external":
                display = display**external_gamma
            view = "PA" if (image_no % 5) else "AP"
            late = j == 1 and rng.random() < late_fraction
            offset = int(rng.integers(1, 200)) if late else -int(rng.integers(0, 365))
            study_date = index_date + np.timedelta64(offset, "D")
            copy_paths = ("", "")
            syntax = ""
            if variant.startswith(("png", "tiff")):
                name = f"img{image_no:06d}.{'tif' if variant.startswith('tiff') else 'png'}"
                _write_raster(out / "images" / name, display, variant)
            else:
                name = f"img{image_no:06d}.dcm"
                ds = encode_dicom(display, variant, pid, view)
                ds.StudyDate = str(study_date).replace("-", "")
                syntax = ds.file_meta.TransferSyntaxUID.name
                ds.save_as(out / "images" / name, enforce_file_format=True)
                if copies:
                    (out / "copies").mkdir(exist_ok=True)
                    _write_raster(out / "copies" / f"img{image_no:06d}.png", display, "png_8bit")
                    _write_raster(out / "copies" / f"img{image_no:06d}.tif", display, "tiff_16bit")
                    copy_paths = (f"copies/img{image_no:06d}.png", f"copies/img{image_no:06d}.tif")
            rows.append(
                {
                    "path": f"images/{name}",
                    "patient_id": pid,
                    "time": round(float(time[p]), 4),
                    "event": int(event[p]),
                    "label_nodule": nodule[p],
                    "label_opacity": opacity[p],
                    "label_cardiomegaly": cardiomegaly[p],
                    "age": round(float(age[p]), 1),
                    "sex": sex[p],
                    "smoking": smoking[p],
                    "view": view,
                    "study_date": str(study_date),
                    "index_date": str(index_date),
                }
            )
            truth.append(
                {
                    "path": f"images/{name}",
                    "variant": variant,
                    "transfer_syntax": syntax,
                    "lesion_radius": radius[p],
                    "lesion_texture": texture[p],
                    "log_hazard": log_h[p],
                    "after_index_date": bool(late),
                    **({"png_copy": copy_paths[0], "tiff_copy": copy_paths[1]} if copies else {}),
                }
            )
            image_no += 1
    cohort_csv = out / "cohort.csv"
    pd.DataFrame(rows).to_csv(cohort_csv, index=False)
    pd.DataFrame(truth).to_csv(out / "truth.csv", index=False)
    return cohort_csv
