"""Machine unlearning: SISA shards trained as one vmapped program, exact forgetting, baselines.

* :func:`make_plan` / :class:`ShardPlan`: ids → shards × slices (uniform or deletion-weighted).
* :func:`train_shards` → :class:`SISAModel`: per-slice checkpoints, :meth:`~SISAModel.forget`,
  :meth:`~SISAModel.forget_stepwise`, :meth:`~SISAModel.ensemble`; the :class:`Ledger` of requests.
* :class:`ShardEnsemble`: the shards as one model (mean of softmax or majority vote).
* :mod:`~privdebias_jax.unlearn.baselines`: full retraining, Newton-step removal, fine-tuning on
  the retained data, gradient ascent on the forget set.
"""

from privdebias_jax.unlearn import baselines
from privdebias_jax.unlearn.ensemble import (
    AGGREGATES,
    ShardEnsemble,
    aggregate_logits,
    ensemble_from_states,
)
from privdebias_jax.unlearn.ledger import Ledger
from privdebias_jax.unlearn.plan import PADDING_ID, ShardPlan, make_plan
from privdebias_jax.unlearn.sisa import (
    ForgetReport,
    RetrainCost,
    SISAConfig,
    SISAModel,
    sisa_epochs,
    train_shards,
)

__all__ = [
    "AGGREGATES",
    "ForgetReport",
    "Ledger",
    "PADDING_ID",
    "RetrainCost",
    "SISAConfig",
    "SISAModel",
    "ShardEnsemble",
    "ShardPlan",
    "aggregate_logits",
    "baselines",
    "ensemble_from_states",
    "make_plan",
    "sisa_epochs",
    "train_shards",
]
