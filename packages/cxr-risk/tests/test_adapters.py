"""Dataset adapters on miniature copies of each public dataset's published layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_risk import CohortError, PreprocessConfig, read_image
from cxr_risk.adapters import (
    CHEXPERT_LABELS,
    chexpert,
    folder_csv,
    label_column,
    mimic_cxr_jpg,
    nih_chestxray14,
)


def png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(path)


def test_label_column() -> None:
    assert label_column("Pleural Effusion") == "label_pleural_effusion"
    assert label_column("Pleural_Thickening") == "label_pleural_thickening"


def test_nih(tmp_path: Path) -> None:
    rows = [
        ("00000001_000.png", "Cardiomegaly|Effusion", 1, 58, "M", "PA"),
        ("00000001_001.png", "No Finding", 1, 58, "M", "AP"),
        ("00000002_000.png", "Nodule", 2, 81, "F", "PA"),
    ]
    pd.DataFrame(
        rows,
        columns=[
            "Image Index",
            "Finding Labels",
            "Patient ID",
            "Patient Age",
            "Patient Gender",
            "View Position",
        ],
    ).to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    png(tmp_path / "images_001" / "images" / rows[0][0])
    png(tmp_path / "images_001" / "images" / rows[1][0])
    png(tmp_path / "images_002" / "images" / rows[2][0])
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    cohort = nih_chestxray14(tmp_path)
    assert len(cohort) == 3 and not cohort.has_survival and len(cohort.label_columns) == 14
    labels, mask = cohort.label_matrix()
    names = list(cohort.label_columns)
    assert labels[0, names.index("label_cardiomegaly")] == 1 and labels[0, names.index("label_effusion")] == 1
    assert labels[1].sum() == 0 and mask.all()
    assert labels[2, names.index("label_nodule")] == 1
    assert len(nih_chestxray14(tmp_path, views=("PA",))) == 2
    test = nih_chestxray14(tmp_path, split="test")
    assert list(test.patient_ids) == ["2"]
    assert read_image(test.paths[0], PreprocessConfig(size=8))[0].shape == (8, 8)


def test_chexpert(tmp_path: Path) -> None:
    data = tmp_path / "CheXpert-v1.0-small"
    paths = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg",
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
    ]
    table = pd.DataFrame(
        {
            "Path": paths,
            "Sex": ["Female", "Female", "Male"],
            "Age": [68, 68, 87],
            "Frontal/Lateral": ["Frontal", "Lateral", "Frontal"],
            "AP/PA": ["AP", None, "PA"],
        }
    )
    for name in CHEXPERT_LABELS:
        table[name] = [1.0, np.nan, -1.0]
    data.mkdir()
    table.to_csv(data / "train.csv", index=False)
    for p in paths:
        png(tmp_path / p)
    cohort = chexpert(data)
    assert list(cohort.patient_ids) == ["patient00001", "patient00001", "patient00002"]
    assert list(cohort.table["view"]) == ["AP", "LATERAL", "PA"]
    _, mask = cohort.label_matrix("ignore")
    assert mask[0].all() and not mask[1].any() and not mask[2].any()
    ones, _ = cohort.label_matrix("ones")
    assert ones[2].sum() == len(CHEXPERT_LABELS)
    assert len(chexpert(data, views=("AP", "PA"))) == 2
    with pytest.raises(ValueError, match="split"):
        chexpert(data, split="test")


def test_mimic(tmp_path: Path) -> None:
    meta = pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3"],
            "subject_id": [10000032, 10000032, 11000011],
            "study_id": [50414267, 50414267, 51000000],
            "ViewPosition": ["PA", "LATERAL", "AP"],
        }
    )
    meta.to_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    lab = pd.DataFrame({"subject_id": [10000032, 11000011], "study_id": [50414267, 51000000]})
    for name in CHEXPERT_LABELS:
        lab[name] = [1.0, 0.0]
    lab.to_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split=["train", "train", "test"])
    split.to_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    png(tmp_path / "files/p10/p10000032/s50414267/d1.jpg")
    png(tmp_path / "files/p10/p10000032/s50414267/d2.jpg")
    png(tmp_path / "files/p11/p11000011/s51000000/d3.jpg")
    cohort = mimic_cxr_jpg(tmp_path)
    assert len(cohort) == 3 and list(cohort.patient_ids) == ["10000032", "10000032", "11000011"]
    labels, _ = cohort.label_matrix()
    np.testing.assert_array_equal(labels[:, 0], [1, 1, 0])
    assert len(mimic_cxr_jpg(tmp_path, split="test")) == 1
    assert len(mimic_cxr_jpg(tmp_path, views=("PA", "AP"))) == 2
    with pytest.raises(FileNotFoundError, match="MIMIC-CXR-JPG"):
        mimic_cxr_jpg(tmp_path / "elsewhere")


def test_folder_csv_with_template(tmp_path: Path) -> None:
    for i in range(3):
        png(tmp_path / "scans" / f"IMG{i}.png")
    table = pd.DataFrame(
        {
            "image_id": ["IMG0", "IMG1", "IMG2"],
            "pid": ["a", "a", "b"],
            "fu_years": [3.0, 3.0, 11.5],
            "died": [1, 1, 0],
        }
    )
    table.to_csv(tmp_path / "plco.csv", index=False)
    cohort = folder_csv(
        tmp_path / "scans",
        tmp_path / "plco.csv",
        columns={"pid": "patient_id", "fu_years": "time", "died": "event"},
        path_template="{image_id}.png",
    )
    assert cohort.has_survival and list(cohort.events) == [1, 1, 0]
    table.loc[2, "fu_years"] = -1
    table.to_csv(tmp_path / "plco.csv", index=False)
    with pytest.raises(CohortError, match="line 4: negative follow-up time"):
        folder_csv(
            tmp_path / "scans",
            tmp_path / "plco.csv",
            columns={"pid": "patient_id", "fu_years": "time", "died": "event"},
            path_template="{image_id}.png",
        )
    with pytest.raises(ValueError, match="missing column"):
        folder_csv(tmp_path / "scans", tmp_path / "plco.csv", path_template="{nope}.png")
