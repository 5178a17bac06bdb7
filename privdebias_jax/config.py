"""Default configurations (``ml_collections.ConfigDict``) for training a model on each dataset.

``get_config(dataset)`` returns the CPU default; every field can be overridden on the command
line (``privdebias train --model simple_conv --image-size 28``) or in an experiment file
(``experiments/*.py`` with a ``get_config()``). Sizes are chosen for 2 CPU cores; the paper
sizes are the ``*_paper`` presets (Bahng et al.'s 7×7 SimpleConvNet at 28×28), meant for a GPU/TPU.
"""

from __future__ import annotations

import ml_collections

from privdebias_jax.types import PrivDebiasError

MNIST_VARIANTS = ("colored-mnist", "biased-mnist")


def get_config(dataset: str = "biased-mnist", preset: str = "cpu") -> ml_collections.ConfigDict:
    """The training configuration for ``dataset`` (``preset`` ``cpu`` or ``paper``).

    Fields: ``dataset``, ``rho``, ``image_size``, ``train_size``, ``data_dir`` (Adult),
    ``model`` (registry name), ``model_options`` (overrides), ``optimizer``,
    ``learning_rate``, ``weight_decay``, ``batch_size``, ``epochs``, ``seed``.

    Raises:
      PrivDebiasError: for an unknown dataset or preset.
    """
    if preset not in ("cpu", "paper"):
        raise PrivDebiasError(f"unknown preset {preset!r}; expected 'cpu' or 'paper'")
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.seed = 0
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.batch_size = 256
    c.rho = 0.99
    c.image_size = 28
    c.train_size = ml_collections.FieldReference(None, field_type=int)
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model_options = ml_collections.ConfigDict()
    if dataset == "colored-mnist":
        # FMD's Colored-MNIST network: a 3×100 MLP on the flattened coloured digit.
        c.model = "mlp"
        c.epochs = 30
    elif dataset == "biased-mnist":
        c.model = "small_cnn" if preset == "cpu" else "simple_conv"
        c.image_size = 14 if preset == "cpu" else 28
        c.epochs = 12 if preset == "cpu" else 80
        c.weight_decay = 1e-4
    elif dataset == "adult":
        c.model = "tabular_mlp"
        c.epochs = 10
        c.rho = -1.0  # unused
    else:
        raise PrivDebiasError(
            f"unknown dataset {dataset!r} for training; expected one of {', '.join(MNIST_VARIANTS + ('adult',))}"
        )
    return c


def get_fmd_config(dataset: str = "colored-mnist", preset: str = "cpu") -> ml_collections.ConfigDict:
    """Training config of ``dataset`` plus an ``fmd`` section for ``privdebias debias``.

    ``fmd`` fields:

    * ``method``: ``proximal_finetune`` (the default: the best-measured influence-based method,
      from ``D_ex`` alone; see ``docs/influence.md``), ``fmd`` (the paper's single step) or
      ``head_retrain`` (:mod:`privdebias_jax.debias`);
    * ``variant``: FMD's ``external`` or ``train`` variant;
    * ``k``: samples replaced by ``fmd``'s train variant and ``head_retrain`` (0 = every sample);
    * ``iterations``: Newton steps of ``head_retrain`` / ``proximal_finetune``;
    * ``damping`` (``λ`` of ``fmd`` and ``head_retrain``; ``fmd`` takes a grid), ``solver``,
      ``proximal`` (``μ`` of ``proximal_finetune``), ``cg_iterations``, ``select`` (parameter
      filter), ``replacement`` (``others`` / ``all``);
    * ``external_size``: ``|D_ex|``, drawn from the unbiased test set for MNIST, the test set
      for Adult, and removed from the evaluation sets;
    * the guard: ``step_sizes``, ``max_acc_drop``, ``min_kept``; ``delta`` (fairness threshold).
    """
    c = get_config(dataset, preset)
    c.fmd = ml_collections.ConfigDict()
    c.fmd.method = "proximal_finetune"
    c.fmd.variant = "external"
    c.fmd.k = 0
    c.fmd.iterations = 30
    c.fmd.damping = 0.01
    c.fmd.fmd_damping = (0.01, 0.1, 1.0)
    c.fmd.solver = "cg"
    c.fmd.proximal = 0.01
    c.fmd.cg_iterations = 30
    c.fmd.select = "^head/"
    c.fmd.replacement = "others"
    c.fmd.external_size = 200
    c.fmd.step_sizes = (0.0625, 0.125, 0.25, 0.5, 1.0)
    c.fmd.max_acc_drop = 0.05
    c.fmd.min_kept = 0.5
    c.fmd.delta = 0.0
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Load ``get_config()`` from a Python file (an experiment in ``experiments/``).

    Raises:
      PrivDebiasError: if the file is missing or defines no ``get_config``.
    """
    import importlib.util
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise PrivDebiasError(f"config file not found: {file}")
    spec = importlib.util.spec_from_file_location(f"privdebias_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise PrivDebiasError(f"config file {file} defines no get_config()")
    return module.get_config()


__all__ = ["get_config", "get_fmd_config", "load_config_file", "MNIST_VARIANTS"]
