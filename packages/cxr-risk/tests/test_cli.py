"""The ``cxr-risk`` command: inspect (table and JSON), synth, preprocess, and the plug-in dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dicom_builders import FIXTURES, FIXTURES_MISSING, make_ds, write

from cxr_risk import cli


def test_inspect_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8), ViewPosition="AP"), tmp_path / "a.dcm")
    assert cli.main(["inspect", str(good), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["view"] == "AP" and records[0]["voi_source"] == "percentile"
    bad = write(make_ds(np.zeros((4, 4)), modality="CT"), tmp_path / "ct.dcm")
    assert cli.main(["inspect", str(good), str(bad), "--json"]) == 1
    out = capsys.readouterr().out
    records = json.loads(out)
    assert "error" not in records[0] and "CT slice" in records[1]["error"]
    assert "PID-SECRET-123" not in out and "DOE" not in out


def test_inspect_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(make_ds(np.arange(64, dtype=np.uint16).reshape(8, 8), ViewPosition="PA"), tmp_path / "a.dcm")
    assert cli.main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    for header in ("modality", "view", "voi_source", "inversion_applied", "warnings"):
        assert header in out
    assert "PA" in out and "DX" in out and "PID-SECRET-123" not in out


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=FIXTURES_MISSING)
def test_inspect_shared_fixtures(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in FIXTURES.iterdir() if p.suffix in (".dcm", ".png"))
    assert cli.main(["inspect", *files, "--json"]) == 0
    records = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    m2, m1 = records["chest_cr_pa_monochrome2_jpeg.dcm"], records["chest_cr_pa_tagged_monochrome1.dcm"]
    assert (m2["view"], m2["pixel_spacing_mm"], m2["inversion_applied"]) == ("PA", [0.168, 0.168], False)
    assert (m1["photometric"], m1["inversion_applied"]) == ("MONOCHROME1", True)
    assert m2["transfer_syntax"] == "JPEG Baseline (Process 1)" and m2["bits_stored"] == 8
    assert records["00000001_000.png"]["kind"] == "png"


def test_synth_then_preprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert cli.main(["synth", str(out), "--n", "8", "--image-size", "40", "--seed", "2"]) == 0
    csv = out / "cohort.csv"
    frame = pd.read_csv(csv)
    assert len(frame) == 8
    (out / "images" / "broken.png").write_bytes(b"not a png")
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "path": "images/broken.png"}
    frame.to_csv(csv, index=False)
    report = tmp_path / "report.csv"
    code = cli.main(
        [
            "preprocess",
            str(csv),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--size",
            "32",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out and "broken.png" in captured.err
    rep = pd.read_csv(report)
    assert rep["error"].notna().sum() == 1 and rep["output_shape"].dropna().eq("[32, 32]").all()
    assert not any(pid in report.read_text() for pid in frame["patient_id"])
    assert (
        cli.main(["preprocess", str(csv), "--cache-dir", str(tmp_path / "cache"), "--size", "32", "--strict"])
        == 1
    )


def test_bad_cohort_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.csv").write_text("path,patient_id,time,event\na.png,1,-2,1\n")
    assert cli.main(["preprocess", str(tmp_path / "c.csv"), "--cache-dir", str(tmp_path)]) == 2
    assert "line 2: negative follow-up time" in capsys.readouterr().err


def test_model_commands_are_registered_from_their_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake = types.ModuleType("cxr_risk.cli.model_commands")

    def register(sub) -> None:
        p = sub.add_parser("hello")
        p.set_defaults(func=lambda args: 7)

    fake.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cxr_risk.cli.model_commands", fake)
    assert cli.main(["hello"]) == 7


def test_data_commands_do_not_import_the_model_stack(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from cxr_risk.cli import main; "
        f"assert main(['synth', {str(tmp_path)!r}, '--n', '4', '--image-size', '32']) == 0; "
        "print('loaded:', *(m for m in ('cxr_risk.cli.model_commands', 'cxr_risk.trainer', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "loaded:", out.stdout


def test_python_dash_m_runs_the_cli() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "cxr_risk.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "pretrain" in out.stdout and "inspect" in out.stdout


def test_console_script_entry_point() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("cxr-risk") == "cxr_risk.cli:main"
