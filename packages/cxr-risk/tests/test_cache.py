"""The cached dataset: cold and warm paths agree, the cache is keyed by hashes and holds no identifiers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dicom_builders import FIXTURES, FIXTURES_MISSING
from torch.utils.data import DataLoader

from cxr_risk import CachedImageDataset, Cohort, ImageCache, ImageReadError, PreprocessConfig, read_image
from cxr_risk.synth import make_cohort

CONFIG = PreprocessConfig(size=32)
QUANT = 0.5 / 65535 + 1e-7  # uint16 quantisation plus float32 rounding


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_cohort(out, n=14, seed=1, size=48)
    return out


def test_cold_then_warm_identical(synth_dir: Path, tmp_path: Path) -> None:
    cohort = Cohort.from_csv(synth_dir / "cohort.csv")
    ds = CachedImageDataset(cohort, CONFIG, tmp_path)
    cache = ds.cache
    cold = []
    for path in cohort.paths:
        image, hit = cache.get(path)
        assert not hit
        cold.append(image)
    for path, first in zip(cohort.paths, cold, strict=True):
        image, hit = cache.get(path)
        assert hit
        np.testing.assert_array_equal(image, first)
        direct, _ = read_image(path, CONFIG)
        assert np.abs(image - direct).max() <= QUANT


def test_items(synth_dir: Path, tmp_path: Path) -> None:
    cohort = Cohort.from_csv(synth_dir / "cohort.csv")
    ds = CachedImageDataset(cohort, CONFIG, tmp_path)
    item = ds[3]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert float(item["time"]) == pytest.approx(float(cohort.table["time"].iloc[3]))
    assert float(item["event"]) == float(cohort.table["event"].iloc[3])
    assert item["labels"].shape == (3,) and item["label_mask"].dtype == torch.bool
    assert item["covariates"].shape == (3,)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["patient"].dtype == torch.int64


def test_cache_holds_no_identifiers(synth_dir: Path, tmp_path: Path) -> None:
    cohort = Cohort.from_csv(synth_dir / "cohort.csv")
    ds = CachedImageDataset(cohort, CONFIG, tmp_path)
    assert ds.warm() == []
    secrets = {*cohort.patient_ids, "SYNTH^", "images/img", str(synth_dir)}
    n_files = 0
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            n_files += 1
            blob = (Path(dirpath) / name).read_bytes()
            for secret in secrets:
                assert secret not in name and secret.encode() not in blob, f"{secret} in {name}"
    assert n_files > 2 * len(cohort)


def test_keyed_by_sop_instance_uid(synth_dir: Path, tmp_path: Path) -> None:
    src = next(p for p in sorted((synth_dir / "images").glob("*.dcm")))
    copy = tmp_path / "elsewhere" / "copy.dcm"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    cache = ImageCache(tmp_path / "cache", CONFIG)
    cache.get(src)
    cache.get(copy)
    qc = read_image(src, CONFIG)[1]
    assert cache.lookup(src) == cache.lookup(copy) == qc.cache_key
    assert qc.cache_key.startswith(qc.image_key)
    assert len(list((cache.root / "images").rglob("*.npy"))) == 1


def test_changed_file_is_decoded_again(synth_dir: Path, tmp_path: Path) -> None:
    src = sorted((synth_dir / "images").glob("*.png"))[0]
    path = tmp_path / "x.png"
    shutil.copy(src, path)
    cache = ImageCache(tmp_path / "cache", CONFIG)
    assert cache.get(path)[1] is False and cache.get(path)[1] is True
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.lookup(path) is None and cache.get(path)[1] is False


def test_config_change_uses_another_cache(synth_dir: Path, tmp_path: Path) -> None:
    path = sorted((synth_dir / "images").glob("*.dcm"))[0]
    a, b = ImageCache(tmp_path, CONFIG), ImageCache(tmp_path, PreprocessConfig(size=16))
    a.get(path)
    assert a.root != b.root and b.lookup(path) is None
    assert b.get(path)[0].shape == (16, 16)


def test_warm_reports_bad_rows(synth_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 200)
    frame = pd.read_csv(synth_dir / "cohort.csv").iloc[:3]
    frame["path"] = [str(synth_dir / p) for p in frame["path"]]
    frame.loc[1, "path"] = str(tmp_path / "broken.dcm")
    cohort = Cohort.from_frame(frame)
    ds = CachedImageDataset(cohort, CONFIG, tmp_path / "cache")
    failures = ds.warm()
    assert [row for row, _ in failures] == [1] and "broken.dcm" in failures[0][1]
    with pytest.raises(ImageReadError):
        ds[1]
    clean = ds.without_rows([row for row, _ in failures])
    assert len(clean) == 2 and clean[1]["image"].shape == (1, 32, 32)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=FIXTURES_MISSING)
def test_retagged_copy_sharing_a_uid_is_cached_apart(tmp_path: Path) -> None:
    """The fixture pair shares one SOP Instance UID; the MONOCHROME1 copy must not get the other's pixels."""
    m2, m1 = FIXTURES / "chest_cr_pa_monochrome2_jpeg.dcm", FIXTURES / "chest_cr_pa_tagged_monochrome1.dcm"
    cache = ImageCache(tmp_path, CONFIG)
    a, _ = cache.get(m2)
    b, _ = cache.get(m1)
    a_warm, hit_a = cache.get(m2)
    b_warm, hit_b = cache.get(m1)
    assert hit_a and hit_b
    np.testing.assert_array_equal(a_warm, a)
    np.testing.assert_array_equal(b_warm, b)
    assert np.abs(a_warm + b_warm - 1.0).max() <= 2 * QUANT


def test_workers_fill_one_cache_concurrently(synth_dir: Path, tmp_path: Path) -> None:
    """Two DataLoader workers writing the same cold cache: atomic writes, identical results after."""
    cohort = Cohort.from_csv(synth_dir / "cohort.csv")
    ds = CachedImageDataset(cohort, CONFIG, tmp_path)
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    cold = torch.cat([b["image"] for b in loader])
    warm = torch.stack([ds[i]["image"] for i in range(len(ds))])
    torch.testing.assert_close(cold, warm, rtol=0, atol=0)
    assert not list(tmp_path.rglob(".tmp-*"))
