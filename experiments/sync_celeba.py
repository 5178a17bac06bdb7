"""The sync loop of seed 000 (augment ↔ unlearn) on CelebA: target ``Blond_Hair``, attribute ``Male``.

The main job of ``privdebias run`` (:func:`privdebias_jax.run.run_main_job`: data → vanilla model →
bias-guided diffusion augmenter → SISA + sync rounds → naive baseline → attacks → ``report.md`` /
``results.json`` / figures) on CelebA read through TFDS. Nothing is downloaded at run time:
prepare the data once (CelebA's host often refuses automatic downloads: place the files by
hand as TFDS documents), then point ``--data-dir`` at it::

    tfds build celeb_a --file_format=array_record --data_dir DIR

    # the full run (GPU-sized: ResNet at 64×64, diffusers UNet of AugmentConfig.paper() at 64×64)
    python experiments/sync_celeba.py --data-dir DIR --out results/sync_celeba

    # the smoke run (tiny sizes, CPU): what tests/test_sync_tfds_smoke.py runs on mock data
    python experiments/sync_celeba.py --data-dir DIR --out results/sync_celeba_quick --quick

Options: ``--train-size`` (default 60,000 of the 162,770 training faces), ``--rounds``,
``--shards``, ``--delta``, ``--no-progress``, ``--resume``.

**The protected attribute and counterfactuals.** CelebA has a real one: ``y = Blond_Hair``,
``a = Male`` (seed 001's task), so the loop's (class, attribute) cells are the four
(blond?, male?) cells; blond men (about 1% of the faces) are the under-represented cell the
augmenter fills. There is **no pixel-level counterfactual**: a face cannot be re-rendered with
the other gender, so ``splits.counterfactual`` is ``None`` (:func:`privdebias_jax.data.load_celeba`).
What the code does without one, and what this experiment therefore does:

* FMD needs counterfactual pairs for its bias ``B(θ)`` and its update
  (:func:`privdebias_jax.pipeline.debias_and_evaluate` raises without them): the main job
  **skips the FMD stage and the loop's FMD pass** and says so in ``report.md``; there is no
  FMD column and no counterfactual bias row. (Swapping in an image-translation model as a
  "counterfactual" would measure that model's artefacts, not the classifier's bias.)
* The augmenter's guidance and judge classifiers are trained on a *cell-balanced resample* of
  the training set instead of counterfactual copies (:func:`privdebias_jax.augment.fit_augmenter`
  documents the fallback; weaker, since the rare cell holds few distinct faces).
* Bias is measured by the data's KL/MI bias ``I(a; y)`` (what the planner equalises) and by the
  model's demographic-parity and equalized-odds differences on the test set; there is no
  unbiased test set, so no unbiased accuracy and no attribute-probe row.
* ``fraction_aligned`` in ``results.json`` is ``P(a = y)``, computed because both labels are
  binary; it has no "bias-aligned" meaning here.

FMD's external set is still split off the test set (the main job does it for every dataset) and
excluded from every evaluation; it is simply unused.

**What differs from the embedded Biased-MNIST run.** Real faces, a real and weaker correlation
(not a planted ρ), binary labels, a ResNet at 64×64 instead of the CPU ``small_cnn``, the
diffusers UNet of :meth:`AugmentConfig.paper` at 64×64 (100 epochs) instead of the PCA-latent MLP
denoiser, SISA 5 shards × 4 slices, 3 rounds of up to 5,000 synthetic faces, 1,000 members per
attack.

**Expected cost on one GPU (an estimate, not measured: no GPU and no CelebA on the machine this
was written on).** Diffusion training dominates: 100 epochs × 60,000 faces = 6·10⁶ UNet training
samples at 64×64 (about 4× the work per sample of 32×32); at roughly 1,000 samples/s on an
A100/H100-class GPU that is about 1.5–2 h. Sampling ≤ 15,000 faces × 100 guided DDIM steps ≈
15–30 min; the ResNet (vanilla 20 epochs, SISA and its retraining) ≈ 15–30 min; attacks and the
report a few minutes. In all **about 2.5–3 h on one A100/H100**; reading and resizing 60,000
faces takes a few minutes of CPU, and the images need ~3 GB of host memory (×3–4 with the
loop's copies; the full training split at 64×64 would need ~8 GB before copies). Check the
estimate with ``--train-size 5000`` first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections

from privdebias_jax.augment import AugmentConfig
from privdebias_jax.config import get_fmd_config
from privdebias_jax.sync import get_sync_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_cifar10 import quick, run_experiment  # noqa: E402  (shared CLI and smoke sizes)

sys.path.pop(0)


def get_config() -> ml_collections.ConfigDict:
    """The full (GPU-sized) configuration of the loop on CelebA (Blond_Hair vs Male)."""
    c = ml_collections.ConfigDict()
    c.dataset = "celeba"
    c.target, c.attribute = "Blond_Hair", "Male"
    c.rho = ml_collections.FieldReference(None, field_type=float)  # no planted ρ: the data's own correlation
    c.image_size = 64
    c.train_size = 60000
    c.test_size = 10000
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model = "resnet"
    c.model_options = ml_collections.ConfigDict({"stage_sizes": (2, 2, 2), "widths": (32, 64, 128)})
    c.optimizer, c.learning_rate, c.weight_decay = "adam", 1e-3, 1e-4
    c.batch_size, c.epochs, c.seed = 256, 20, 0
    # unused (no counterfactuals: FMD is skipped) but read by the main job
    c.fmd = get_fmd_config("biased-mnist").fmd
    c.fmd.external_size = 1000
    c.sync = get_sync_options()
    c.sync.shards, c.sync.slices = 5, 4
    c.sync.max_new_per_round = 5000
    c.sync.attack_size = 1000
    c.sync.fmd_pass = False
    c.augment = ml_collections.ConfigDict(AugmentConfig.paper(image_size=64, epochs=100).to_dict())
    return c


def main(argv=None) -> dict:
    return run_experiment(get_config(), argv, __doc__.splitlines()[0], "results/sync_celeba")


__all__ = ["get_config", "main", "quick"]

if __name__ == "__main__":
    main()
