"""Tests of the UCI Adult loader on small synthetic files in the standard format."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from privdebias_jax.data.adult import (
    ADULT_CATEGORICAL_COLUMNS,
    ADULT_COLUMNS,
    ADULT_NUMERIC_COLUMNS,
    adult_counterfactual,
    fetch_adult,
    load_adult,
    read_adult_files,
)
from privdebias_jax.types import PrivDebiasError

REAL_ADULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"

_WORKCLASS = ["Private", "Self-emp-not-inc", "State-gov", "Local-gov"]
_EDUCATION = [("Bachelors", 13), ("HS-grad", 9), ("Masters", 14), ("11th", 7)]
_MARITAL = ["Never-married", "Married-civ-spouse", "Divorced"]
_OCCUPATION = ["Adm-clerical", "Exec-managerial", "Handlers-cleaners", "Sales"]
_RELATIONSHIP = ["Not-in-family", "Husband", "Wife", "Own-child"]
_RACE = ["White", "Black", "Asian-Pac-Islander"]
_COUNTRY = ["United-States", "Mexico", "India"]


def _make_rows(n: int, seed: int) -> list[list[str]]:
    """``n`` raw records (15 string fields each) with both sexes and both incomes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        edu, edu_num = _EDUCATION[i % len(_EDUCATION)]
        rows.append(
            [
                str(int(rng.integers(17, 80))),
                _WORKCLASS[int(rng.integers(len(_WORKCLASS)))],
                str(int(rng.integers(20_000, 500_000))),
                edu,
                str(edu_num),
                _MARITAL[i % len(_MARITAL)],
                _OCCUPATION[int(rng.integers(len(_OCCUPATION)))],
                _RELATIONSHIP[i % len(_RELATIONSHIP)],
                _RACE[i % len(_RACE)],
                "Male" if i % 2 == 0 else "Female",
                str(int(rng.choice([0, 0, 0, 2174, 14084]))),
                str(int(rng.choice([0, 0, 1902]))),
                str(int(rng.integers(10, 70))),
                _COUNTRY[i % len(_COUNTRY)],
                ">50K" if i % 3 == 0 else "<=50K",
            ]
        )
    return rows


def _write(path: Path, rows: list[list[str]], header: str | None = None) -> None:
    lines = ([header] if header else []) + [", ".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n\n")  # the real files end with a blank line


@pytest.fixture
def adult_dir(tmp_path: Path) -> dict:
    """Synthetic ``adult.data`` (30 records) and ``adult.test`` (14 records) in ``tmp_path``.

    One record of each file holds ``?`` (dropped by the loader). Test labels end with ``.``,
    except one (the loader accepts both).
    """
    train = _make_rows(30, seed=0)
    train[4][1] = "?"  # missing workclass
    test = _make_rows(14, seed=1)
    test[2][13] = "?"  # missing native-country
    for i, r in enumerate(test):
        if i != 5:
            r[14] = r[14] + "."
    _write(tmp_path / "adult.data", train)
    _write(tmp_path / "adult.test", test, header="|1x3 Cross validator")
    keep_train = [r for r in train if "?" not in r]
    keep_test = [r for r in test if "?" not in r]
    return {"dir": tmp_path, "train": keep_train, "test": keep_test}


def _numeric(rows: list[list[str]]) -> np.ndarray:
    cols = [ADULT_COLUMNS.index(c) for c in ADULT_NUMERIC_COLUMNS]
    return np.array([[float(r[c]) for c in cols] for r in rows])


def _block(info: dict, column: str) -> tuple[int, int]:
    names = info["feature_names"]
    pos = [i for i, n in enumerate(names) if n.startswith(column + "=")]
    assert pos == list(range(pos[0], pos[-1] + 1))
    return pos[0], pos[-1] + 1


def test_read_adult_files_drops_missing_and_strips_dot(adult_dir: dict) -> None:
    train_df, test_df = read_adult_files(adult_dir["dir"])
    assert list(train_df.columns) == list(ADULT_COLUMNS)
    assert len(train_df) == len(adult_dir["train"]) == 29
    assert len(test_df) == len(adult_dir["test"]) == 13
    assert set(test_df["income"]) == {"<=50K", ">50K"}
    assert train_df["age"].tolist() == [int(r[0]) for r in adult_dir["train"]]


def test_shapes(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    n_tr, n_te = len(adult_dir["train"]), len(adult_dir["test"])
    d = len(s.info["feature_names"])
    assert s.train.x.shape == (n_tr, d) and s.test.x.shape == (n_te, d)
    assert s.train.x.dtype == np.float32 and s.train.y.dtype == np.int32
    assert s.train.a.dtype == np.int32 and s.train.idx.dtype == np.int64
    assert (s.name, s.num_classes, s.num_attributes, s.test_unbiased) == ("adult", 2, 2, None)
    assert s.info["feature_names"][: len(ADULT_NUMERIC_COLUMNS)] == list(ADULT_NUMERIC_COLUMNS)
    assert s.input_shape == (d,)


def test_numeric_standardisation_uses_train_statistics(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    k = len(ADULT_NUMERIC_COLUMNS)
    raw_tr, raw_te = _numeric(adult_dir["train"]), _numeric(adult_dir["test"])
    mean, std = raw_tr.mean(axis=0), raw_tr.std(axis=0)
    np.testing.assert_allclose(s.train.x[:, :k], (raw_tr - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.test.x[:, :k], (raw_te - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.train.x[:, :k].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.train.x[:, :k].std(axis=0), 1.0, atol=1e-5)
    # the test split is not re-standardised with its own statistics
    assert not np.allclose(s.test.x[:, :k].mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(list(s.info["numeric_mean"].values()), mean)


def test_one_hot_blocks(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    k = len(ADULT_NUMERIC_COLUMNS)
    widths = 0
    for col in ADULT_CATEGORICAL_COLUMNS:
        start, stop = _block(s.info, col)
        widths += stop - start
        cats = [n.split("=", 1)[1] for n in s.info["feature_names"][start:stop]]
        assert cats == sorted(cats)
        for ds, rows in ((s.train, adult_dir["train"]), (s.test, adult_dir["test"])):
            block = ds.x[:, start:stop]
            assert set(np.unique(block)) <= {0.0, 1.0}
            np.testing.assert_array_equal(block.sum(axis=1), 1.0)
            raw = [r[ADULT_COLUMNS.index(col)] for r in rows]
            assert [cats[j] for j in block.argmax(axis=1)] == raw
    assert k + widths == s.train.x.shape[1]


def test_labels_and_attribute(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    for ds, rows in ((s.train, adult_dir["train"]), (s.test, adult_dir["test"])):
        expected_y = [1 if r[14].rstrip(".") == ">50K" else 0 for r in rows]
        expected_a = [1 if r[9] == "Male" else 0 for r in rows]
        np.testing.assert_array_equal(ds.y, expected_y)
        np.testing.assert_array_equal(ds.a, expected_a)
        assert set(ds.y.tolist()) == {0, 1} and set(ds.a.tolist()) == {0, 1}
    assert s.info["attribute_values"] == ["Female", "Male"]
    start, stop = s.info["attribute_columns"]
    np.testing.assert_array_equal(s.train.x[:, start:stop].argmax(axis=1), s.train.a)


def test_ids_unique_across_splits(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    n_tr = len(s.train)
    np.testing.assert_array_equal(s.train.idx, np.arange(n_tr))
    np.testing.assert_array_equal(s.test.idx, np.arange(n_tr, n_tr + len(s.test)))
    assert not set(s.train.idx.tolist()) & set(s.test.idx.tolist())


def test_counterfactual_flip(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    start, stop = s.info["attribute_columns"]
    assert (start, stop) == _block(s.info, "sex")
    for ds in (s.train, s.test):
        cf = s.counterfactual(ds, "flip")
        np.testing.assert_array_equal(cf.a, 1 - ds.a)
        np.testing.assert_array_equal(cf.x[:, start:stop], ds.x[:, start:stop][:, ::-1])
        np.testing.assert_array_equal(cf.x[:, :start], ds.x[:, :start])
        np.testing.assert_array_equal(cf.x[:, stop:], ds.x[:, stop:])
        np.testing.assert_array_equal(cf.y, ds.y)
        np.testing.assert_array_equal(cf.idx, ds.idx)
        twice = s.counterfactual(cf, "flip")
        for f in ("x", "y", "a", "idx"):
            np.testing.assert_array_equal(getattr(twice, f), getattr(ds, f))
    # the original is not modified in place
    np.testing.assert_array_equal(s.train.x[:, start:stop].argmax(axis=1), s.train.a)


def test_counterfactual_explicit_values_and_validation(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"])
    ds = s.train
    start, stop = s.info["attribute_columns"]
    all_male = s.counterfactual(ds, np.ones(len(ds), dtype=np.int64))
    np.testing.assert_array_equal(all_male.a, 1)
    np.testing.assert_array_equal(all_male.x[:, start:stop], [[0.0, 1.0]] * len(ds))
    with pytest.raises(PrivDebiasError, match="shape"):
        s.counterfactual(ds, np.ones(len(ds) - 1, dtype=np.int32))
    with pytest.raises(PrivDebiasError, match="out of range"):
        s.counterfactual(ds, np.full(len(ds), 2))
    with pytest.raises(PrivDebiasError, match="integers"):
        s.counterfactual(ds, np.full(len(ds), 0.5))
    with pytest.raises(PrivDebiasError, match="flip"):
        s.counterfactual(ds, "swap")


def test_race_attribute_and_excluded_feature(adult_dir: dict) -> None:
    s = load_adult(adult_dir["dir"], attribute="race")
    assert s.info["attribute_values"] == sorted(_RACE)
    assert s.num_attributes == 3
    expected = [sorted(_RACE).index(r[8]) for r in adult_dir["train"]]
    np.testing.assert_array_equal(s.train.a, expected)
    with pytest.raises(PrivDebiasError, match="binary"):
        s.counterfactual(s.train, "flip")
    cf = s.counterfactual(s.train, np.full(len(s.train), 2))
    start, stop = s.info["attribute_columns"]
    np.testing.assert_array_equal(cf.x[:, start:stop].argmax(axis=1), 2)

    full = load_adult(adult_dir["dir"])
    s2 = load_adult(adult_dir["dir"], include_attribute_feature=False)
    assert s2.info["attribute_columns"] is None
    assert s2.train.x.shape[1] == full.train.x.shape[1] - 2
    assert not any(n.startswith("sex=") for n in s2.info["feature_names"])
    np.testing.assert_array_equal(s2.train.a, full.train.a)
    cf2 = s2.counterfactual(s2.train, "flip")
    np.testing.assert_array_equal(cf2.x, s2.train.x)
    np.testing.assert_array_equal(cf2.a, 1 - s2.train.a)
    with pytest.raises(PrivDebiasError, match="num_attributes"):
        adult_counterfactual(s2.train, "flip", attribute_columns=None)


def test_unknown_attribute(adult_dir: dict) -> None:
    with pytest.raises(PrivDebiasError, match="attribute"):
        load_adult(adult_dir["dir"], attribute="age")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(PrivDebiasError) as err:
        load_adult(missing)
    msg = str(err.value)
    assert str(missing / "adult.data") in msg and "data_dir" in msg and "download=True" in msg


def test_missing_test_file(adult_dir: dict) -> None:
    (adult_dir["dir"] / "adult.test").unlink()
    with pytest.raises(PrivDebiasError) as err:
        load_adult(adult_dir["dir"])
    assert str(adult_dir["dir"] / "adult.test") in str(err.value)
    assert "adult.data," not in str(err.value)  # only the missing file is named


def test_env_var_directory(adult_dir: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVDEBIAS_ADULT_DIR", str(adult_dir["dir"]))
    s = load_adult()
    assert s.info["data_dir"] == str(adult_dir["dir"])
    assert len(s.train) == len(adult_dir["train"])


def test_malformed_wrong_column_count(adult_dir: dict) -> None:
    path = adult_dir["dir"] / "adult.data"
    with path.open("a") as f:
        f.write("39, State-gov, 77516, Bachelors, 13, Never-married\n")
    with pytest.raises(PrivDebiasError, match="adult.data") as err:
        read_adult_files(adult_dir["dir"])
    assert "fields" in str(err.value)


def test_malformed_unknown_label(adult_dir: dict) -> None:
    path = adult_dir["dir"] / "adult.test"
    rows = _make_rows(3, seed=5)
    rows[1][14] = "maybe."
    _write(path, rows, header="|1x3 Cross validator")
    with pytest.raises(PrivDebiasError, match="adult.test") as err:
        load_adult(adult_dir["dir"])
    assert "maybe" in str(err.value)


def test_malformed_non_numeric(adult_dir: dict) -> None:
    rows = _make_rows(3, seed=6)
    rows[0][0] = "old"
    _write(adult_dir["dir"] / "adult.data", rows)
    with pytest.raises(PrivDebiasError, match="adult.data"):
        load_adult(adult_dir["dir"])


def test_fetch_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(PrivDebiasError, match="network") as err:
        fetch_adult(tmp_path / "cache")
    assert "adult.data" in str(err.value) and str(tmp_path / "cache") in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # no partial files left behind
    with pytest.raises(PrivDebiasError, match="network"):
        load_adult(cache_dir=tmp_path / "cache2", download=True)


def test_fetch_writes_files(
    adult_dir: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download path with a fake urlopen (no network): files land complete, then load."""
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0.0) -> io.BytesIO:
        requested.append(url)
        name = url.rsplit("/", 1)[1]
        src = adult_dir["dir"] / name
        return io.BytesIO(src.read_bytes() if src.exists() else b"names file\n")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.delenv("PRIVDEBIAS_ADULT_DIR", raising=False)
    cache = tmp_path / "dl"
    s = load_adult(cache_dir=cache, download=True)
    assert sorted(p.name for p in cache.iterdir()) == ["adult.data", "adult.names", "adult.test"]
    assert all(
        u.startswith("https://archive.ics.uci.edu/ml/machine-learning-databases/adult/")
        for u in requested
    )
    assert len(s.train) == len(adult_dir["train"])
    fetch_adult(cache)  # files present: nothing downloaded again
    assert len(requested) == 3


@pytest.mark.skipif(not REAL_ADULT_DIR.is_dir(), reason=f"real Adult files not at {REAL_ADULT_DIR}")
def test_real_adult_files() -> None:
    s = load_adult(REAL_ADULT_DIR)
    assert len(s.train) == 30162
    assert len(s.test) == 15060
    assert abs(float(s.train.y.mean()) - 0.249) < 0.001
    assert s.train.x.shape[1] == 104
    k = len(ADULT_NUMERIC_COLUMNS)
    np.testing.assert_allclose(s.train.x[:, :k].mean(axis=0, dtype=np.float64), 0.0, atol=1e-4)
    np.testing.assert_allclose(s.train.x[:, :k].std(axis=0, dtype=np.float64), 1.0, atol=1e-4)
    cf = s.counterfactual(s.test, "flip")
    np.testing.assert_array_equal(cf.a, 1 - s.test.a)
