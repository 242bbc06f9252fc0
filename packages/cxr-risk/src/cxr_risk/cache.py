"""A torch dataset that decodes each radiograph once and then reads preprocessed uint16 arrays.

Layout under ``cache_dir``::

    <config fingerprint>/
        config.json                    the PreprocessConfig the arrays were made with
        images/<k[:2]>/<k>.npy         uint16 image, k = QCRecord.cache_key: the image key (salted
                                       SHA-256 of the SOP Instance UID) + a digest of pixels and display
                                       attributes, so edited copies sharing a UID stay apart
        images/<k[:2]>/<k>.json        QC record without the path
        files/<p[:2]>/<p>              k for the file whose (path, size, mtime) hashes to p

The warm path is an ``os.stat``, one tiny read and a memory-mapped ``np.load``: no DICOM parsing,
no decompression, no resampling. Writes go through a temporary file and ``os.replace``, so several
DataLoader workers (or runs) can fill one cache at once. Nothing in the cache names the patient:
file names are hashes and QC records are stored without paths. uint16 quantisation of ``[0, 1]``
floats loses at most ``0.5 / 65535`` per pixel.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .cohort import Cohort
from .config import PreprocessConfig
from .preprocess import read_image
from .qc import QCRecord

_SCALE = 65535.0


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ImageCache:
    """Preprocessed images for one :class:`PreprocessConfig`, keyed by image key, on disk."""

    def __init__(self, cache_dir: str | Path, config: PreprocessConfig) -> None:
        self.config = config
        self.root = Path(cache_dir) / config.fingerprint()
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = self.root / "config.json"
        if not stamp.exists():
            _atomic_write(stamp, json.dumps(config.to_dict(), indent=1).encode())

    @staticmethod
    def file_token(path: str | Path) -> str:
        """Hash of the file's absolute path, size and modification time (changes when the file does)."""
        st = os.stat(path)
        text = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _index_path(self, token: str) -> Path:
        return self.root / "files" / token[:2] / token

    def _image_path(self, key: str, suffix: str) -> Path:
        return self.root / "images" / key[:2] / f"{key}{suffix}"

    def lookup(self, path: str | Path) -> str | None:
        """The image key cached for ``path``, or None when the file is not (or no longer) cached."""
        try:  # a missing or unreadable file is not cached; read_image then says what is wrong with it
            index = self._index_path(self.file_token(path))
        except OSError:
            return None
        try:
            key = index.read_text().strip()
        except FileNotFoundError:
            return None
        return key if self._image_path(key, ".npy").exists() else None

    def load(self, key: str) -> np.ndarray:
        """Float32 ``[0, 1]`` image for ``key`` (memory-mapped read of the uint16 array)."""
        stored = np.load(self._image_path(key, ".npy"), mmap_mode="r")
        return np.asarray(stored, dtype=np.float32) / np.float32(_SCALE)

    def load_qc(self, key: str) -> QCRecord:
        return QCRecord.from_dict(json.loads(self._image_path(key, ".json").read_text()))

    def store(self, path: str | Path, image: np.ndarray, qc: QCRecord) -> str:
        quantised = np.round(np.clip(image, 0.0, 1.0) * _SCALE).astype(np.uint16)
        key = qc.cache_key
        _atomic_write(self._image_path(key, ".npy"), _npy_bytes(quantised))
        _atomic_write(self._image_path(key, ".json"), json.dumps(qc.to_dict(include_path=False)).encode())
        _atomic_write(self._index_path(self.file_token(path)), key.encode())
        return key

    def get(self, path: str | Path) -> tuple[np.ndarray, bool]:
        """(image, was_cached): the warm path when cached, else decode with :func:`read_image` and store."""
        key = self.lookup(path)
        if key is not None:
            return self.load(key), True
        image, qc = read_image(path, self.config)
        self.store(path, image, qc)
        return np.round(np.clip(image, 0, 1) * _SCALE).astype(np.float32) / np.float32(_SCALE), False


class CachedImageDataset(Dataset):
    """A cohort as a torch dataset over cached preprocessed images.

    Each item is a dict:

    * ``image``: float32 tensor ``(1, H, W)`` in ``[0, 1]`` (0 = displayed black, see :func:`read_image`),
      after ``transform`` if given;
    * ``time``, ``event``: float32 scalars (NaN when the cohort has no follow-up);
    * ``labels``, ``label_mask``: float32 and bool ``(L,)`` (see :meth:`Cohort.label_matrix`);
    * ``covariates``: float32 ``(C,)``;
    * ``index``: the row in the cohort; ``patient``: an integer code for the patient within this
      cohort (for grouping; not the identifier).

    The first access of a row decodes its file and stores the result (the cold path); later accesses,
    in this or any later run with the same config, read the cached array (the warm path). A file that
    cannot be read raises :class:`~cxr_risk.qc.ImageReadError`; run :meth:`warm` first (or
    ``cxr-risk preprocess``) to report and drop such rows.
    """

    def __init__(
        self,
        cohort: Cohort,
        config: PreprocessConfig,
        cache_dir: str | Path,
        *,
        uncertain: str = "ignore",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.cohort = cohort
        self.config = config
        self.cache = ImageCache(cache_dir, config)
        self.transform = transform
        self.uncertain = uncertain
        self.labels, self.label_mask = cohort.label_matrix(uncertain)  # type: ignore[arg-type]
        self.covariates = cohort.covariate_matrix()
        self.paths = cohort.paths
        self.read_errors: dict[int, Any] = {}  # filled by warm()
        self.patient_codes = np.unique(cohort.patient_ids.astype(str), return_inverse=True)[1]
        if cohort.has_survival:
            self.time = cohort.table["time"].to_numpy(np.float32)
            self.event = cohort.table["event"].to_numpy(np.float32)
        else:
            self.time = np.full(len(cohort), np.nan, np.float32)
            self.event = np.full(len(cohort), np.nan, np.float32)

    def __len__(self) -> int:
        return len(self.cohort)

    def image(self, index: int) -> np.ndarray:
        return self.cache.get(self.paths[index])[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = torch.from_numpy(self.image(index))[None]
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "time": torch.tensor(self.time[index]),
            "event": torch.tensor(self.event[index]),
            "labels": torch.from_numpy(self.labels[index]),
            "label_mask": torch.from_numpy(self.label_mask[index]),
            "covariates": torch.from_numpy(self.covariates[index]),
            "index": index,
            "patient": int(self.patient_codes[index]),
        }

    def warm(self, progress: Callable[[int, int], None] | None = None) -> list[tuple[int, str]]:
        """Decode every uncached row now; returns ``(row, error message)`` for rows that failed.

        The errors themselves, with the cohort's CSV line (:attr:`ImageReadError.line`), are kept in
        :attr:`read_errors` (row -> error) for reports (:meth:`ImageReadError.to_dict`).
        """
        from .qc import ImageReadError

        failures: list[tuple[int, str]] = []
        self.read_errors: dict[int, ImageReadError] = {}
        lines = self.cohort.lines
        for i, path in enumerate(self.paths):
            try:
                if self.cache.lookup(path) is None:
                    self.cache.get(path)
            except ImageReadError as err:
                err = err.with_line(int(lines[i]))
                self.read_errors[i] = err
                failures.append((i, str(err)))
            if progress is not None:
                progress(i + 1, len(self.paths))
        return failures

    def without_rows(self, rows: list[int]) -> CachedImageDataset:
        """A dataset over the same cache without ``rows`` (e.g. the failures of :meth:`warm`)."""
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(rows, dtype=np.int64))
        return CachedImageDataset(
            self.cohort.subset(keep),
            self.config,
            self.cache.root.parent,
            uncertain=self.uncertain,
            transform=self.transform,
        )


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``collate_fn`` for :class:`CachedImageDataset` items: stack tensors and numbers, keep the rest as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, np.integer, np.floating)):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out
