"""Cohorts with follow-up: a validated table of images, patients, times and events, and its splits.

One row per image. Standard column names (``Cohort.from_frame`` maps others onto them):

=================  =====================================================================
``path``           image file, absolute or relative to ``root`` (default: the CSV's folder)
``patient_id``     patient identifier (only used to group rows; never written to outputs)
``time``           follow-up from the index date, in the cohort's unit (e.g. years), >= 0
``event``          1 = event (death) observed at ``time``, 0 = censored at ``time``
``label_*``        diagnostic labels: 1 positive, 0 negative, -1 uncertain, empty = missing
covariates         ``age``, ``sex``, ``smoking`` or any listed in ``covariate_columns``
``study_date``     date the image was taken (optional)
``index_date``     start of follow-up for the patient (optional); images taken after it are
                   dropped, because a model may not see the future it is asked to predict
``pseudonym``      a pseudonymous patient code (optional); unlike ``patient_id`` it is copied
                   into prediction and exclusion files, so they can be joined back
=================  =====================================================================

The table gains ``csv_line``: each row's line in the source file (header = line 1), kept through
exclusions and subsets, so outputs name rows the way the user's CSV does.

``time``/``event`` may both be absent (pretraining sets such as CheXpert); labels may be absent.

Splits are by patient (CXR-risk, Lu et al. 2019, and Chen et al. 2023 split PLCO by participant):
every image of a patient falls in the same split, and splits are stratified by the patient's event so
that each split has the cohort's event rate. Label-fraction subsets for label-efficiency sweeps
(Chen et al. 2023, section 4) are nested: the 5% subset is contained in the 10% subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

DEFAULT_COVARIATES: tuple[str, ...] = ("age", "sex", "smoking")
LABEL_PREFIX = "label_"
#: Column a cohort's table gains: each row's line in the source CSV (header = line 1; a frame's row + 2), so
#: that outputs (predictions, QC and exclusion reports) can be joined back to the table the user gave.
LINE_COLUMN = "csv_line"
#: Optional column with a pseudonymous patient code that outputs may carry (``patient_id`` never is).
PSEUDONYM_COLUMN = "pseudonym"
MAX_LISTED_ERRORS = 20

#: Units a cohort's ``time`` column may be in (stored in checkpoints, printed in reports).
TIME_UNITS: tuple[str, ...] = ("years", "months", "weeks", "days")
#: About a century in each unit: no human follow-up is longer, so a median follow-up above it means the
#: times are in a finer unit than the one declared (days read as years, say).
PLAUSIBLE_FOLLOW_UP: dict[str, float] = {"years": 100.0, "months": 1200.0, "weeks": 5200.0, "days": 36500.0}


_COLUMN_MEANINGS = {"path": "the image file", "patient_id": "the patient identifier"}


def _missing_column_message(column: str) -> str:
    return (
        f"missing column {column!r} ({_COLUMN_MEANINGS[column]}): name that column {column!r} in the CSV "
        f"header (in Python, or map it: Cohort.from_csv(..., columns={{'yours': {column!r}}}))"
    )


class CohortError(ValueError):
    """A cohort table failed validation; ``errors`` lists ``(line, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[int | None, str]]) -> None:
        self.errors = errors
        lines = [f"  line {line}: {msg}" if line is not None else f"  {msg}" for line, msg in errors]
        more = len(lines) - MAX_LISTED_ERRORS
        shown = lines[:MAX_LISTED_ERRORS] + ([f"  ... and {more} more"] if more > 0 else [])
        super().__init__(f"cohort {source}: {len(errors)} problem(s)\n" + "\n".join(shown))


@dataclass
class Cohort:
    """A validated cohort table (one row per image) with its label and covariate columns.

    Build with :meth:`from_csv`, :meth:`from_parquet` or :meth:`from_frame`; ``excluded`` keeps the rows
    that were dropped (images after the index date) with a ``reason`` column.
    """

    table: pd.DataFrame
    label_columns: tuple[str, ...] = ()
    covariate_columns: tuple[str, ...] = ()
    excluded: pd.DataFrame = field(default_factory=pd.DataFrame)
    source: str = "<frame>"

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        *,
        root: str | Path | None = None,
        columns: dict[str, str] | None = None,
        label_columns: Sequence[str] | None = None,
        covariate_columns: Sequence[str] | None = None,
        check_files: bool = True,
        source: str = "<frame>",
    ) -> Cohort:
        """Validate ``frame`` and return a cohort; raises :class:`CohortError` listing every problem.

        Args:
            root: folder that relative paths are resolved against (default: current directory).
            columns: renames from the frame's names to the standard ones, e.g. ``{"file": "path"}``.
            label_columns: diagnostic label columns (default: every ``label_*`` column).
            covariate_columns: covariates (default: those of ``age``, ``sex``, ``smoking`` present).
            check_files: report rows whose image file does not exist.
        """
        df = frame.rename(columns=columns or {}).reset_index(drop=True).copy()
        if LINE_COLUMN in df.columns:
            raise CohortError(
                source,
                [
                    (
                        None,
                        f"column {LINE_COLUMN!r} is reserved (cxr-risk adds each row's CSV line); rename it",
                    )
                ],
            )
        # CSV line of each row (header is line 1): for error messages, and kept so outputs can join back.
        df[LINE_COLUMN] = np.arange(len(df)) + 2
        errors: list[tuple[int | None, str]] = []
        for required in ("path", "patient_id"):
            if required not in df.columns:
                errors.append((None, _missing_column_message(required)))
        has_time, has_event = "time" in df.columns, "event" in df.columns
        if has_time != has_event:
            errors.append((None, "'time' and 'event' must both be present or both absent"))
        if errors:
            raise CohortError(source, errors)

        labels = (
            tuple(label_columns)
            if label_columns is not None
            else tuple(c for c in df.columns if str(c).startswith(LABEL_PREFIX))
        )
        covariates = (
            tuple(covariate_columns)
            if covariate_columns is not None
            else tuple(c for c in DEFAULT_COVARIATES if c in df.columns)
        )
        for col in labels + covariates:
            if col not in df.columns:
                errors.append((None, f"listed column {col!r} is not in the table"))
        if errors:
            raise CohortError(source, errors)

        base = Path(root) if root is not None else Path.cwd()
        raw_paths = df["path"]
        bad_path = raw_paths.isna() | (raw_paths.astype(str).str.strip() == "")
        for line in df.loc[bad_path, LINE_COLUMN]:
            errors.append((int(line), "empty image path"))
        resolved = [
            str(p if (p := Path(str(v))).is_absolute() else (base / p)) if not bad else ""
            for v, bad in zip(raw_paths, bad_path, strict=True)
        ]
        df["path"] = resolved
        dup = df["path"].duplicated(keep="first") & ~bad_path
        for line, path in zip(df.loc[dup, LINE_COLUMN], df.loc[dup, "path"], strict=True):
            first = int(df.loc[(df["path"] == path) & ~dup, LINE_COLUMN].iloc[0])
            errors.append((int(line), f"duplicate image (same file as line {first})"))
        if check_files:
            for line, path, bad in zip(df[LINE_COLUMN], df["path"], bad_path, strict=True):
                if not bad and not Path(path).is_file():
                    errors.append((int(line), f"image file not found: {path}"))

        pid_missing = df["patient_id"].isna() | (df["patient_id"].astype(str).str.strip() == "")
        for line in df.loc[pid_missing, LINE_COLUMN]:
            errors.append((int(line), "empty patient_id"))
        df["patient_id"] = df["patient_id"].astype(str)

        if has_time:
            time = pd.to_numeric(df["time"], errors="coerce")
            for line, raw, t in zip(df[LINE_COLUMN], df["time"], time, strict=True):
                if pd.isna(t):
                    errors.append((int(line), f"follow-up time {raw!r} is not a number"))
                elif t < 0:
                    errors.append((int(line), f"negative follow-up time {t}"))
            event = pd.to_numeric(df["event"], errors="coerce")
            for line, raw, e in zip(df[LINE_COLUMN], df["event"], event, strict=True):
                if pd.isna(e) or e not in (0, 1):
                    errors.append((int(line), f"event {raw!r} is not 0 or 1"))
            df["time"], df["event"] = time.astype(float), event
            per_patient = df.groupby("patient_id")[["time", "event"]].nunique()
            for pid in per_patient.index[(per_patient > 1).any(axis=1)]:
                line = int(df.loc[df["patient_id"] == pid, LINE_COLUMN].iloc[0])
                errors.append((line, "rows of one patient disagree on time/event (follow-up is per patient)"))

        for col in labels:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = (values.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")) | ~(
                values.isna() | values.isin((-1, 0, 1))
            )
            for line, raw in zip(df.loc[bad, LINE_COLUMN], df.loc[bad, col], strict=True):
                errors.append((int(line), f"label {col}={raw!r} is not 1, 0, -1 (uncertain) or empty"))
            df[col] = values.astype(float)

        excluded = pd.DataFrame()
        if "study_date" in df.columns and "index_date" in df.columns:
            dates = {}
            for col in ("study_date", "index_date"):
                parsed = pd.to_datetime(df[col], errors="coerce", format="mixed")
                for line, raw in zip(
                    df.loc[parsed.isna(), LINE_COLUMN], df.loc[parsed.isna(), col], strict=True
                ):
                    errors.append((int(line), f"{col} {raw!r} is not a date"))
                dates[col] = parsed
            df["study_date"], df["index_date"] = dates["study_date"], dates["index_date"]
            late = df["study_date"] > df["index_date"]
            excluded = df.loc[late].assign(reason="image taken after the index date")
            df = df.loc[~late]
        elif "index_date" in df.columns:
            errors.append((None, "'index_date' given without 'study_date': cannot tell which images to drop"))

        if errors:
            errors.sort(key=lambda e: (e[0] is not None, e[0] or 0))
            raise CohortError(source, errors)
        if has_time:
            df["event"] = df["event"].astype(int)
        return cls(
            table=df.reset_index(drop=True),
            label_columns=labels,
            covariate_columns=covariates,
            excluded=excluded.reset_index(drop=True),
            source=source,
        )

    @classmethod
    def from_csv(cls, path: str | Path, *, root: str | Path | None = None, **kwargs: object) -> Cohort:
        """Read a cohort CSV; relative image paths resolve against ``root`` (default: the CSV's folder)."""
        path = Path(path)
        frame = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=True)
        return cls.from_frame(
            frame, root=root if root is not None else path.parent, source=str(path), **kwargs
        )

    @classmethod
    def from_parquet(cls, path: str | Path, *, root: str | Path | None = None, **kwargs: object) -> Cohort:
        """Read a cohort parquet file (needs ``pyarrow`` or ``fastparquet``)."""
        path = Path(path)
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise ImportError(
                f"Cohort.from_parquet({path}): {err}. Install pyarrow: `pip install pyarrow`"
            ) from err
        return cls.from_frame(
            frame, root=root if root is not None else path.parent, source=str(path), **kwargs
        )

    @classmethod
    def read(cls, path: str | Path, **kwargs: object) -> Cohort:
        """CSV or parquet by suffix."""
        reader = cls.from_parquet if Path(path).suffix.lower() in (".parquet", ".pq") else cls.from_csv
        return reader(path, **kwargs)

    # ------------------------------------------------------------------------------------------ use
    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_survival(self) -> bool:
        return "time" in self.table.columns

    @property
    def paths(self) -> list[str]:
        return self.table["path"].tolist()

    @property
    def patient_ids(self) -> np.ndarray:
        return self.table["patient_id"].to_numpy()

    @property
    def events(self) -> np.ndarray | None:
        return self.table["event"].to_numpy(dtype=np.int64) if self.has_survival else None

    @property
    def lines(self) -> np.ndarray:
        """Each row's line in the source CSV (header = line 1); a cohort built without one: row + 2."""
        if LINE_COLUMN in self.table.columns:
            return self.table[LINE_COLUMN].to_numpy(np.int64)
        return np.arange(len(self), dtype=np.int64) + 2

    def key_columns(self, table: pd.DataFrame | None = None) -> pd.DataFrame:
        """The columns that join an output back to the user's table: ``csv_line``, ``path`` and
        ``pseudonym`` when the cohort has one (never ``patient_id``); of ``table`` (default: this cohort's)."""
        table = self.table if table is None else table
        keys = pd.DataFrame(
            {
                LINE_COLUMN: table[LINE_COLUMN].to_numpy(np.int64)
                if LINE_COLUMN in table.columns
                else np.arange(len(table), dtype=np.int64) + 2,
                "path": table["path"].to_numpy() if "path" in table.columns else "",
            }
        )
        if PSEUDONYM_COLUMN in table.columns:
            keys[PSEUDONYM_COLUMN] = table[PSEUDONYM_COLUMN].to_numpy()
        return keys

    def check_events(self, *, what: str = "training") -> None:
        """Raise a ValueError (naming the CSV columns) unless the cohort has usable follow-up: at least one
        finite, positive follow-up time and at least one observed event. A survival loss, a Breslow baseline
        and a C-index are all undefined without an event, so this is checked before any training starts."""
        if not self.has_survival:
            raise ValueError(
                f"cohort {self.source}: no 'time' and 'event' columns; {what} needs follow-up (add both "
                "columns: 'time' = follow-up from the index date, 'event' = 1 death observed, 0 censored)"
            )
        time = self.table["time"].to_numpy(np.float64)
        event = self.table["event"].to_numpy(np.int64)
        usable = np.isfinite(time) & (time > 0)
        if len(self) == 0 or not usable.any():
            raise ValueError(
                f"cohort {self.source}: no usable follow-up: column 'time' is 0 or empty in all {len(self)} "
                f"rows; {what} needs follow-up times > 0 (time from the index date to death or censoring)"
            )
        if not (event[usable] == 1).any():
            raise ValueError(
                f"cohort {self.source}: no events: column 'event' is 0 (censored) in all {len(self)} rows "
                f"with follow-up; {what} needs at least one observed death (event = 1); check that 'event' "
                "is coded 1 = death observed, 0 = censored"
            )

    def check_horizon(
        self, horizon: float, time_unit: str | None = None, *, horizon_name: str = "horizon"
    ) -> list[str]:
        """:func:`check_horizon` on this cohort's ``time`` column (an error if it has no follow-up)."""
        if not self.has_survival:
            raise ValueError(
                f"cohort {self.source}: no 'time'/'event' columns; {horizon_name} needs follow-up"
            )
        return check_horizon(
            self.table["time"].to_numpy(np.float64),
            horizon,
            time_unit,
            horizon_name=horizon_name,
            source=self.source,
        )

    def subset(self, rows: np.ndarray | Sequence[int]) -> Cohort:
        """Rows by position (integer array) or boolean mask, as a new cohort."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return Cohort(
            table=self.table.iloc[rows].reset_index(drop=True),
            label_columns=self.label_columns,
            covariate_columns=self.covariate_columns,
            excluded=self.excluded,
            source=self.source,
        )

    def label_matrix(
        self, uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, mask)`` as float32 and bool arrays ``(N, L)``; missing labels are masked out.

        ``uncertain`` (-1) is masked (``"ignore"``) or mapped to 0/1 (CheXpert's U-Zeros / U-Ones,
        Irvin et al. 2019, section 4).
        """
        if uncertain not in ("ignore", "zeros", "ones"):
            raise ValueError(f"label_matrix: uncertain={uncertain!r} must be 'ignore', 'zeros' or 'ones'")
        if not self.label_columns:
            return np.zeros((len(self), 0), np.float32), np.zeros((len(self), 0), bool)
        values = self.table[list(self.label_columns)].to_numpy(dtype=np.float64)
        mask = ~np.isnan(values)
        unc = values == -1
        if uncertain == "ignore":
            mask &= ~unc
        # Masked entries read 0 so that a loss never sees a -1 target, masked or not.
        values = np.where(unc, 1.0 if uncertain == "ones" else 0.0, values)
        return np.nan_to_num(values, nan=0.0).astype(np.float32), mask

    def covariate_matrix(self) -> np.ndarray:
        """Covariates as float32 ``(N, C)``; ``sex`` M/F becomes 1/0, missing values NaN."""
        cols = []
        for col in self.covariate_columns:
            series = self.table[col]
            if col == "sex":
                series = series.astype(str).str.upper().str[:1].map({"M": 1.0, "F": 0.0})
            cols.append(pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64))
        if not cols:
            return np.zeros((len(self), 0), np.float32)
        return np.stack(cols, axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------ time and horizon
def check_time_unit(unit: str | None, *, name: str = "time_unit") -> str | None:
    """``unit`` if it is one of :data:`TIME_UNITS` (or None: not recorded), else a ValueError naming ``name``."""
    if unit is not None and unit not in TIME_UNITS:
        raise ValueError(f"{name}={unit!r} must be one of {', '.join(TIME_UNITS)}")
    return unit


def check_horizon(
    time: np.ndarray,
    horizon: float,
    time_unit: str | None = None,
    *,
    horizon_name: str = "horizon",
    time_name: str = "time",
    source: str = "cohort",
) -> list[str]:
    """Check that ``horizon`` lies within the follow-up in ``time``; return warnings about the units.

    Error: the horizon is beyond the longest follow-up, so nobody's status at the horizon is observed and
    every horizon metric (AUC, Brier, calibration, observed mortality) would be an extrapolation. Warnings:
    the median follow-up is longer than a century in ``time_unit`` (times in days read as years, say), or,
    with no unit given, the times look like days or months (median > 100) while the horizon looks like
    years (<= 100). ``horizon_name``/``time_name`` are what the messages call them (a CLI passes its flag
    and the CSV column).
    """
    check_time_unit(time_unit)
    t = np.asarray(time, dtype=np.float64)
    if t.size == 0:
        raise ValueError(f"{source}: no follow-up times in column {time_name!r}")
    unit = f" {time_unit}" if time_unit else ""
    longest, median = float(t.max()), float(np.median(t))
    if not horizon > 0:
        raise ValueError(f"{horizon_name} {horizon:g} must be > 0 (same unit as column {time_name!r})")
    if horizon > longest:
        raise ValueError(
            f"{horizon_name} {horizon:g}{unit} is beyond the longest follow-up in column {time_name!r} of "
            f"{source} ({longest:.4g}{unit}): no patient's status at the horizon is observed; choose "
            f"{horizon_name} <= {longest:.4g}, or check that {time_name!r} is in the same unit as the horizon"
        )
    warnings: list[str] = []
    if time_unit is not None and median > PLAUSIBLE_FOLLOW_UP[time_unit]:
        finer = [u for u in TIME_UNITS[TIME_UNITS.index(time_unit) + 1 :] if median <= PLAUSIBLE_FOLLOW_UP[u]]
        warnings.append(
            f"median follow-up in column {time_name!r} of {source} is {median:.4g} {time_unit}, longer than a "
            f"century: the times look like {' or '.join(finer) or 'a finer unit'}, not {time_unit}; convert "
            f"{time_name!r} or give the matching time unit (and {horizon_name} in it)"
        )
    elif time_unit is None and median > 100 and horizon <= 100:
        warnings.append(
            f"median follow-up in column {time_name!r} of {source} is {median:.4g} while {horizon_name} is "
            f"{horizon:g}: the times look like days or months while the horizon looks like years; give the "
            "time unit and a horizon in it"
        )
    return warnings


# ----------------------------------------------------------------------------------- array kernels
def _patient_strata(
    patient_ids: np.ndarray, events: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique patients, row -> patient index, patient stratum = any event of the patient)."""
    patients, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    strata = np.zeros(len(patients), dtype=np.int64)
    if events is not None:
        np.maximum.at(strata, inverse, np.asarray(events, dtype=np.int64))
    return patients, inverse, strata


def assign_patient_splits(
    patient_ids: np.ndarray, events: np.ndarray | None, fractions: Sequence[float], seed: int
) -> np.ndarray:
    """Split index (0..len(fractions)-1) per row; by patient, stratified by the patient's event.

    Within each stratum, patients are shuffled with ``seed`` and cut by largest-remainder rounding of
    ``fractions``, so split sizes are exact to one patient per stratum.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or (fr < 0).any() or not math.isclose(fr.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions={list(fractions)} must be non-negative and sum to 1")
    _, inverse, strata = _patient_strata(patient_ids, events)
    rng = np.random.default_rng(seed)
    patient_split = np.zeros(len(strata), dtype=np.int64)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        quota = fr * len(members)
        counts = np.floor(quota).astype(np.int64)
        remainder = len(members) - counts.sum()
        counts[np.argsort(-(quota - counts), kind="stable")[:remainder]] += 1
        patient_split[members] = np.repeat(np.arange(len(fr)), counts)
    return patient_split[inverse]


def assign_folds(patient_ids: np.ndarray, events: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per row; by patient, stratified by event, fold sizes within one patient."""
    if k < 2:
        raise ValueError(f"kfold: k={k} must be >= 2")
    _, inverse, strata = _patient_strata(patient_ids, events)
    if len(strata) < k:
        raise ValueError(f"kfold: k={k} folds need at least k patients; the cohort has {len(strata)}")
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(strata), dtype=np.int64)
    offset = 0
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        # Continue the round-robin across strata so that total fold sizes also differ by at most one.
        folds[members] = (offset + np.arange(len(members))) % k
        offset += len(members)
    return folds[inverse]


def nested_patient_subsets(
    patient_ids: np.ndarray, events: np.ndarray | None, fractions: Sequence[float], seed: int
) -> dict[float, np.ndarray]:
    """Boolean row masks per fraction; a larger fraction's subset contains every smaller one.

    One seeded permutation of the patients per stratum; the subset for fraction ``f`` is the first
    ``ceil(f * n_stratum)`` patients of each stratum, which makes the subsets nested by construction.
    """
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fractions must be in (0, 1]; got {f}")
    _, inverse, strata = _patient_strata(patient_ids, events)
    rng = np.random.default_rng(seed)
    rank = np.zeros(len(strata), dtype=np.float64)  # position within stratum / stratum size
    size = np.zeros(len(strata), dtype=np.int64)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        rank[members] = np.arange(len(members))
        size[members] = len(members)
    out = {}
    for f in sorted(set(float(x) for x in fractions)):
        take = np.ceil(f * size - 1e-9)
        out[f] = (rank < take)[inverse]
    return out


# ----------------------------------------------------------------------------------- on cohorts
def patient_split(
    cohort: Cohort,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    names: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, Cohort]:
    """Patient-level train/val/test (or any named) split, stratified by event when the cohort has one."""
    if len(names) != len(fractions):
        raise ValueError(f"patient_split: {len(names)} names for {len(fractions)} fractions")
    events = cohort.events if stratify else None
    which = assign_patient_splits(cohort.patient_ids, events, fractions, seed)
    return {name: cohort.subset(which == i) for i, name in enumerate(names)}


def kfold(cohort: Cohort, k: int = 5, seed: int = 0, stratify: bool = True) -> list[tuple[Cohort, Cohort]]:
    """``k`` (train, held-out) pairs; each patient is held out exactly once."""
    folds = assign_folds(cohort.patient_ids, cohort.events if stratify else None, k, seed)
    return [(cohort.subset(folds != i), cohort.subset(folds == i)) for i in range(k)]


def label_fraction_subsets(
    cohort: Cohort,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
    seed: int = 0,
    stratify: bool = True,
) -> dict[float, Cohort]:
    """Nested patient-level subsets for label-efficiency sweeps (apply to the training split only)."""
    masks = nested_patient_subsets(cohort.patient_ids, cohort.events if stratify else None, fractions, seed)
    return {f: cohort.subset(m) for f, m in masks.items()}
