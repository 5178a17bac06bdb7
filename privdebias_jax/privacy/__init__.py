"""Privacy auditing: membership-inference metrics, attribute probes, reconstruction attacks.

* :mod:`~privdebias_jax.privacy.metrics`: ROC / AUC / TPR at low FPR / balanced accuracy of
  membership-inference scores with stratified bootstrap intervals (Carlini et al. 2022;
  Yu et al. 2021), sliced reports and log-log ROC plots.
* :mod:`~privdebias_jax.privacy.probe`: a linear softmax probe that reads the protected
  attribute from a model's bottleneck features (attribute inference, seed paper 001).
* :mod:`~privdebias_jax.privacy.reconstruction`: an MLP decoder from features back to images
  and how well the private attribute (colour) can be read from its reconstructions.
* :mod:`~privdebias_jax.privacy.membership`: membership scores (LOSS, confidence, entropy,
  modified entropy, M-Loss / M-Mean / M-Moments with augmentations, LiRA, shadow features).
* :mod:`~privdebias_jax.privacy.shadow`: shadow / reference models trained together (teams of
  models sharing each batch), or lane by lane, or one by one.
* :mod:`~privdebias_jax.privacy.attacks`: the attack suite on one target (calibrated
  thresholds, reference models trained together, unlearning audit).

Each submodule's public names are re-exported here; a new submodule adds itself to
``_SUBMODULES`` (and its import line) below.
"""

from __future__ import annotations

from privdebias_jax.privacy import attacks, membership, metrics, probe, reconstruction, shadow
from privdebias_jax.privacy.attacks import *  # noqa: F403
from privdebias_jax.privacy.membership import *  # noqa: F403
from privdebias_jax.privacy.metrics import *  # noqa: F403
from privdebias_jax.privacy.probe import *  # noqa: F403
from privdebias_jax.privacy.reconstruction import *  # noqa: F403
from privdebias_jax.privacy.shadow import *  # noqa: F403

_SUBMODULES = (metrics, probe, reconstruction, membership, shadow, attacks)

__all__ = [name for module in _SUBMODULES for name in module.__all__]
