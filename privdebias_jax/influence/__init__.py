"""Influence engine: curvature products, inverse-HVP solvers, influence scores, Newton steps.

Sign convention: ``I(z) = −∇f(θ)ᵀ H⁻¹ ∇ℓ(z, θ)`` with ``H`` the Hessian of the *mean* training
loss; ``I(z) > 0`` means removing ``z`` lowers ``f`` (by ``≈ I(z)/n``). See
:mod:`privdebias_jax.influence.influence`.
"""

from privdebias_jax.influence.hvp import (
    dense_hessian,
    gnvp,
    hvp,
    linearize_hvp,
    matrix_from_products,
)
from privdebias_jax.influence.influence import (
    InfluenceResult,
    NewtonUpdate,
    influence_scores,
    newton_update,
    objective_gradient,
    self_influence,
    summed_gradient,
)
from privdebias_jax.influence.params import (
    LAST_LAYER,
    merge_params,
    param_paths,
    restrict,
    split_params,
)
from privdebias_jax.influence.problem import (
    CurvatureProblem,
    iterate_per_example_grads,
    make_problem,
    per_example_grads,
    per_example_products,
)
from privdebias_jax.influence.solvers import (
    SOLVERS,
    Diagnostics,
    InverseHVPSolver,
    dense_curvature,
    inverse_hvp,
    linear_head_hessian,
    make_solver,
)

__all__ = [
    "hvp",
    "linearize_hvp",
    "gnvp",
    "dense_hessian",
    "matrix_from_products",
    "LAST_LAYER",
    "param_paths",
    "split_params",
    "merge_params",
    "restrict",
    "CurvatureProblem",
    "make_problem",
    "iterate_per_example_grads",
    "per_example_grads",
    "per_example_products",
    "SOLVERS",
    "Diagnostics",
    "InverseHVPSolver",
    "make_solver",
    "inverse_hvp",
    "dense_curvature",
    "linear_head_hessian",
    "InfluenceResult",
    "NewtonUpdate",
    "objective_gradient",
    "influence_scores",
    "self_influence",
    "summed_gradient",
    "newton_update",
]
