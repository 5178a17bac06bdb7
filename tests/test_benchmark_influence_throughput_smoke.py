"""benchmarks/influence_throughput.py --quick: its JAX scores against an independent computation.

The benchmark runs as a subprocess on the MLP (the CNN's compilation alone would take most of
the time budget); the test then rebuilds the same trained parameters and data with the
benchmark's own ``setup`` and recomputes the first scores without the library's influence
module: ``∇f`` by ``jax.grad``, two CG iterations written out here with ``jax.jvp(jax.grad)``
products, and each example's gradient by ``jax.grad`` on a one-example batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from benchmarks.influence_throughput import PROBLEMS, setup
from privdebias_jax.data import Batch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("influence_throughput") / "it.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "influence_throughput.py"), "--quick",
                    "--problems", "mlp", "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    return json.loads(out.read_text())


def hand_scores(result: dict, model_name: str, k: int) -> np.ndarray:
    """The first ``k`` scores ``−∇ℓ(z_i)ᵀ s``, ``s`` from two CG iterations on ``H + λI``, by hand."""
    settings = result["settings"]
    _, dataset, size = next(p for p in PROBLEMS if p[0] == model_name)
    ctx = setup(model_name, dataset, size, settings)
    loss_fn, params, lam = ctx["loss_fn"], ctx["params"], settings["damping"]
    flat, unravel = ravel_pytree(params)

    def loss_at(theta, batch):
        return loss_fn(unravel(theta), batch)

    train, test = ctx["train_batch"], ctx["test_batch"]
    hv = jax.jit(lambda v: jax.jvp(lambda t: jax.grad(loss_at)(t, train), (flat,), (v,))[1] + lam * v)
    b = jax.grad(loss_at)(flat, test)
    x, r, p = jnp.zeros_like(b), b, b
    for _ in range(settings["cg_iters"]):
        ap = hv(p)
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        p = r_new + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    one_grad = jax.jit(jax.grad(loss_at))
    out = []
    for i in range(k):
        one = Batch(*(jnp.asarray(np.asarray(v)[i:i + 1]) for v in train))
        out.append(-float(one_grad(flat, one) @ x))
    return np.asarray(out)


def test_quick_scores_match_a_hand_computation(quick_result):
    entry = quick_result["problems"]["mlp@28"]
    assert entry["n_train"] == quick_result["settings"]["n_train"]["mlp"] == 64
    assert entry["jax_cg"]["iterations"] == quick_result["settings"]["cg_iters"] == 2
    got = np.asarray(entry["scores_head"]["jax"])
    want = hand_scores(quick_result, "mlp", len(got))
    assert np.max(np.abs(want)) > 1e-4  # the scores are not all (near) zero
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.max(np.abs(want)))
    # the library's one-call influence_scores gives the scores the staged path gives
    assert entry["jax_influence_scores_rel_err"] < 1e-5
    t = entry["seconds"]["jax"]
    assert t["total"] == pytest.approx(t["solve"] + t["per_example_grads"] + t["scores"], rel=1e-6)


def test_quick_jax_and_torch_agree(quick_result):
    if quick_result["torch"] == "not installed":
        pytest.skip("torch is not installed (pip install -e '.[torch]'): no PyTorch side to compare")
    entry = quick_result["problems"]["mlp@28"]
    assert entry["work_identical"]
    agree = entry["agreement"]
    assert agree["scores_rel_err"] < 1e-3 and agree["ihvp_rel_err"] < 1e-3
    assert agree["scores_spearman"] > 0.999
    np.testing.assert_allclose(entry["scores_head"]["torch"], entry["scores_head"]["jax"], rtol=1e-3,
                               atol=1e-3 * np.max(np.abs(entry["scores_head"]["jax"])))
    assert entry["torch_over_jax"]["total"] > 0
