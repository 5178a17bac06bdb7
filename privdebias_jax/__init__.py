"""privdebias_jax: fair and private models in JAX/Flax.

Measure bias and privacy leakage, remove bias by influence-function unlearning, rebalance
data with bias-guided diffusion, forget data exactly with sharded unlearning, and audit the
result with privacy attacks — as pure functions that jit, vmap and shard.

Subpackages: :mod:`privdebias_jax.data` (datasets as ``(x, y, a, idx)`` NamedTuples),
:mod:`privdebias_jax.models` (Flax modules returning ``(logits, features)``),
:mod:`privdebias_jax.train` (train step factory, fit loop, evaluation),
:mod:`privdebias_jax.metrics` (fairness and bias metrics), :mod:`privdebias_jax.checkpoint`,
:mod:`privdebias_jax.pipeline` (train-and-evaluate driver), :mod:`privdebias_jax.cli`.
"""

from privdebias_jax import checkpoint, data, metrics, models, train
from privdebias_jax.data import Batch, Dataset, DataSplits, load_dataset
from privdebias_jax.models import create_model
from privdebias_jax.train import TrainState, evaluate, fit, make_train_step, predict
from privdebias_jax.types import PrivDebiasError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "checkpoint",
    "data",
    "metrics",
    "models",
    "train",
    "Batch",
    "DataSplits",
    "Dataset",
    "load_dataset",
    "create_model",
    "TrainState",
    "evaluate",
    "fit",
    "make_train_step",
    "predict",
    "PrivDebiasError",
]
