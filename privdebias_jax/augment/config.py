"""Settings of bias-guided diffusion augmentation: one frozen dataclass, :class:`AugmentConfig`.

``AugmentConfig.cpu_default()`` is the embedded CPU configuration (two small FiLM-conditioned
MLP denoisers in a shape/colour latent of 14×14 RGB images, the shape conditioned on the class
and the colour on the attribute: trains in under 3 minutes on 2 cores, samples thousands of
images in seconds; ``latent="pca", denoiser="mlp"`` for images that are not one shape in one
colour); ``AugmentConfig.paper()`` is the full-size configuration for a GPU/TPU
(diffusers' ``FlaxUNet2DConditionModel`` conditioned by cross-attention on learned class and
attribute tokens, 28×28 or 32×32 inputs). Every field can be overridden with
``dataclasses.replace(config, field=value)``; :meth:`AugmentConfig.validate` names a bad one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from privdebias_jax.types import PrivDebiasError

DENOISERS = ("factored", "mlp", "conv", "unet")
LATENTS = ("colour", "pca", "none")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
GUIDANCE_SPACES = ("auto", "image", "latent", "routed")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Everything that defines the diffusion model, its training and its sampler.

    Attributes:
      image_size: side of the square images the denoiser sees; the real data is resized to it
        for training and the samples are resized back to the data's resolution.
      denoiser: ``factored`` (two FiLM MLPs on the colour latent: the shape conditioned on
        the class, the colour on the attribute; the CPU default), ``mlp`` (one FiLM-conditioned
        residual MLP on the flattened latent or image, conditioned on both), ``conv`` (a small FiLM-conditioned convolutional UNet) or ``unet``
        (diffusers ``FlaxUNet2DConditionModel``, conditioning by cross-attention).
      latent: ``colour`` (the default: a PCA latent of the grey shape, ``latent_dim``
        components, plus the RGB colour, for images made of one grey shape and one colour such
        as the embedded Colored-/Biased-MNIST; other data raises at fit time), ``pca`` (a
        per-channel PCA latent of ``latent_dim`` components per channel, any images), both in
        :mod:`privdebias_jax.augment.latent`, or ``none`` (pixel space; required by ``conv``
        and ``unet``).
      latent_dim: PCA components of the shape (``colour``) or per colour channel (``pca``).
      width: hidden width of the ``mlp`` denoiser / base channels of ``conv``.
      depth: residual blocks of the ``mlp`` denoiser / levels of ``conv``.
      embed_dim: size of the learned class and attribute embeddings (and time embedding).
      unet_channels, unet_layers_per_block, unet_attention: the ``unet`` denoiser's
        ``block_out_channels``, ``layers_per_block`` and whether its lower-resolution blocks
        use cross-attention (without it, conditioning is added to the time embedding).
      num_train_timesteps, beta_schedule, beta_start, beta_end: the noise schedule
        (diffusers' ``FlaxDDIMScheduler`` state; ``squaredcos_cap_v2`` is the cosine
        schedule of Nichol & Dhariwal 2021).
      sample_steps: DDIM steps at sampling time.
      epochs, batch_size, learning_rate, weight_decay, ema_decay: denoiser training (Adam;
        ``ema_decay`` > 0 keeps an exponential moving average of the parameters, which is
        what the sampler uses).
      cond_dropout: probability of replacing the class label, and independently the
        attribute, by the null token in training (classifier-free guidance; Ho & Salimans 2021).
      guidance_scale: classifier-free guidance weight ``w`` (1 = no guidance).
      kl_scale: step size of the KL-gradient guidance on x̂₀ (0 = none).
      class_weight: weight of the class-consistency term inside the guidance loss.
      guidance_space: where a latent denoiser takes the KL-guidance step: ``image`` (on the
        decoded x̂₀, then re-encoded: the latent moves by the projection of the image step) or
        ``latent`` (the gradient with respect to the latent itself) or ``routed`` (colour latent
        only: the class term's image step sets the shape, the attribute KL's the colour; see
        :func:`~privdebias_jax.augment.latent.project_routed`); ``auto`` (default) is ``routed``
        for the colour latent and ``image`` otherwise (:attr:`resolved_guidance_space`).
      guidance_groups: ``cell`` (the KL is taken per requested (y, a) cell) or ``class``
        (per requested class: Pan et al. 2024's partial bias; see :mod:`privdebias_jax.augment.guidance`).
      target_smoothing: δ in the smoothed target ``(1 − δ) π + δ / A`` of the guidance KL.
      classifier_epochs, classifier_batch_size, classifier_hidden: the real-data
        classifiers (an MLP for guidance, a small CNN as independent judge of quality).
      counterfactual_copies: copies of the training set, each in random attribute values,
        used to train the classifiers when a ``counterfactual`` function is given.
      sample_batch: samples generated per sampler call (one compilation).
      checkpoint_every: save the denoiser every this many epochs (with ``checkpoint_dir``).
    """

    image_size: int = 14
    denoiser: str = "factored"
    latent: str = "colour"
    latent_dim: int = 48
    width: int = 512
    depth: int = 3
    embed_dim: int = 128
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 50
    epochs: int = 120
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    guidance_scale: float = 2.0
    kl_scale: float = 5.0
    class_weight: float = 1.0
    guidance_space: str = "auto"
    guidance_groups: str = "cell"
    target_smoothing: float = 0.01
    classifier_epochs: int = 6
    classifier_batch_size: int = 256
    classifier_hidden: tuple[int, ...] = (256, 256)
    counterfactual_copies: int = 1
    sample_batch: int = 500
    checkpoint_every: int = 10

    @property
    def resolved_guidance_space(self) -> str:
        """``guidance_space`` with ``auto`` resolved: ``routed`` for ``latent="colour"``, else ``image``."""
        if self.guidance_space != "auto":
            return self.guidance_space
        return "routed" if self.latent == "colour" else "image"

    @classmethod
    def cpu_default(cls, **overrides: Any) -> AugmentConfig:
        """The embedded CPU configuration (2 cores: trains in ≤ 3 min), with overrides."""
        return cls(**overrides).validate()

    @classmethod
    def paper(cls, **overrides: Any) -> AugmentConfig:
        """The full-size configuration for GPU/TPU: diffusers UNet at 28×28 with cross-attention."""
        base = dict(
            image_size=28,
            denoiser="unet",
            latent="none",
            unet_channels=(64, 128, 128),
            unet_layers_per_block=2,
            unet_attention=True,
            embed_dim=128,
            epochs=200,
            batch_size=128,
            learning_rate=2e-4,
            sample_steps=100,
            sample_batch=256,
        )
        base.update(overrides)
        return cls(**base).validate()

    @classmethod
    def tiny(cls, **overrides: Any) -> AugmentConfig:
        """A seconds-long configuration for tests and ``--quick`` runs."""
        base = dict(
            image_size=8, latent_dim=8, width=64, depth=2, embed_dim=16, epochs=2, batch_size=64,
            sample_steps=5, classifier_epochs=1, classifier_hidden=(32,), counterfactual_copies=1,
            sample_batch=32, unet_channels=(32, 32), num_train_timesteps=100,
        )
        base.update(overrides)
        return cls(**base).validate()

    def validate(self) -> AugmentConfig:
        """Return ``self`` if every field is in range, else raise naming the bad field.

        Raises:
          PrivDebiasError: unknown denoiser or schedule, non-positive sizes, a negative or
            NaN guidance scale, probabilities outside ``[0, 1)``, an image size the
            ``unet``'s down-sampling does not divide.
        """
        if self.denoiser not in DENOISERS:
            raise PrivDebiasError(f"unknown denoiser {self.denoiser!r}; expected one of {DENOISERS}")
        if self.latent not in LATENTS:
            raise PrivDebiasError(f"unknown latent {self.latent!r}; expected one of {LATENTS}")
        if self.latent != "none" and self.denoiser not in ("mlp", "factored"):
            raise PrivDebiasError(f"the {self.denoiser} denoiser works on images: use latent='none' with it")
        if self.denoiser == "factored" and self.latent != "colour":
            raise PrivDebiasError("the factored denoiser needs the shape/colour latent: use latent='colour' with it "
                                  "(or denoiser='mlp' for latent='pca')")
        bad_dim = isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int)
        if bad_dim or not 1 <= self.latent_dim <= self.image_size**2:
            raise PrivDebiasError(
                f"AugmentConfig.latent_dim must be in [1, image_size²] = [1, {self.image_size**2}], got {self.latent_dim!r}"
            )
        if self.guidance_space not in GUIDANCE_SPACES:
            raise PrivDebiasError(f"unknown guidance_space {self.guidance_space!r}; expected one of {GUIDANCE_SPACES}")
        if self.guidance_space == "routed" and self.latent != "colour":
            raise PrivDebiasError("guidance_space='routed' needs the shape/colour latent: use latent='colour' with it")
        if self.guidance_groups not in ("cell", "class"):
            raise PrivDebiasError(f"unknown guidance_groups {self.guidance_groups!r}; expected 'cell' or 'class'")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise PrivDebiasError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        for name in ("image_size", "width", "depth", "embed_dim", "num_train_timesteps", "sample_steps",
                     "batch_size", "classifier_batch_size", "sample_batch", "checkpoint_every",
                     "unet_layers_per_block", "counterfactual_copies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivDebiasError(f"AugmentConfig.{name} must be a positive integer, got {value!r}")
        for name in ("epochs", "classifier_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrivDebiasError(f"AugmentConfig.{name} must be a non-negative integer, got {value!r}")
        if self.sample_steps > self.num_train_timesteps:
            raise PrivDebiasError(
                f"sample_steps ({self.sample_steps}) cannot exceed num_train_timesteps ({self.num_train_timesteps})"
            )
        check_scale(self.guidance_scale, "guidance_scale")
        check_scale(self.kl_scale, "kl_scale")
        check_scale(self.class_weight, "class_weight")
        for name in ("cond_dropout", "ema_decay", "target_smoothing"):
            value = float(getattr(self, name))
            if not (0.0 <= value < 1.0):
                raise PrivDebiasError(f"AugmentConfig.{name} must be in [0, 1), got {value!r}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise PrivDebiasError(f"AugmentConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise PrivDebiasError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if any(int(c) < 1 for c in self.unet_channels) or not self.unet_channels:
            raise PrivDebiasError(f"AugmentConfig.unet_channels must be positive, got {self.unet_channels}")
        if self.denoiser == "unet" and any(int(c) % 32 for c in self.unet_channels):
            raise PrivDebiasError(
                f"AugmentConfig.unet_channels must be multiples of 32 (diffusers' Flax UNet uses 32 "
                f"group-norm groups), got {self.unet_channels}"
            )
        if any(int(c) < 1 for c in self.classifier_hidden) or not self.classifier_hidden:
            raise PrivDebiasError(f"AugmentConfig.classifier_hidden must be positive, got {self.classifier_hidden}")
        if self.denoiser in ("unet", "conv"):
            levels = len(self.unet_channels) if self.denoiser == "unet" else self.depth
            factor = 2 ** (levels - 1)
            if self.image_size % factor:
                raise PrivDebiasError(
                    f"image_size {self.image_size} must be divisible by {factor} for the {self.denoiser} "
                    f"denoiser with {levels} resolution levels"
                )
        return self

    def model_fingerprint(self) -> dict[str, Any]:
        """The fields that define the denoiser's parameters and schedule (checked on resume)."""
        keys = ("image_size", "denoiser", "latent", "latent_dim", "width", "depth", "embed_dim", "unet_channels",
                "unet_layers_per_block", "unet_attention", "num_train_timesteps", "beta_schedule",
                "beta_start", "beta_end", "batch_size", "learning_rate", "weight_decay", "ema_decay",
                "cond_dropout")
        return {k: _plain(getattr(self, k)) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise PrivDebiasError(f"AugmentConfig has no field(s) {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed).validate()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_scale(value: Any, name: str) -> float:
    """``float(value)`` if it is a finite, non-negative number, else :class:`PrivDebiasError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PrivDebiasError(f"{name} must be a finite non-negative number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise PrivDebiasError(f"{name} must be a finite non-negative number, got {value!r}")
    return v


def fingerprint_json(config: AugmentConfig, extra: dict[str, Any]) -> str:
    """A canonical JSON string of the model fingerprint plus ``extra`` (data shape, sizes)."""
    return json.dumps({**config.model_fingerprint(), **extra}, sort_keys=True)


__all__ = ["AugmentConfig", "DENOISERS", "LATENTS", "BETA_SCHEDULES", "check_scale", "fingerprint_json"]
