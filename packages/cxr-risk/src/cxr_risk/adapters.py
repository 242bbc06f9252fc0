"""Public chest X-ray datasets (local copies, their published label CSVs) as :class:`Cohort` objects.

Nothing is downloaded: each adapter reads a folder the user already has, laid out as its publisher
ships it. Labels become ``label_<name>`` columns (lower case, ``_`` for spaces) with 1 / 0 / -1
(uncertain) / empty (missing); these sets have no follow-up, so ``time``/``event`` are absent and the
cohorts serve pretraining and diagnostic fine-tuning. ``views`` keeps only the listed view positions.

* :func:`nih_chestxray14` - Wang et al. 2017; ``Data_Entry_2017*.csv`` + ``images*/**.png``.
* :func:`chexpert` - Irvin et al. 2019; ``train.csv``/``valid.csv`` with paths under the data folder.
* :func:`mimic_cxr_jpg` - Johnson et al. 2019; metadata, CheXpert-labeler and split CSVs + ``files/``.
* :func:`folder_csv` - any "folder + CSV" cohort (PLCO, NLST style) with follow-up columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .cohort import Cohort
from .views import normalise_view

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def label_column(name: str) -> str:
    """``"Pleural Effusion"`` -> ``"label_pleural_effusion"``."""
    return "label_" + name.strip().lower().replace(" ", "_").replace("-", "_")


def _first(root: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{what}: none of {list(names)} (or .gz) found in {root}; is root the dataset folder?"
    )


def _filter_views(frame: pd.DataFrame, views: Sequence[str] | None) -> pd.DataFrame:
    if views is None:
        return frame
    wanted = {normalise_view(v) for v in views}
    return frame[frame["view"].map(normalise_view).isin(wanted)]


def nih_chestxray14(
    root: str | Path,
    *,
    views: Sequence[str] | None = None,
    split: str | None = None,
    check_files: bool = True,
) -> Cohort:
    """NIH ChestX-ray14 from its folder: ``Data_Entry_2017*.csv`` and PNGs under ``images*/``.

    Labels are the 14 findings of ``Finding Labels`` (``|``-separated; ``No Finding`` = all 0); NIH has no
    uncertain or missing labels. ``split="train_val"`` or ``"test"`` applies the official patient-wise
    lists (``train_val_list.txt``/``test_list.txt``).
    """
    root = Path(root)
    table = pd.read_csv(
        _first(root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], "NIH ChestX-ray14")
    )
    files = {p.name: p for p in root.glob("images*/**/*.png")} or {p.name: p for p in root.rglob("*.png")}
    frame = pd.DataFrame(
        {
            "path": [str(files.get(name, root / "images" / name)) for name in table["Image Index"]],
            "patient_id": table["Patient ID"].astype(str),
            "age": pd.to_numeric(table["Patient Age"], errors="coerce"),
            "sex": table["Patient Gender"],
            "view": table["View Position"],
        }
    )
    findings = table["Finding Labels"].fillna("").str.split("|")
    for name in NIH_LABELS:
        frame[label_column(name)] = findings.map(lambda fs, n=name: float(n in fs))
    if split is not None:
        lists = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
        if split not in lists:
            raise ValueError(f"nih_chestxray14: split={split!r} must be 'train_val' or 'test'")
        keep = set((root / lists[split]).read_text().split())
        frame = frame[table["Image Index"].isin(keep).to_numpy()]
    return Cohort.from_frame(
        _filter_views(frame, views),
        check_files=check_files,
        covariate_columns=("age", "sex"),
        source=str(root),
    )


def chexpert(
    root: str | Path,
    *,
    split: str = "train",
    views: Sequence[str] | None = None,
    check_files: bool = True,
) -> Cohort:
    """CheXpert (or CheXpert-small) from its folder, which holds ``train.csv`` and ``valid.csv``.

    ``Path`` entries start with the dataset folder's own name (``CheXpert-v1.0-small/train/...``) and
    are resolved against the folder's parent. The view is ``AP/PA`` for frontal images and ``LATERAL``
    otherwise. Uncertain labels stay -1 (choose U-Ignore/U-Zeros/U-Ones in :meth:`Cohort.label_matrix`).
    """
    root = Path(root)
    if split not in ("train", "valid"):
        raise ValueError(f"chexpert: split={split!r} must be 'train' or 'valid'")
    table = pd.read_csv(_first(root, [f"{split}.csv"], "CheXpert"))

    def resolve(rel: str) -> str:
        rel_path = Path(rel)
        for candidate in (root.parent / rel_path, root / rel_path, root / Path(*rel_path.parts[1:])):
            if candidate.exists():
                return str(candidate)
        return str(root.parent / rel_path)

    frontal = table["Frontal/Lateral"].astype(str).str.lower().eq("frontal")
    frame = pd.DataFrame(
        {
            "path": table["Path"].map(resolve),
            "patient_id": table["Path"].str.extract(r"(patient\d+)", expand=False),
            "age": pd.to_numeric(table["Age"], errors="coerce"),
            "sex": table["Sex"],
            "view": np.where(frontal, table.get("AP/PA", pd.Series([None] * len(table))), "LATERAL"),
        }
    )
    for name in CHEXPERT_LABELS:
        frame[label_column(name)] = pd.to_numeric(table[name], errors="coerce")
    return Cohort.from_frame(
        _filter_views(frame, views),
        check_files=check_files,
        covariate_columns=("age", "sex"),
        source=str(root),
    )


def mimic_cxr_jpg(
    root: str | Path,
    *,
    split: str | None = None,
    views: Sequence[str] | None = None,
    labeler: str = "chexpert",
    check_files: bool = True,
) -> Cohort:
    """MIMIC-CXR-JPG from its folder: ``mimic-cxr-2.0.0-{metadata,chexpert|negbio,split}.csv(.gz)``.

    Images are ``files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``; labels are per
    study (the same for every image of a study); ``split`` is ``train``/``validate``/``test``.
    """
    root = Path(root)
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"mimic_cxr_jpg: labeler={labeler!r} must be 'chexpert' or 'negbio'")
    meta = pd.read_csv(_first(root, ["mimic-cxr-2.0.0-metadata.csv"], "MIMIC-CXR-JPG"))
    labels = pd.read_csv(_first(root, [f"mimic-cxr-2.0.0-{labeler}.csv"], "MIMIC-CXR-JPG"))
    table = meta.merge(labels, on=["subject_id", "study_id"], how="left")
    if split is not None:
        splits = pd.read_csv(_first(root, ["mimic-cxr-2.0.0-split.csv"], "MIMIC-CXR-JPG"))
        if split not in set(splits["split"]):
            raise ValueError(f"mimic_cxr_jpg: split={split!r} not in {sorted(set(splits['split']))}")
        table = table[table["dicom_id"].isin(splits.loc[splits["split"] == split, "dicom_id"])]
    subject = table["subject_id"].astype(int).astype(str)
    paths = [
        str(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{int(st)}" / f"{d}.jpg")
        for s, st, d in zip(subject, table["study_id"], table["dicom_id"], strict=True)
    ]
    frame = pd.DataFrame(
        {
            "path": paths,
            "patient_id": subject.to_numpy(),
            "view": table["ViewPosition"].to_numpy(),
        }
    )
    for name in CHEXPERT_LABELS:
        if name in table.columns:
            frame[label_column(name)] = pd.to_numeric(table[name], errors="coerce").to_numpy()
    return Cohort.from_frame(_filter_views(frame, views), check_files=check_files, source=str(root))


def folder_csv(
    root: str | Path,
    csv: str | Path,
    *,
    columns: dict[str, str] | None = None,
    path_template: str | None = None,
    label_columns: Sequence[str] | None = None,
    covariate_columns: Sequence[str] | None = None,
    check_files: bool = True,
) -> Cohort:
    """A folder of images plus a CSV (or parquet) with one row per image, e.g. PLCO or NLST exports.

    Args:
        root: folder that image paths are relative to.
        csv: the table; its columns are renamed with ``columns`` onto the standard names
            (``path``, ``patient_id``, ``time``, ``event``, ``study_date``, ``index_date``...).
        path_template: build ``path`` from other columns instead, e.g. ``"{image_id}.tif"`` or
            ``"{patient}/{image_id}.dcm"`` (Python format syntax over the renamed columns).
    """
    csv = Path(csv)
    frame = pd.read_parquet(csv) if csv.suffix.lower() in (".parquet", ".pq") else pd.read_csv(csv)
    frame = frame.rename(columns=columns or {})
    if path_template is not None:
        try:
            frame["path"] = [path_template.format(**row) for row in frame.to_dict("records")]
        except KeyError as err:
            raise ValueError(
                f"folder_csv: path_template {path_template!r} names a missing column {err}"
            ) from err
    return Cohort.from_frame(
        frame,
        root=root,
        label_columns=label_columns,
        covariate_columns=covariate_columns,
        check_files=check_files,
        source=str(csv),
    )
