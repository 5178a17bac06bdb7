"""Shared small fixtures: tiny Colored/Biased-MNIST splits and tiny models.

Everything here is session-scoped and small (8×8 images, 400 training digits) so the data,
model, training and checkpoint tests together stay within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import tempfile

# One persistent XLA compilation cache for the whole test run (both xdist workers and the
# benchmark/experiment scripts the smoke tests start as subprocesses, which inherit the
# environment): many tests compile the same programs (the same tiny models' train steps) from
# freshly built functions, which jit's in-memory cache does not share. A fresh folder per run
# (keyed by the process that starts the run), so a run never reads an older run's entries; a
# folder given in JAX_COMPILATION_CACHE_DIR is used as it is. Set before jax is imported.
# Measured on tests/test_checkpoint.py, test_benchmark_fmd_smoke.py and test_cli_attack.py run
# together: 89.8 s with the cache, 106.8 s with JAX_ENABLE_COMPILATION_CACHE=false.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # set by the process that starts the run (xdist's controller, before its workers start), so
    # the workers inherit it; that process removes it at the end (pytest_sessionfinish)
    _OWN_CACHE = os.path.join(tempfile.gettempdir(), f"privdebias-jax-cache-{os.getpid()}")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from privdebias_jax.data import biased_mnist, colored_mnist, make_dataset  # noqa: E402
from privdebias_jax.models import create_model  # noqa: E402

IMAGE_SIZE = 8
TRAIN_SIZE = 400
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.fixture
def contained_tempdir(tmp_path, monkeypatch):
    """Point :mod:`tempfile` at the test's own folder: ``tensorflow_datasets`` leaves one empty
    ``tempfile.mkdtemp("tfds")`` folder behind for every dataset info it builds on mock data
    (``tensorflow_datasets/core/dataset_info.py``), ~20 per run in the system temp folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def biased8():
    """Biased-MNIST (background colour), ρ = 0.99, 8×8, 400 training digits."""
    return biased_mnist(rho=0.99, key=0, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def colored8():
    """Colored-MNIST (stroke colour), ρ = 0.99, 8×8, 400 training digits."""
    return colored_mnist(rho=0.99, key=0, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def colour_task():
    """Biased-MNIST with ρ = 1: the background colour determines the label exactly."""
    return biased_mnist(rho=1.0, key=3, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def tiny_mlp():
    return create_model("mlp", 10, hidden=(16,))


@pytest.fixture(scope="session")
def tiny_cnn():
    return create_model("small_cnn", 10, widths=(4, 8), strides=(1, 2))


@pytest.fixture(scope="session")
def small_tabular():
    """A small random tabular dataset (N = 37, D = 5, 3 classes, binary attribute)."""
    rng = np.random.default_rng(0)
    n = 37
    return make_dataset(
        rng.normal(size=(n, 5)),
        rng.integers(0, 3, n),
        rng.integers(0, 2, n),
        idx=np.arange(100, 100 + n),
        num_classes=3,
        num_attributes=2,
    )


# The heaviest test files first (longest-processing-time-first): with `-n 2 --dist loadfile`
# (the README's command) each worker takes whole files in collection order, so a heavy file
# collected last would leave one worker running alone at the end. Figures: seconds per file on
# 2 CPU cores, measured with `--durations`; files not listed keep their order after these.
HEAVY_FILES_FIRST = (  # seconds on one worker, `-n 2 --dist loadfile --durations=0`, 2026-12-03
    "test_augment_smoke.py",  # 192
    "test_cli.py",  # 166
    "test_benchmark_influence_quality_smoke.py",  # 180 on loaded cores
    "test_influence_evaluation.py",  # 48–69 on loaded cores
    "test_kfac_textbook.py",  # not timed on idle cores
    "test_solver_diagnostics.py",  # not timed on idle cores
    "test_benchmark_influence_throughput_smoke.py",  # not timed on idle cores
    "test_benchmarks_influence_smoke.py",  # 126 (before the solvers smoke went to --problems head)
    "test_augment.py",  # 113
    "test_influence.py",  # 109
    "test_benchmarks_unlearn_smoke.py",  # 98
    "test_train.py",  # 96
    "test_sync.py",  # 83
    "test_debias_methods.py",  # 76
    "test_privacy_experiments_smoke.py",  # 76
    "test_fmd.py",  # 68, before its guard and named-method tests
    "test_benchmark_influence_vs_retrain_smoke.py",  # not timed on idle cores
    "test_fmd_diagnosis.py",  # not timed on idle cores
    "test_benchmark_influence_unlearning_smoke.py",  # not timed on idle cores
    "test_models.py",  # 63
    "test_sisa.py",  # 63
    "test_cli_unlearn.py",  # 57
    "test_sisa_multidevice.py",  # 37
    "test_privacy_probe.py",  # 37
    "test_checkpoint.py",  # 35
    "test_metrics.py",  # 32
    "test_privacy_membership.py",  # 30
    "test_benchmarks_smoke.py",  # 29
    "test_privacy_shadow.py",  # 29
    "test_cli_attack.py",  # 22
    "test_sisa_add.py",  # 22
    "test_mnist_data.py",  # 11
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's compilation cache (only in the process that created it)."""
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
