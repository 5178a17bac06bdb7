"""Bias-guided diffusion augmentation: each piece against an independent reference.

DDIM update vs a hand-written NumPy formula and diffusers' scheduler; the scan sampler vs the
Python loop over diffusers' step; the stochastic sampler vs a NumPy loop with the same noise;
the KL-guidance loss vs ``scipy.special.rel_entr`` and its gradient vs the hand-derived
chain rule; the planner's counts vs the bias computed by ``privdebias_jax.metrics`` and
``sklearn``; resume vs uninterrupted training; bad input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import rel_entr, softmax
from sklearn.metrics import mutual_info_score

from privdebias_jax.augment import (
    AugmentConfig,
    cell_labels,
    create_denoiser,
    ddim_scheduler,
    ddim_step,
    ddim_timesteps,
    kl_guidance_loss,
    make_eps_fn,
    make_sampler,
    make_schedule,
    plan_augmentation,
    plan_from_counts,
    q_sample,
    sample_loop,
    train_denoiser,
)
from privdebias_jax.augment.diffusion import init_diffusion_state, make_denoiser_optimizer
from privdebias_jax.data import make_dataset
from privdebias_jax.metrics import kl_bias, mutual_information_bias
from privdebias_jax.types import PrivDebiasError

TINY = AugmentConfig.tiny()


def np_ddim(x, eps, abar_t, abar_prev, eta=0.0, z=None):
    """DDIM eq. 12 / 16 (Song et al. 2021) in NumPy float64."""
    x0 = np.clip((x - np.sqrt(1 - abar_t) * eps) / np.sqrt(abar_t), -1, 1)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_prev)
    out = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev - sigma**2) * eps
    return out + (sigma * z if z is not None else 0.0)


def random_params(denoiser, key, shape):
    """Initialised parameters with every leaf perturbed (zero-initialised output layers move)."""
    @jax.jit
    def init(key):
        z = jnp.zeros(1, jnp.int32)
        params = denoiser.init(key, jnp.zeros((1, *shape)), z, z, z)["params"]
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree_util.tree_unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=False)])

    return init(key)


def test_ddim_step_matches_numpy_formula_and_diffusers():
    cfg = AugmentConfig.tiny(num_train_timesteps=1000, sample_steps=10)
    sched = make_schedule(cfg)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    eps = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    scheduler, state = ddim_scheduler(cfg)
    state = scheduler.set_timesteps(state, 10)
    ts, prev = ddim_timesteps(1000, 10)
    np.testing.assert_array_equal(np.asarray(state.timesteps), ts)
    for t, tp in [(ts[0], prev[0]), (ts[4], prev[4]), (ts[-1], prev[-1])]:
        ap = abar[tp] if tp >= 0 else 1.0
        ours = np.asarray(ddim_step(sched, jnp.asarray(x), jnp.asarray(eps), t, tp))
        np.testing.assert_allclose(ours, np_ddim(x, eps, abar[t], ap), rtol=1e-4, atol=1e-5)
        theirs = np.asarray(scheduler.step(state, jnp.asarray(eps), int(t), jnp.asarray(x)).prev_sample)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # stochastic: the same z the key draws
    key = jax.random.key(3)
    t, tp = ts[3], prev[3]
    z = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
    ours = np.asarray(ddim_step(sched, jnp.asarray(x), jnp.asarray(eps), t, tp, eta=0.7, key=key))
    np.testing.assert_allclose(ours, np_ddim(x, eps, abar[t], abar[tp], 0.7, z), rtol=1e-4, atol=1e-5)


def test_q_sample_matches_closed_form_and_diffusers():
    sched = make_schedule(TINY)
    scheduler, state = ddim_scheduler(TINY)
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, size=(3, 4, 4, 3)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([0, 37, 99])
    ab = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None, None, None]
    ours = np.asarray(q_sample(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(ours, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, np.asarray(scheduler.add_noise(state, x0, noise, t)), rtol=1e-6, atol=1e-6)


def _tiny_denoiser(kind="mlp"):
    cfg = dataclasses.replace(TINY, denoiser=kind, sample_steps=6)
    den = create_denoiser(cfg, 3, 2, 3)
    params = random_params(den, jax.random.key(0), (8, 8, 3))
    return cfg, den, params


def test_scan_sampler_equals_python_loop_over_diffusers_step():
    cfg, den, params = _tiny_denoiser()
    sched = make_schedule(cfg)
    y, a = jnp.array([0, 1, 2, 1]), jnp.array([1, 0, 1, 1])
    key = jax.random.key(5)
    fn = jax.jit(make_sampler(den, sched, image_shape=(8, 8, 3), num_classes=3, num_attributes=2, steps=6, cfg=True))
    scan = np.asarray(fn(params, None, y, a, jnp.ones(4), key, 2.5, 0.0, 0.0))
    scheduler, state = ddim_scheduler(cfg)
    loop = np.asarray(sample_loop(den, params, scheduler, state, y, a, key, image_shape=(8, 8, 3),
                                  num_classes=3, num_attributes=2, steps=6, guidance_scale=2.5))
    np.testing.assert_allclose(scan, loop, rtol=1e-5, atol=1e-5)
    assert np.abs(scan).max() > 0.1  # a non-trivial trajectory


def test_stochastic_sampler_matches_numpy_loop_with_same_noise():
    cfg, den, params = _tiny_denoiser()
    sched = make_schedule(cfg)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    y, a = jnp.array([2, 0]), jnp.array([0, 1])
    key = jax.random.key(9)
    fn = jax.jit(make_sampler(den, sched, image_shape=(8, 8, 3), num_classes=3, num_attributes=2, steps=6,
                              cfg=True, stochastic=True))
    out = np.asarray(fn(params, None, y, a, jnp.ones(2), key, 1.5, 0.0, 0.8))
    again = np.asarray(fn(params, None, y, a, jnp.ones(2), key, 1.5, 0.0, 0.8))
    np.testing.assert_array_equal(out, again)
    eps_fn = jax.jit(make_eps_fn(den, 3, 2, True))
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (2, 8, 8, 3)), np.float64)
    ts, prev = ddim_timesteps(cfg.num_train_timesteps, 6)
    for k, (t, tp) in enumerate(zip(ts, prev, strict=False)):
        eps = np.asarray(eps_fn(params, jnp.asarray(x, jnp.float32), t, y, a, 1.5), np.float64)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, k + 1), x.shape, jnp.float32), np.float64)
        x = np_ddim(x, eps, abar[t], abar[tp] if tp >= 0 else 1.0, 0.8, z)
    np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-4)
    det = np.asarray(jax.jit(make_sampler(den, sched, image_shape=(8, 8, 3), num_classes=3, num_attributes=2,
                                          steps=6, cfg=True))(params, None, y, a, jnp.ones(2), key, 1.5, 0.0, 0.0))
    assert np.abs(out - det).max() > 1e-3  # η > 0 really adds noise


def _np_guidance(W_c, b_c, W_a, b_a, x, y, a, mask, lam, delta, C, A, group_by):
    """Loss and its gradient w.r.t. x for linear classifiers, by the chain rule in NumPy."""
    xf = x.reshape(len(x), -1)
    pc = softmax(xf @ W_c + b_c, axis=1)
    pa = softmax(xf @ W_a + b_a, axis=1)
    loss, grad = 0.0, np.zeros_like(xf)
    group = y * A + a if group_by == "cell" else y
    for c in range(C * A):
        rows = np.flatnonzero((group == c) & (mask > 0))
        if not len(rows):
            continue
        n = len(rows)
        q = pa[rows].mean(0)
        pi = np.bincount(a[rows], minlength=A) / n
        target = (1 - delta) * pi + delta / A
        loss += n * rel_entr(q, target).sum()
        dq = n * (np.log(q / target) + 1.0)  # dL/dq
        for i in rows:  # dq/dz_i = (diag p − p pᵀ)/n
            dz = (np.diag(pa[i]) - np.outer(pa[i], pa[i])) @ dq / n
            grad[i] += W_a @ dz
    for i in np.flatnonzero(mask > 0):
        loss += lam * -np.log(pc[i, y[i]])
        grad[i] += lam * W_c @ (pc[i] - np.eye(C)[y[i]])
    return loss, grad.reshape(x.shape)


@pytest.mark.parametrize("group_by", ["cell", "class"])
def test_kl_guidance_loss_and_gradient_match_hand_computed(group_by):
    rng = np.random.default_rng(2)
    C, A, B, D = 3, 4, 7, 12
    W_c, b_c = rng.normal(size=(D, C)), rng.normal(size=C)
    W_a, b_a = rng.normal(size=(D, A)), rng.normal(size=A)
    x = rng.normal(size=(B, D))
    y = np.array([0, 0, 1, 1, 1, 2, 0])
    a = np.array([1, 1, 0, 3, 3, 2, 2])
    mask = np.array([1, 1, 1, 1, 1, 1, 0], np.float64)

    def loss(xx):
        return kl_guidance_loss(xx @ W_c + b_c, xx @ W_a + b_a, jnp.asarray(y), jnp.asarray(a), jnp.asarray(mask),
                                num_classes=C, class_weight=0.7, smoothing=0.05, group_by=group_by)

    with jax.enable_x64(True):
        value, grad = jax.value_and_grad(loss)(jnp.asarray(x))
        ref_value, ref_grad = _np_guidance(W_c, b_c, W_a, b_a, x, y, a, mask, 0.7, 0.05, C, A, group_by)
        np.testing.assert_allclose(float(value), ref_value, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-8, atol=1e-10)
        # and a central finite difference along a random direction
        v = rng.normal(size=x.shape)
        h = 1e-5
        fd = (float(loss(jnp.asarray(x + h * v))) - float(loss(jnp.asarray(x - h * v)))) / (2 * h)
        np.testing.assert_allclose(fd, float(np.sum(ref_grad * v)), rtol=1e-6)
    assert np.abs(ref_grad[-1]).max() == 0.0  # the padding row gets no gradient
    # the two halves the routed guidance steps on separately: κ · KL alone and λ · CE alone
    with jax.enable_x64(True):
        kl_only, kl_grad = _np_guidance(W_c, b_c, W_a, b_a, x, y, a, mask, 0.0, 0.05, C, A, group_by)
        args = (x @ W_c + b_c, x @ W_a + b_a, jnp.asarray(y), jnp.asarray(a), jnp.asarray(mask))
        half = dict(num_classes=C, smoothing=0.05, group_by=group_by)
        np.testing.assert_allclose(float(kl_guidance_loss(*args, class_weight=0.0, kl_weight=2.5, **half)),
                                   2.5 * kl_only, rtol=1e-10)
        np.testing.assert_allclose(float(kl_guidance_loss(*args, class_weight=0.7, kl_weight=0.0, **half)),
                                   ref_value - kl_only, rtol=1e-10)


def _biased_labels(n=2000, C=5, A=5, rho=0.9, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    a = np.where(rng.uniform(size=n) < rho, y % A, rng.integers(0, A, n))
    return y.astype(np.int32), a.astype(np.int32)


@pytest.mark.parametrize("prior", ["marginal", "uniform"])
def test_planner_counts_reach_the_target_bias(prior):
    C, A = 5, 5
    y, a = _biased_labels(C=C, A=A)
    ds = make_dataset(np.zeros((len(y), 2)), y, a)
    prior_vec = None if prior == "marginal" else np.full(A, 1 / A, np.float32)
    before = float(kl_bias(y, a, C, A, prior=prior_vec))
    if prior == "marginal":
        np.testing.assert_allclose(before, mutual_info_score(y, a), rtol=1e-4)
    target = 0.2 * before
    plan = plan_augmentation(ds, C, A, target_bias=target, prior=prior)
    assert plan.shape == (C, A) and plan.dtype.kind == "i" and plan.min() >= 0
    cells = np.repeat(np.arange(C * A), plan.reshape(-1))
    y2 = np.concatenate([y, cells // A]).astype(np.int32)
    a2 = np.concatenate([a, cells % A]).astype(np.int32)
    after = float(kl_bias(y2, a2, C, A, prior=prior_vec))
    assert after <= target + 1e-6
    if prior == "marginal":
        np.testing.assert_allclose(after, mutual_info_score(y2, a2), rtol=1e-3, atol=1e-6)
        assert after <= 0.2 * float(mutual_information_bias(y, a, C, A)) + 1e-6
    # close to the cheapest water-filling plan: 3 % fewer samples (shaved from the fullest
    # fill) no longer reach the target
    smaller = plan_from_counts(np.histogram2d(y, a, bins=(C, A), range=((0, C), (0, A)))[0],
                               max_new=int(0.97 * plan.sum()), prior=prior)
    cells = np.repeat(np.arange(C * A), smaller.reshape(-1))
    y3 = np.concatenate([y, cells // A]).astype(np.int32)
    a3 = np.concatenate([a, cells % A]).astype(np.int32)
    assert float(kl_bias(y3, a3, C, A, prior=prior_vec)) > target
    # a budget is respected
    capped = plan_augmentation(ds, C, A, target_bias=target, max_new=100, prior=prior)
    assert capped.sum() == 100


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(tmp_path):
    cfg = AugmentConfig.tiny(epochs=3, checkpoint_every=1, batch_size=16, denoiser="mlp", latent="pca")  # on images
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(48, 8, 8, 3)).astype(np.float32)
    y, a = rng.integers(0, 3, 48), rng.integers(0, 2, 48)
    den = create_denoiser(cfg, 3, 2, 3)
    sched = make_schedule(cfg)
    kw = dict(num_classes=3, num_attributes=2, key=jax.random.key(4))
    full, hist = train_denoiser(den, sched, cfg, x, y, a, **kw)
    part, _ = train_denoiser(den, sched, cfg, x, y, a, checkpoint_dir=tmp_path / "ck", epochs=2, **kw)
    resumed, hist2 = train_denoiser(den, sched, cfg, x, y, a, checkpoint_dir=tmp_path / "ck", **kw)
    assert [h["epoch"] for h in hist2] == [3]
    assert int(resumed.step) == int(full.step) == 9
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                           resumed.params, full.params)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                           resumed.ema_params, full.ema_params)
    assert hist[-1]["loss"] == pytest.approx(hist2[-1]["loss"], rel=1e-5)
    # a checkpoint of another configuration is refused, naming the difference
    other = dataclasses.replace(cfg, width=32)
    with pytest.raises(PrivDebiasError, match="another configuration.*width"):
        train_denoiser(create_denoiser(other, 3, 2, 3), sched, other, x, y, a, checkpoint_dir=tmp_path / "ck", **kw)


def test_training_reduces_the_denoising_loss():
    cfg = AugmentConfig.tiny(epochs=1, batch_size=16, learning_rate=3e-3, ema_decay=0.0, denoiser="mlp", latent="pca")
    den = create_denoiser(cfg, 2, 2, 1)
    sched = make_schedule(cfg)
    tx = make_denoiser_optimizer(cfg)
    state = init_diffusion_state(den, tx, jax.random.key(0), (8, 8, 1))
    assert int(state.step) == 0
    # images: class 0 = a bright left half, class 1 = a bright right half
    x = -np.ones((64, 8, 8, 1), np.float32)
    y = np.arange(64) % 2
    x[y == 0, :, :4] = 1
    x[y == 1, :, 4:] = 1
    losses = [h["loss"] for h in train_denoiser(den, sched, dataclasses.replace(cfg, epochs=40), x, y, y,
                                                num_classes=2, num_attributes=2, key=jax.random.key(1))[1]]
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_bad_input_raises():
    with pytest.raises(PrivDebiasError, match="guidance_scale"):
        AugmentConfig.cpu_default(guidance_scale=-1.0)
    with pytest.raises(PrivDebiasError, match="kl_scale"):
        AugmentConfig.cpu_default(kl_scale=float("nan"))
    with pytest.raises(PrivDebiasError, match="unknown denoiser"):
        AugmentConfig.cpu_default(denoiser="vae")
    with pytest.raises(PrivDebiasError, match="divisible"):
        AugmentConfig.cpu_default(denoiser="unet", latent="none", image_size=14, unet_channels=(32, 64, 64))
    with pytest.raises(PrivDebiasError, match="multiples of 32"):
        AugmentConfig.cpu_default(denoiser="unet", latent="none", unet_channels=(16, 32))
    with pytest.raises(PrivDebiasError, match="latent='none'"):
        AugmentConfig.cpu_default(denoiser="conv")
    with pytest.raises(PrivDebiasError, match="unknown cell"):
        cell_labels({(3, 0): 2}, 3, 2)
    with pytest.raises(PrivDebiasError, match="shape"):
        cell_labels(np.ones((3, 3), int), 3, 2)
    with pytest.raises(PrivDebiasError, match="whole numbers"):
        cell_labels(np.full((3, 2), np.nan), 3, 2)
    with pytest.raises(PrivDebiasError, match="non-negative"):
        cell_labels(-np.ones((3, 2), int), 3, 2)
    y, a = _biased_labels(200, 3, 3)
    ds = make_dataset(np.zeros((200, 1)), y, a)
    with pytest.raises(PrivDebiasError, match="sum to 1"):
        plan_augmentation(ds, 3, 3, prior=np.array([0.5, 0.3, 0.3]))
    with pytest.raises(PrivDebiasError, match="unknown bias prior"):
        plan_augmentation(ds, 3, 3, prior="flat")
    with pytest.raises(PrivDebiasError, match="target_bias"):
        plan_augmentation(ds, 3, 3, target_bias=float("nan"))
    with pytest.raises(PrivDebiasError, match="max_new"):
        plan_augmentation(ds, 3, 3, max_new=-1)
    with pytest.raises(PrivDebiasError, match="out of range"):
        plan_augmentation(ds, 2, 3)
    ys, as_ = cell_labels({(1, 0): 2, (0, 1): 1}, 3, 2)
    np.testing.assert_array_equal(ys, [0, 1, 1])
    np.testing.assert_array_equal(as_, [1, 0, 0])
