"""Batch preprocessing loses nothing: a missing file or a malformed header skips that image, names it
(file, path, cohort line) and the batch goes on."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_builders import make_ds, write, write_raw_value

from cxr_risk import ImageReadError, PreprocessConfig, cli, read_image, read_images
from cxr_risk import dicom as dcm
from cxr_risk.cohort import Cohort

CONFIG = PreprocessConfig(size=8, trim=False)


def _bad_frames(path: Path) -> Path:
    """A DX file whose NumberOfFrames reads '1A' (pydicom only warns when it reads it)."""
    ds = make_ds(np.arange(16, dtype=np.uint16).reshape(4, 4), NumberOfFrames=1)
    return write_raw_value(write(ds, path), 0x00280008, "IS", b"1 ", b"1A")


def _good(path: Path) -> Path:
    return write(make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8)), path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_number_of_frames_is_an_image_read_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"frames\.dcm: malformed header: NumberOfFrames='1A'"):
        read_image(_bad_frames(tmp_path / "frames.dcm"), CONFIG)


def test_missing_file_is_not_a_bare_errno(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "gone.dcm", CONFIG)
    assert str(info.value).startswith(str(tmp_path / "gone.dcm") + ": no such file")
    assert "Errno" not in str(info.value)


def test_directory_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "study.dcm").mkdir()
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path / "study.dcm", CONFIG)


def test_io_error_while_reading_names_file_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file removed between the existence check and the read (or a disk error) is an ImageReadError."""
    path = _good(tmp_path / "vanishing.dcm")

    def vanish(p, config):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))

    monkeypatch.setattr(dcm, "read_dicom", vanish)
    with pytest.raises(ImageReadError) as info:
        read_image(path, CONFIG)
    assert info.value.reason == "cannot read the file (FileNotFoundError: No such file or directory)"
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_read_images_goes_on_and_reports_file_and_line(tmp_path: Path) -> None:
    paths = [_good(tmp_path / "a.dcm"), tmp_path / "missing.dcm", _bad_frames(tmp_path / "frames.dcm")]
    paths.append(_good(tmp_path / "b.dcm"))
    items = list(read_images(paths, CONFIG, lines=[2, 3, 4, 5]))
    assert [i.error is None for i in items] == [True, False, False, True]
    assert [i.line for i in items] == [2, 3, 4, 5]
    missing, frames = items[1].error, items[2].error
    assert str(missing).startswith(f"{tmp_path / 'missing.dcm'} (line 3): no such file")
    assert frames.to_dict() == {
        "file": "frames.dcm",
        "path": str(tmp_path / "frames.dcm"),
        "line": 4,
        "error": "ImageReadError",
        "reason": frames.reason,
    }
    assert frames.reason.startswith("malformed header: NumberOfFrames='1A' is not an integer")
    assert items[3].image.shape == (8, 8)


def test_read_images_without_lines_keeps_the_old_message(tmp_path: Path) -> None:
    (item,) = read_images([tmp_path / "missing.dcm"], CONFIG)
    assert item.line is None and item.error.line is None
    assert str(item.error) == f"{tmp_path / 'missing.dcm'}: {item.error.reason}"
    with pytest.raises(ValueError, match="2 lines given for 1 paths"):
        list(read_images([tmp_path / "missing.dcm"], CONFIG, lines=[2, 3]))


def test_with_line_keeps_the_error_class(tmp_path: Path) -> None:
    from cxr_risk import UnsupportedImageError

    err = UnsupportedImageError(tmp_path / "ct.dcm", "a CT slice")
    lined = err.with_line(7)
    assert type(lined) is UnsupportedImageError and lined.line == 7 and err.line is None
    assert str(lined) == f"{tmp_path / 'ct.dcm'} (line 7): a CT slice"
    back = pickle.loads(pickle.dumps(lined))
    assert type(back) is UnsupportedImageError and (back.path, back.reason, back.line) == (
        lined.path,
        lined.reason,
        7,
    )


def _cohort(tmp_path: Path, extra: list[str]) -> tuple[Path, int]:
    """A synthetic cohort CSV with ``extra`` image paths appended; returns it and the cohort's row count
    (rows of images taken after the index date are excluded by :class:`Cohort`, so not the CSV's)."""
    out = tmp_path / "syn"
    assert cli.main(["synth", str(out), "--n", "4", "--image-size", "32", "--seed", "3"]) == 0
    csv = out / "cohort.csv"
    frame = pd.read_csv(csv)
    for i, name in enumerate(extra):
        frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "path": name, "patient_id": f"extra{i}"}
    frame.to_csv(csv, index=False)
    return csv, len(Cohort.read(csv, check_files=False))


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_cli_preprocess_skips_malformed_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv, n = _cohort(tmp_path, ["images/frames.dcm"])
    _bad_frames(csv.parent / "images" / "frames.dcm")
    report = tmp_path / "report.csv"
    args = ["preprocess", str(csv), "--cache-dir", str(tmp_path / "cache"), "--size", "16"]
    assert cli.main([*args, "--report", str(report)]) == 0
    captured = capsys.readouterr()
    assert f"{n - 1}/{n} images" in captured.out and "1 skipped" in captured.out
    # named by its CSV line (the last), not by its row in the cohort left after the index-date exclusions
    line = len(pd.read_csv(csv)) + 1
    assert line > n + 1
    assert f"line {line}: frames.dcm: malformed header: NumberOfFrames='1A'" in captured.err
    rep = pd.read_csv(report)
    assert rep["error"].notna().tolist() == [False] * (n - 1) + [True]
    assert rep[["csv_line", "file"]].iloc[-1].tolist() == [line, "frames.dcm"]


def test_cli_preprocess_skips_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv, _ = _cohort(tmp_path, ["images/missing.dcm"])
    code = cli.main(["preprocess", str(csv), "--cache-dir", str(tmp_path / "cache"), "--size", "16"])
    captured = capsys.readouterr()
    assert code == 0 and "Errno" not in captured.err, captured.err
    assert "1 skipped" in captured.out and "no such file" in captured.err
