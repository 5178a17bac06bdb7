"""Bias-guided diffusion augmentation (Pan et al. 2024, arXiv 2404.13194), in Flax, jitted end to end.

A class- and attribute-conditional denoiser generates samples for the under-represented
(class, attribute) cells of a biased dataset; a DDIM sampler written as one ``lax.scan``
applies classifier-free guidance and the gradient of the batch's attribute KL (measured by
real-data classifiers on the predicted clean sample x̂₀); a planner turns the dataset's KL /
mutual-information bias into the number of samples each cell needs.

Workflow::

    augmenter = fit_augmenter(train, num_classes=10, num_attributes=10,
                              config=AugmentConfig.cpu_default(), key=key)
    plan = plan_augmentation(train, 10, 10)               # (C, A) counts, −80 % bias
    synthetic = generate(augmenter, plan, key=key2, start_id=next_free_id(train))
    report = quality_report(augmenter, synthetic)          # per-cell class / attribute accuracy
"""

from privdebias_jax.augment.augmenter import (
    Augmenter,
    TrainedClassifier,
    cell_labels,
    decorrelated_training_set,
    fit_augmenter,
    generate,
    guidance_options,
    quality_report,
    resize_images,
    save_sample_grid,
)
from privdebias_jax.augment.config import AugmentConfig
from privdebias_jax.augment.denoiser import ConvDenoiser, MLPDenoiser, UNetDenoiser, create_denoiser
from privdebias_jax.augment.diffusion import (
    DiffusionState,
    diffusion_loss,
    make_diffusion_step,
    train_denoiser,
)
from privdebias_jax.augment.guidance import guide_x0, kl_guidance_loss, make_guidance_loss
from privdebias_jax.augment.planner import (
    plan_augmentation,
    plan_from_counts,
    planned_bias,
    table_bias,
)
from privdebias_jax.augment.sampler import make_eps_fn, make_sampler, sample_loop
from privdebias_jax.augment.schedule import (
    Schedule,
    ddim_scheduler,
    ddim_step,
    ddim_timesteps,
    make_schedule,
    predict_x0,
    q_sample,
)

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "TrainedClassifier",
    "fit_augmenter",
    "guidance_options",
    "plan_augmentation",
    "plan_from_counts",
    "planned_bias",
    "table_bias",
    "generate",
    "quality_report",
    "save_sample_grid",
    "cell_labels",
    "decorrelated_training_set",
    "resize_images",
    "MLPDenoiser",
    "ConvDenoiser",
    "UNetDenoiser",
    "create_denoiser",
    "DiffusionState",
    "diffusion_loss",
    "make_diffusion_step",
    "train_denoiser",
    "kl_guidance_loss",
    "make_guidance_loss",
    "guide_x0",
    "make_eps_fn",
    "make_sampler",
    "sample_loop",
    "Schedule",
    "ddim_scheduler",
    "ddim_step",
    "ddim_timesteps",
    "make_schedule",
    "predict_x0",
    "q_sample",
]
