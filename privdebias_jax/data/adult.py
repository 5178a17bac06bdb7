"""UCI Adult ("Census Income") loader: tabular features, income target, ``sex`` or ``race`` attribute.

The loader reads the two standard files of the UCI archive, ``adult.data`` (training split)
and ``adult.test`` (test split), from a directory. No package ships them, so they are looked
up in this order:

1. the ``data_dir`` argument;
2. the ``PRIVDEBIAS_ADULT_DIR`` environment variable;
3. ``cache_dir`` (default ``~/.cache/privdebias_jax/adult``), where :func:`fetch_adult`
   downloads them when ``download=True`` and the network is reachable.

File format (both files): one record per line, 15 fields separated by ``", "``, ``?`` for a
missing value; ``adult.test`` starts with the line ``|1x3 Cross validator`` and its income
labels carry a trailing dot (``>50K.``). Rows with any missing value are dropped (the usual
convention: 30,162 training and 15,060 test rows remain of 32,561 and 16,281).

Features (``x``, float32, shape ``(N, D)``):

* the numeric columns :data:`ADULT_NUMERIC_COLUMNS`, standardised with the statistics of the
  *training* split only: ``x' = (x - mean_train) / std_train`` (population std, ``ddof=0``;
  a constant column gets ``std = 1``), the same transform applied to the test split;
* the categorical columns :data:`ADULT_CATEGORICAL_COLUMNS`, one-hot encoded with the
  categories of train ∪ test sorted alphabetically, so the layout does not depend on row order.

Numeric columns come first, then one block per categorical column in
:data:`ADULT_CATEGORICAL_COLUMNS` order; ``info["feature_names"]`` names every column
(``"age"``, ``"sex=Female"``, ...). The target is ``y = 1`` iff income is ``>50K``; the
protected attribute ``a`` is the code of ``sex`` (Female = 0, Male = 1) or of ``race``
(alphabetical codes). With ``include_attribute_feature=True`` the attribute's one-hot block
stays in ``x`` at ``info["attribute_columns"] = (start, stop)``, and the counterfactual
(:func:`adult_counterfactual`) rewrites that block.
"""

from __future__ import annotations

import functools
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdebias_jax.data.dataset import Dataset, DataSplits, make_dataset
from privdebias_jax.types import PrivDebiasError

#: The 15 columns of ``adult.data`` / ``adult.test``, in file order.
ADULT_COLUMNS: tuple[str, ...] = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
#: Integer-valued columns, standardised with the training mean and std.
ADULT_NUMERIC_COLUMNS: tuple[str, ...] = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)
#: Categorical columns, one-hot encoded (categories of train ∪ test, sorted).
ADULT_CATEGORICAL_COLUMNS: tuple[str, ...] = (
    "workclass",
    "education",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "native-country",
)
#: The target column and its two labels (after removing the test file's trailing dot).
ADULT_TARGET_COLUMN = "income"
ADULT_INCOME_LABELS: tuple[str, str] = ("<=50K", ">50K")
#: Columns usable as the protected attribute ``a``.
ADULT_ATTRIBUTES: tuple[str, ...] = ("sex", "race")
#: The data files the loader needs, and the ones :func:`fetch_adult` downloads.
ADULT_FILES: tuple[str, str] = ("adult.data", "adult.test")
ADULT_DOWNLOAD_FILES: tuple[str, ...] = ("adult.data", "adult.test", "adult.names")
#: Where :func:`fetch_adult` downloads from.
ADULT_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/"
#: Environment variable naming a directory that holds ``adult.data`` and ``adult.test``.
ADULT_DIR_ENV = "PRIVDEBIAS_ADULT_DIR"
#: Default download / lookup directory when neither ``data_dir`` nor the env var is set.
DEFAULT_ADULT_CACHE_DIR = Path("~/.cache/privdebias_jax/adult")


def _how_to_get(directory: Path) -> str:
    return (
        f"Put the UCI Adult files {' and '.join(ADULT_FILES)} in one directory and pass it as "
        f"`data_dir` (or set ${ADULT_DIR_ENV}), or call load_adult(download=True) on a machine "
        f"with network access to download them from {ADULT_URL} into {directory}."
    )


def _missing_files(data_dir: Path) -> list[Path]:
    return [data_dir / f for f in ADULT_FILES if not (data_dir / f).is_file()]


def _parse_adult_file(path: Path) -> tuple[pd.DataFrame, int]:
    """Parse one Adult file into a DataFrame; return it and the number of dropped rows."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PrivDebiasError(f"cannot read Adult file {path}: {e}") from e
    rows: list[list[str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("|"):  # blank lines, the "|1x3 Cross validator" header
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(ADULT_COLUMNS):
            raise PrivDebiasError(
                f"malformed Adult file {path}: line {lineno} has {len(fields)} comma-separated "
                f"fields, expected {len(ADULT_COLUMNS)} ({', '.join(ADULT_COLUMNS)})"
            )
        rows.append(fields)
    if not rows:
        raise PrivDebiasError(f"malformed Adult file {path}: it holds no records")
    df = pd.DataFrame(rows, columns=list(ADULT_COLUMNS))
    df = df.replace("?", np.nan)
    n_raw = len(df)
    df = df.dropna(axis=0, how="any").reset_index(drop=True)
    if df.empty:
        raise PrivDebiasError(f"malformed Adult file {path}: every record has a missing value")
    income = df[ADULT_TARGET_COLUMN].str.rstrip(".")
    bad = sorted(set(income) - set(ADULT_INCOME_LABELS))
    if bad:
        raise PrivDebiasError(
            f"malformed Adult file {path}: unknown income labels {bad[:5]}, expected one of "
            f"{list(ADULT_INCOME_LABELS)} (optionally with a trailing '.')"
        )
    df[ADULT_TARGET_COLUMN] = income
    for col in ADULT_NUMERIC_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            example = df.loc[values.isna(), col].iloc[0]
            raise PrivDebiasError(
                f"malformed Adult file {path}: column {col!r} holds the non-numeric value {example!r}"
            )
        df[col] = values.astype(np.int64)
    return df, n_raw - len(df)


def read_adult_files(data_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``adult.data`` and ``adult.test`` from ``data_dir`` into two DataFrames.

    Each DataFrame has the columns :data:`ADULT_COLUMNS` in file order, integer numeric
    columns, string categorical columns and ``income`` normalised to ``"<=50K"`` / ``">50K"``
    (the test file's trailing dot removed). Rows holding a missing value (``?``) are dropped;
    the remaining rows keep their file order (index ``0..n-1``). Blank lines and lines starting
    with ``|`` (the test file's ``|1x3 Cross validator`` header) are skipped.

    Returns:
      ``(train_df, test_df)``.

    Raises:
      PrivDebiasError: if the directory or one of the files is missing (the message names the
        missing file's path and how to get it), or a file is malformed (a line without exactly
        15 fields, a non-numeric value in a numeric column, an unknown income label).
    """
    data_dir = Path(data_dir).expanduser()
    missing = _missing_files(data_dir)
    if missing:
        where = "" if data_dir.is_dir() else f" (the directory {data_dir} does not exist)"
        raise PrivDebiasError(
            f"Adult data file not found: {', '.join(str(p) for p in missing)}{where}. "
            + _how_to_get(data_dir)
        )
    train_df, _ = _parse_adult_file(data_dir / "adult.data")
    test_df, _ = _parse_adult_file(data_dir / "adult.test")
    return train_df, test_df


def fetch_adult(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    url: str = ADULT_URL,
    timeout: float = 30.0,
) -> Path:
    """Download ``adult.data``, ``adult.test`` and ``adult.names`` into ``cache_dir``.

    Files already present are kept (not downloaded again). Each file is written to a temporary
    file in ``cache_dir`` first and renamed into place only once complete, so an interrupted
    download never leaves a truncated file behind.

    Args:
      cache_dir: target directory (created if needed); default ``~/.cache/privdebias_jax/adult``.
      url: base URL of the UCI archive directory (must end with ``/``).
      timeout: seconds per HTTP request.

    Returns:
      The directory holding the files.

    Raises:
      PrivDebiasError: when the network is unavailable or a download fails; the message names
        the file and the directory where to put it by hand.
    """
    target = Path(cache_dir if cache_dir is not None else DEFAULT_ADULT_CACHE_DIR).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrivDebiasError(f"cannot create the Adult cache directory {target}: {e}") from e
    for name in ADULT_DOWNLOAD_FILES:
        dest = target / name
        if dest.is_file():
            continue
        file_url = url + name
        tmp_name: str | None = None
        try:
            with urllib.request.urlopen(file_url, timeout=timeout) as response:
                payload = response.read()
            if not payload:
                raise OSError("empty response")
            with tempfile.NamedTemporaryFile(
                dir=target, prefix=f".{name}.", suffix=".part", delete=False
            ) as tmp:
                tmp_name = tmp.name
                tmp.write(payload)
            os.replace(tmp_name, dest)
            tmp_name = None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise PrivDebiasError(
                f"could not download {file_url}: the network is unavailable or the server "
                f"failed ({type(e).__name__}: {e}). Download {name} by hand and put it in "
                f"{target}, or pass `data_dir` pointing to a directory with "
                f"{' and '.join(ADULT_FILES)}."
            ) from e
        finally:
            if tmp_name is not None and os.path.exists(tmp_name):
                os.remove(tmp_name)
    return target


def _resolve_data_dir(
    data_dir: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None
) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ADULT_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(cache_dir if cache_dir is not None else DEFAULT_ADULT_CACHE_DIR).expanduser()


def _attribute_count(attribute_columns: tuple[int, int] | None, num_attributes: int | None) -> int:
    if num_attributes is not None:
        return int(num_attributes)
    if attribute_columns is not None:
        return int(attribute_columns[1]) - int(attribute_columns[0])
    raise PrivDebiasError(
        "adult_counterfactual: pass `num_attributes` when the attribute is not a feature "
        "(attribute_columns=None)"
    )


def adult_counterfactual(
    ds: Dataset,
    a_new: Any,
    attribute_columns: tuple[int, int] | None,
    num_attributes: int | None = None,
) -> Dataset:
    """The same Adult rows with the protected attribute set to ``a_new``.

    ``y`` and ``idx`` are kept; ``a`` becomes ``a_new``; when the attribute is a feature, the
    columns ``x[:, start:stop]`` (its one-hot block) become ``one_hot(a_new, stop - start)``
    and every other column is unchanged. With ``attribute_columns=None`` (attribute excluded
    from the features) ``x`` is returned unchanged.

    Args:
      ds: an Adult dataset, ``x`` of shape ``(N, D)``.
      a_new: int array of shape ``(N,)`` with values in ``[0, num_attributes)``, a single int
        (the same value for every row), or the string ``"flip"``: ``1 - a`` for a binary
        attribute such as ``sex``.
      attribute_columns: ``(start, stop)`` of the attribute's one-hot block in ``x``
        (``info["attribute_columns"]`` of :func:`load_adult`), or ``None``.
      num_attributes: number of attribute values; default ``stop - start``.

    Returns:
      A new :class:`Dataset` (NumPy arrays).

    Raises:
      PrivDebiasError: for a wrong length, non-integer or out-of-range ``a_new``, ``"flip"`` on
        a non-binary attribute, or a block outside ``x``'s columns.
    """
    k = _attribute_count(attribute_columns, num_attributes)
    a_old = np.asarray(ds.a)
    n = a_old.shape[0]
    if isinstance(a_new, str):
        if a_new != "flip":
            raise PrivDebiasError(
                f"adult_counterfactual: a_new must be an int array or 'flip', got {a_new!r}"
            )
        if k != 2:
            raise PrivDebiasError(
                f"adult_counterfactual: 'flip' needs a binary attribute, this one has {k} values; "
                "pass an explicit int array of new attribute values"
            )
        a_arr = 1 - a_old.astype(np.int32)
    else:
        a_arr = np.asarray(a_new)
        if a_arr.ndim == 0:
            a_arr = np.full((n,), a_arr)
        if a_arr.shape != (n,):
            raise PrivDebiasError(
                f"adult_counterfactual: a_new must have shape ({n},), got {a_arr.shape}"
            )
        if a_arr.dtype == bool or not (
            np.issubdtype(a_arr.dtype, np.integer)
            or (np.issubdtype(a_arr.dtype, np.floating) and np.all(a_arr == np.round(a_arr)))
        ):
            raise PrivDebiasError(
                f"adult_counterfactual: a_new must hold integers, got dtype {a_arr.dtype}"
            )
        a_arr = a_arr.astype(np.int32)
    if n and (a_arr.min() < 0 or a_arr.max() >= k):
        raise PrivDebiasError(
            f"adult_counterfactual: a_new out of range [0, {k}): min {a_arr.min()}, max {a_arr.max()}"
        )
    x = np.array(ds.x, dtype=np.float32, copy=True)
    if attribute_columns is not None:
        start, stop = int(attribute_columns[0]), int(attribute_columns[1])
        if x.ndim != 2 or not 0 <= start < stop <= x.shape[1] or stop - start != k:
            raise PrivDebiasError(
                f"adult_counterfactual: attribute_columns {attribute_columns} do not fit x of "
                f"shape {x.shape} with {k} attribute values"
            )
        x[:, start:stop] = np.eye(k, dtype=np.float32)[a_arr]
    return Dataset(x=x, y=np.asarray(ds.y), a=a_arr, idx=np.asarray(ds.idx))


def _encode(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    attribute: str,
    include_attribute_feature: bool,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Standardise numerics (train statistics) and one-hot categoricals (train ∪ test)."""
    num_train = train_df[list(ADULT_NUMERIC_COLUMNS)].to_numpy(np.float64)
    num_test = test_df[list(ADULT_NUMERIC_COLUMNS)].to_numpy(np.float64)
    mean = num_train.mean(axis=0)
    std = num_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    blocks_train = [(num_train - mean) / std]
    blocks_test = [(num_test - mean) / std]
    names = list(ADULT_NUMERIC_COLUMNS)
    categories: dict[str, list[str]] = {}
    attribute_columns: tuple[int, int] | None = None
    for col in ADULT_CATEGORICAL_COLUMNS:
        cats = sorted(set(train_df[col]) | set(test_df[col]))
        categories[col] = cats
        if col == attribute and not include_attribute_feature:
            continue
        eye = np.eye(len(cats))
        for df, blocks in ((train_df, blocks_train), (test_df, blocks_test)):
            codes = pd.Categorical(df[col], categories=cats).codes
            blocks.append(eye[codes])
        if col == attribute:
            attribute_columns = (len(names), len(names) + len(cats))
        names.extend(f"{col}={c}" for c in cats)
    info = {
        "feature_names": names,
        "categories": categories,
        "attribute_columns": attribute_columns,
        "numeric_mean": dict(zip(ADULT_NUMERIC_COLUMNS, mean.tolist(), strict=True)),
        "numeric_std": dict(zip(ADULT_NUMERIC_COLUMNS, std.tolist(), strict=True)),
    }
    return np.concatenate(blocks_train, axis=1), np.concatenate(blocks_test, axis=1), info


def load_adult(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    attribute: str = "sex",
    include_attribute_feature: bool = True,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DataSplits:
    """Load UCI Adult as :class:`DataSplits` (train = ``adult.data``, test = ``adult.test``).

    See the module docstring for the encoding. Shapes: ``x`` ``(N, D)`` float32 with
    ``D = 6 + sum of category counts`` (``D = 104`` on the full data with the attribute
    included), ``y``, ``a`` ``(N,)`` int32, ``idx`` ``(N,)`` int64. Training rows get ids
    ``0..n_train-1`` in file order (after dropping rows with missing values), test rows
    ``n_train..n_train+n_test-1``, so no id is shared across splits.

    Args:
      data_dir: directory holding ``adult.data`` and ``adult.test``; default
        ``$PRIVDEBIAS_ADULT_DIR``, else ``cache_dir``.
      attribute: the protected attribute ``a``: ``"sex"`` (Female = 0, Male = 1) or ``"race"``
        (alphabetical codes of the races present in train ∪ test).
      include_attribute_feature: keep the attribute's one-hot block in ``x`` (so the
        counterfactual flips it); otherwise ``x`` omits it and the counterfactual only
        changes ``a``.
      download: when the files are missing, fetch them with :func:`fetch_adult` into the
        resolved directory (needs network).
      cache_dir: download / lookup directory; default ``~/.cache/privdebias_jax/adult``.

    Returns:
      ``DataSplits(name="adult", test_unbiased=None, num_classes=2,
      num_attributes=len(info["attribute_values"]))`` whose ``counterfactual(ds, a_new)`` is
      :func:`adult_counterfactual` bound to this layout (``a_new`` may be ``"flip"`` for sex).
      ``info`` holds ``feature_names``, ``attribute``, ``attribute_values`` (category names in
      code order), ``attribute_columns`` (``(start, stop)`` or ``None``), ``categories``,
      ``numeric_mean``, ``numeric_std``, ``data_dir``, ``include_attribute_feature``.

    Raises:
      PrivDebiasError: for an unknown attribute, missing files (naming the path and how to get
        them), a malformed file or a failed download.
    """
    if attribute not in ADULT_ATTRIBUTES:
        raise PrivDebiasError(
            f"load_adult: unknown attribute {attribute!r}, expected one of {list(ADULT_ATTRIBUTES)}"
        )
    directory = _resolve_data_dir(data_dir, cache_dir)
    if _missing_files(directory) and download:
        fetch_adult(directory)
    train_df, test_df = read_adult_files(directory)
    x_train, x_test, info = _encode(train_df, test_df, attribute, include_attribute_feature)
    attribute_values: Sequence[str] = info["categories"][attribute]
    num_attributes = len(attribute_values)
    n_train, n_test = len(train_df), len(test_df)

    def build(df: pd.DataFrame, x: np.ndarray, start: int, split: str) -> Dataset:
        y = (df[ADULT_TARGET_COLUMN] == ">50K").to_numpy().astype(np.int32)
        a = pd.Categorical(df[attribute], categories=list(attribute_values)).codes.astype(np.int32)
        idx = np.arange(start, start + len(df), dtype=np.int64)
        return make_dataset(
            x, y, a, idx, num_classes=2, num_attributes=num_attributes, name=f"adult/{split}"
        )

    train = build(train_df, x_train, 0, "train")
    test = build(test_df, x_test, n_train, "test")
    info.update(
        attribute=attribute,
        attribute_values=list(attribute_values),
        data_dir=str(directory),
        include_attribute_feature=include_attribute_feature,
        n_train=n_train,
        n_test=n_test,
    )
    counterfactual = functools.partial(
        adult_counterfactual,
        attribute_columns=info["attribute_columns"],
        num_attributes=num_attributes,
    )
    return DataSplits(
        name="adult",
        train=train,
        test=test,
        test_unbiased=None,
        num_classes=2,
        num_attributes=num_attributes,
        counterfactual=counterfactual,
        info=info,
    )


__all__ = [
    "ADULT_COLUMNS",
    "ADULT_NUMERIC_COLUMNS",
    "ADULT_CATEGORICAL_COLUMNS",
    "ADULT_TARGET_COLUMN",
    "ADULT_INCOME_LABELS",
    "ADULT_ATTRIBUTES",
    "ADULT_FILES",
    "ADULT_URL",
    "ADULT_DIR_ENV",
    "DEFAULT_ADULT_CACHE_DIR",
    "read_adult_files",
    "fetch_adult",
    "load_adult",
    "adult_counterfactual",
]
