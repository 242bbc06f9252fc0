"""Cohort validation, index dates, labels, and the patient-level split invariants as property tests."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxr_risk import Cohort, CohortError, kfold, label_fraction_subsets, patient_split
from cxr_risk.cohort import assign_folds, assign_patient_splits, nested_patient_subsets


def write_cohort(tmp_path: Path, rows: list[dict], touch: bool = True) -> Path:
    frame = pd.DataFrame(rows)
    if touch:
        for p in frame["path"].dropna():
            (tmp_path / str(p)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / str(p)).write_bytes(b"x")
    csv = tmp_path / "cohort.csv"
    frame.to_csv(csv, index=False)
    return csv


def base_rows(n: int = 4) -> list[dict]:
    return [
        {"path": f"img/{i}.dcm", "patient_id": f"P{i // 2}", "time": 5.0 + i // 2, "event": (i // 2) % 2}
        for i in range(n)
    ]


def test_valid_cohort_loads(tmp_path: Path) -> None:
    rows = base_rows()
    for r in rows:
        r.update(label_a=1, label_b="", age=60, sex="F")
    cohort = Cohort.from_csv(write_cohort(tmp_path, rows))
    assert len(cohort) == 4 and cohort.has_survival
    assert cohort.label_columns == ("label_a", "label_b") and cohort.covariate_columns == ("age", "sex")
    assert Path(cohort.paths[0]) == tmp_path / "img/0.dcm"
    np.testing.assert_array_equal(cohort.events, [0, 0, 1, 1])


def test_errors_are_row_numbered_and_all_reported(tmp_path: Path) -> None:
    rows = base_rows(6)
    rows[0]["time"] = -1.0  # line 2
    rows[1]["time"] = -1.0  # keep patient P0 consistent
    rows[2]["event"] = 2  # line 4
    rows[3]["event"] = 2
    rows[5]["path"] = rows[4]["path"]  # line 7 duplicates line 6
    rows[4]["label_x"] = 7  # line 6
    csv = write_cohort(tmp_path, rows)
    with pytest.raises(CohortError) as info:
        Cohort.from_csv(csv)
    msg = str(info.value)
    assert "line 2: negative follow-up time -1.0" in msg
    assert "line 4: event 2 is not 0 or 1" in msg
    assert "line 7: duplicate image (same file as line 6)" in msg
    assert "line 6: label label_x=7.0 is not 1, 0, -1" in msg


def test_missing_files_and_columns(tmp_path: Path) -> None:
    csv = write_cohort(tmp_path, base_rows(), touch=False)
    with pytest.raises(CohortError, match="line 3: image file not found"):
        Cohort.from_csv(csv)
    assert len(Cohort.from_csv(csv, check_files=False)) == 4
    frame = pd.DataFrame(base_rows()).drop(columns="patient_id")
    with pytest.raises(CohortError, match="missing column 'patient_id'"):
        Cohort.from_frame(frame, check_files=False)
    with pytest.raises(CohortError, match="both be present"):
        Cohort.from_frame(pd.DataFrame(base_rows()).drop(columns="event"), check_files=False)


def test_patient_rows_must_agree_on_follow_up(tmp_path: Path) -> None:
    rows = base_rows()
    rows[1]["time"] = 99.0
    with pytest.raises(CohortError, match="disagree on time/event"):
        Cohort.from_csv(write_cohort(tmp_path, rows))


def test_column_mapping_and_no_survival(tmp_path: Path) -> None:
    frame = pd.DataFrame({"file": ["a.png", "b.png"], "subject": ["s1", "s2"], "label_y": [1, -1]})
    cohort = Cohort.from_frame(frame, columns={"file": "path", "subject": "patient_id"}, check_files=False)
    assert not cohort.has_survival and cohort.events is None


def test_images_after_index_date_are_dropped(tmp_path: Path) -> None:
    rows = base_rows()
    for r in rows:
        r.update(study_date="2001-01-01", index_date="2001-06-01")
    rows[3]["study_date"] = "2001-06-02"
    cohort = Cohort.from_csv(write_cohort(tmp_path, rows))
    assert len(cohort) == 3 and len(cohort.excluded) == 1
    assert cohort.excluded["reason"].iloc[0] == "image taken after the index date"
    rows[0]["study_date"] = "not a date"
    with pytest.raises(CohortError, match="line 2: study_date 'not a date' is not a date"):
        Cohort.from_csv(write_cohort(tmp_path, rows))


def test_label_matrix_policies(tmp_path: Path) -> None:
    rows = base_rows(3)[:3]
    rows[2]["patient_id"] = "P9"
    for r, a, b in zip(rows, [1, 0, -1], [np.nan, 1, 0], strict=True):
        r.update(label_a=a, label_b=b)
    cohort = Cohort.from_csv(write_cohort(tmp_path, rows))
    labels, mask = cohort.label_matrix("ignore")
    np.testing.assert_array_equal(labels, [[1, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(mask, [[True, False], [True, True], [False, True]])
    labels, mask = cohort.label_matrix("ones")
    assert labels[2, 0] == 1 and mask[2, 0]
    labels, _ = cohort.label_matrix("zeros")
    assert labels[2, 0] == 0
    with pytest.raises(ValueError, match="uncertain"):
        cohort.label_matrix("maybe")  # type: ignore[arg-type]


def test_covariates_encode_sex() -> None:
    frame = pd.DataFrame(
        {"path": ["a", "b", "c"], "patient_id": ["1", "2", "3"], "sex": ["M", "F", None], "age": [1, 2, 3]}
    )
    cov = Cohort.from_frame(frame, check_files=False).covariate_matrix()
    assert cov.shape == (3, 2)  # columns in DEFAULT_COVARIATES order: age, sex
    np.testing.assert_array_equal(cov[:2], [[1, 1], [2, 0]])
    assert np.isnan(cov[2, 1])


# ----------------------------------------------------------------------------- property tests
cohorts = st.integers(min_value=1, max_value=60).flatmap(
    lambda n_pat: st.tuples(
        st.lists(st.integers(0, n_pat - 1), min_size=n_pat, max_size=3 * n_pat),
        st.lists(st.integers(0, 1), min_size=n_pat, max_size=n_pat),
    )
)


def arrays(case: tuple[list[int], list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Row patient ids and row events (events are per patient, as Cohort enforces)."""
    rows, pat_events = case
    pids = np.array([f"p{r}" for r in rows])
    return pids, np.array([pat_events[r] for r in rows])


@settings(max_examples=60, deadline=None)
@given(case=cohorts, seed=st.integers(0, 2**31 - 1))
def test_split_is_patient_level_and_stratified(case: tuple[list[int], list[int]], seed: int) -> None:
    pids, events = arrays(case)
    fractions = (0.6, 0.2, 0.2)
    which = assign_patient_splits(pids, events, fractions, seed)
    for pid in np.unique(pids):  # nothing of one patient in two splits
        assert len(set(which[pids == pid])) == 1
    pat_split = {p: which[pids == p][0] for p in np.unique(pids)}
    pat_event = {p: events[pids == p][0] for p in np.unique(pids)}
    for e in (0, 1):  # per stratum, split sizes are the quotas rounded (largest remainder)
        members = [p for p in pat_event if pat_event[p] == e]
        counts = np.bincount([pat_split[p] for p in members], minlength=3)
        assert counts.sum() == len(members)
        assert (np.abs(counts - np.array(fractions) * len(members)) < 1).all()
    np.testing.assert_array_equal(which, assign_patient_splits(pids, events, fractions, seed))


@settings(max_examples=60, deadline=None)
@given(case=cohorts, seed=st.integers(0, 2**31 - 1), k=st.integers(2, 6))
def test_kfold_holds_out_each_patient_once(case: tuple[list[int], list[int]], seed: int, k: int) -> None:
    pids, events = arrays(case)
    n_pat = len(np.unique(pids))
    if n_pat < k:
        with pytest.raises(ValueError, match="at least k patients"):
            assign_folds(pids, events, k, seed)
        return
    folds = assign_folds(pids, events, k, seed)
    pat_fold = {}
    for pid, f in zip(pids, folds, strict=True):
        assert pat_fold.setdefault(pid, f) == f
    sizes = np.bincount(list(pat_fold.values()), minlength=k)
    assert sizes.max() - sizes.min() <= 1  # balanced in patients


@settings(max_examples=60, deadline=None)
@given(
    case=cohorts,
    seed=st.integers(0, 2**31 - 1),
    fractions=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6),
)
def test_label_fraction_subsets_nested(
    case: tuple[list[int], list[int]], seed: int, fractions: list[float]
) -> None:
    pids, events = arrays(case)
    masks = nested_patient_subsets(pids, events, fractions, seed)
    ordered = sorted(masks)
    for small, large in itertools.pairwise(ordered):
        assert not (masks[small] & ~masks[large]).any(), "smaller subset not contained in larger"
    n_pat = len(np.unique(pids))
    for f, mask in masks.items():
        chosen = np.unique(pids[mask])
        for pid in chosen:  # whole patients
            assert mask[pids == pid].all()
        assert abs(len(chosen) - f * n_pat) <= 2  # ceil per stratum: at most one extra per stratum
    if 1.0 in masks:
        assert masks[1.0].all()


def test_cohort_level_helpers(tmp_path: Path) -> None:
    rows = [
        {"path": f"{i}.png", "patient_id": f"P{i // 2}", "time": 1.0, "event": int((i // 2) % 3 == 0)}
        for i in range(60)
    ]
    cohort = Cohort.from_frame(pd.DataFrame(rows), check_files=False)
    splits = patient_split(cohort, seed=3)
    assert sum(len(c) for c in splits.values()) == 60
    sets = [set(c.patient_ids) for c in splits.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    folds = kfold(cohort, k=3, seed=1)
    held = np.concatenate([test.patient_ids for _, test in folds])
    assert sorted(held) == sorted(cohort.patient_ids)
    for train, test in folds:
        assert not set(train.patient_ids) & set(test.patient_ids)
    subsets = label_fraction_subsets(cohort, fractions=(0.1, 0.5, 1.0), seed=0)
    assert set(subsets[0.1].paths) <= set(subsets[0.5].paths) <= set(subsets[1.0].paths)
    assert len(subsets[1.0]) == 60
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(cohort, fractions=(0.5, 0.2, 0.2))


def test_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.DataFrame(base_rows())
    try:
        import pyarrow  # noqa: F401
    except ImportError:

        def no_engine(*args: object, **kwargs: object) -> None:
            raise ImportError("Unable to find a usable engine")

        monkeypatch.setattr(pd, "read_parquet", no_engine)
        with pytest.raises(ImportError, match="pip install pyarrow"):
            Cohort.read(tmp_path / "c.parquet")
        return
    frame.to_parquet(tmp_path / "c.parquet")
    cohort = Cohort.read(tmp_path / "c.parquet", check_files=False)
    assert len(cohort) == 4 and cohort.has_survival


# ------------------------------------------------------------------------------------ time and horizon
def test_check_horizon_errors_beyond_follow_up_naming_flag_and_column():
    from cxr_risk.cohort import check_horizon

    time = np.array([0.5, 3.0, 7.25, 10.0])
    with pytest.raises(ValueError) as err:
        check_horizon(time, 12.0, "years", horizon_name="--horizon", source="dev.csv")
    msg = str(err.value)
    assert "--horizon 12 years" in msg and "column 'time' of dev.csv (10 years)" in msg
    assert "--horizon <= 10" in msg
    assert check_horizon(time, 10.0, "years") == []  # the longest follow-up itself is allowed
    with pytest.raises(ValueError, match="must be > 0"):
        check_horizon(time, 0.0)
    with pytest.raises(ValueError, match="fortnights"):
        check_horizon(time, 1.0, "fortnights")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "unit,times_scale,horizon,expect",
    [
        ("years", 365.25, 12.0, "look like weeks or days, not years"),  # days read as years
        ("months", 365.25, 360.0, "look like weeks or days, not months"),
        ("months", 365.25 / 12, 12.0, None),  # 12 months in a cohort followed in months: fine
        ("years", 1.0, 12.0, None),
        ("days", 365.25, 365.0, None),
        (None, 365.25, 12.0, "days or months while the horizon looks like years"),
        (None, 1.0, 12.0, None),
    ],
)
def test_check_horizon_warns_when_units_look_wrong(unit, times_scale, horizon, expect):
    from cxr_risk.cohort import check_horizon

    rng = np.random.default_rng(0)
    years = np.r_[rng.uniform(2.0, 14.0, 199), 14.0]
    warnings = check_horizon(years * times_scale, horizon, unit, horizon_name="--horizon")
    if expect is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expect in warnings[0] and "--horizon" in warnings[0], warnings


def test_cohort_check_horizon_uses_its_source(tmp_path):
    rows = base_rows()
    csv = write_cohort(tmp_path, rows)
    cohort = Cohort.from_csv(csv)
    longest = float(cohort.table["time"].max())
    with pytest.raises(ValueError, match=rf"--horizon 99 is beyond .* of {re.escape(str(csv))}"):
        cohort.check_horizon(99.0, horizon_name="--horizon")
    assert cohort.check_horizon(longest) == []
