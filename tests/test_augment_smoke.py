"""End-to-end augmentation at tiny sizes: fit → plan → generate → quality report; the PCA latent;
the diffusers UNet denoiser; and smoke runs of the CLI, the experiment and the benchmark."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privdebias_jax.augment import (
    AugmentConfig,
    create_denoiser,
    fit_augmenter,
    generate,
    plan_augmentation,
    quality_report,
    save_sample_grid,
)
from privdebias_jax.augment.denoiser import FactoredDenoiser
from privdebias_jax.augment.diffusion import (
    init_diffusion_state,
    make_denoiser_optimizer,
    make_diffusion_step,
)
from privdebias_jax.augment.latent import (
    decode,
    encode,
    fit_colour_codec,
    fit_pca_codec,
    project,
    project_routed,
)
from privdebias_jax.augment.schedule import make_schedule
from privdebias_jax.data import Dataset, biased_mnist, next_free_id
from privdebias_jax.data.mnist import PALETTE, colorize
from privdebias_jax.types import PrivDebiasError

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_pca_latent_round_trip_and_whitening():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(40, 4, 4, 3)).astype(np.float32)
    full = fit_pca_codec(x, 16)  # full rank: decode(encode(x)) == x
    z = np.asarray(encode(full, jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(decode(full, jnp.asarray(z))), x, atol=2e-5)
    # whitened: every component has unit variance over the training channels
    per_channel = z.reshape(40, 3, 16).transpose(1, 0, 2).reshape(-1, 16)
    np.testing.assert_allclose(per_channel.std(axis=0), 1.0, rtol=1e-3)
    # truncated: the reconstruction is the projection on the top principal directions (numpy SVD)
    part = fit_pca_codec(x, 5)
    rows = x.transpose(0, 3, 1, 2).reshape(-1, 16).astype(np.float64)
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    proj = (rows - mean) @ vt[:5].T @ vt[:5] + mean
    rec = np.asarray(decode(part, encode(part, jnp.asarray(x)))).transpose(0, 3, 1, 2).reshape(-1, 16)
    np.testing.assert_allclose(rec, proj, atol=2e-5)
    with pytest.raises(PrivDebiasError, match="latent_dim"):
        fit_pca_codec(x, 17)


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_colour_latent_recovers_shape_and_colour(mode):
    rng = np.random.default_rng(1)
    gray = rng.uniform(0, 1, size=(60, 4, 4)).astype(np.float32)
    a = rng.integers(0, 10, size=60)
    x = 2.0 * colorize(gray, a, mode) - 1.0  # diffusion scale
    codec = fit_colour_codec(x, 16)  # full rank on the 16 shape pixels: exact round trip
    assert codec.mode == mode and codec.latent_dim == 19 and codec.shape_dim == 16
    z = np.asarray(encode(codec, jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(decode(codec, jnp.asarray(z))), x, atol=3e-5)
    # the last 3 coordinates are the palette colour, standardised over the data
    colour = z[:, 16:] * np.asarray(codec.colour_scale) + np.asarray(codec.colour_mean)
    np.testing.assert_allclose(colour, PALETTE[a], atol=2e-5)
    np.testing.assert_allclose(z[:, 16:].std(axis=0), 1.0, rtol=1e-3)
    # the shape coordinates are the whitened PCA of 2g - 1 (numpy SVD)
    rows = (2.0 * gray.reshape(60, 16) - 1.0).astype(np.float64)
    _, sv, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
    ref = (rows - rows.mean(0)) @ vt[:3].T / (sv[:3] / np.sqrt(60))
    np.testing.assert_allclose(np.abs(z[:, :3]), np.abs(ref), atol=1e-3)  # up to the sign of each component
    # recolouring in the latent = recolouring the image: shape part unchanged
    z2 = np.asarray(encode(codec, jnp.asarray(2.0 * colorize(gray, (a + 3) % 10, mode) - 1.0)))
    np.testing.assert_allclose(z2[:, :16], z[:, :16], atol=3e-5)


def _coloured_shapes(seed, mode, n=30):
    """``rng`` (advanced past the data), grey 4×4 shapes, palette colours, the images in the
    diffusion scale, their full-rank colour codec and latents."""
    rng = np.random.default_rng(seed)
    gray = rng.uniform(0, 1, size=(n, 4, 4)).astype(np.float32)
    a = rng.integers(0, 10, size=n)
    x = 2.0 * colorize(gray, a, mode) - 1.0
    codec = fit_colour_codec(x, 16)
    return rng, gray, a, x, codec, encode(codec, jnp.asarray(x))


def _np_colour_given_shape(x01, g, mode):
    """NumPy least-squares colour of images ``x01`` given their shape ``g``."""
    if mode == "foreground":
        return np.einsum("bhwc,bhw->bc", x01, g) / (g * g).sum((1, 2))[:, None]
    return np.einsum("bhwc,bhw->bc", x01 - g[..., None], 1 - g) / ((1 - g) ** 2).sum((1, 2))[:, None]


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_colour_projection_is_least_squares_given_the_reference_colour(mode):
    rng, gray, a, x, codec, z = _coloured_shapes(3, mode)
    np.testing.assert_allclose(np.asarray(project(codec, z, jnp.asarray(x))), np.asarray(z), atol=3e-5)
    # a perturbed image: the shape is the per-pixel least squares given z's colour (NumPy), the
    # colour then the least squares given that shape
    noisy = np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    got = np.asarray(project(codec, z, jnp.asarray(noisy)))
    x01, c = (noisy.astype(np.float64) + 1) / 2, PALETTE[a][:, None, None, :].astype(np.float64)
    if mode == "foreground":
        g = np.clip((x01 * c).sum(-1) / (c * c).sum(-1), 0, 1)
    else:
        g = np.clip(((x01 - c) * (1 - c)).sum(-1) / ((1 - c) ** 2).sum(-1), 0, 1)
    col = _np_colour_given_shape(x01, g, mode)
    zg = ((2 * g - 1).reshape(30, 16) - np.asarray(codec.mean)) @ np.asarray(codec.basis) / np.asarray(codec.scale)
    want = np.concatenate([zg, (col - np.asarray(codec.colour_mean)) / np.asarray(codec.colour_scale)], axis=1)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # the PCA codec's projection is its encoder
    pca = fit_pca_codec(x, 4)
    np.testing.assert_allclose(np.asarray(project(pca, None, jnp.asarray(noisy))),
                               np.asarray(encode(pca, jnp.asarray(noisy))))


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_routed_projection_takes_the_shape_from_one_image_and_the_colour_from_the_other(mode):
    rng, gray, _, x, codec, z = _coloured_shapes(4, mode)
    np.testing.assert_allclose(np.asarray(project_routed(codec, z, jnp.asarray(x), jnp.asarray(x))),
                               np.asarray(z), atol=3e-5)  # a fixed point
    x_shape = np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    x_colour = np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    got = np.asarray(project_routed(codec, z, jnp.asarray(x_shape), jnp.asarray(x_colour)))
    # shape: that of project(z, x_shape), whatever x_colour is
    np.testing.assert_allclose(got[:, :16], np.asarray(project(codec, z, jnp.asarray(x_shape)))[:, :16], atol=1e-6)
    other = np.asarray(project_routed(codec, z, jnp.asarray(x_shape), jnp.asarray(-x_colour)))
    np.testing.assert_array_equal(other[:, :16], got[:, :16])
    # colour: least squares of x_colour given z's own shape (NumPy)
    col = _np_colour_given_shape((x_colour.astype(np.float64) + 1) / 2, gray.astype(np.float64), mode)
    want = (col - np.asarray(codec.colour_mean)) / np.asarray(codec.colour_scale)
    np.testing.assert_allclose(got[:, 16:], want, atol=2e-4)
    with pytest.raises(PrivDebiasError, match="latent='colour'"):
        project_routed(fit_pca_codec(x, 4), z, jnp.asarray(x), jnp.asarray(x))
    with pytest.raises(PrivDebiasError, match="routed"):
        AugmentConfig.cpu_default(denoiser="mlp", latent="pca", guidance_space="routed")
    with pytest.raises(PrivDebiasError, match="guidance_space"):
        AugmentConfig.cpu_default(guidance_space="pixels")
    assert AugmentConfig.cpu_default().resolved_guidance_space == "routed"
    assert AugmentConfig.cpu_default(denoiser="mlp", latent="pca").resolved_guidance_space == "image"
    assert AugmentConfig.cpu_default(denoiser="mlp", latent="pca", guidance_space="latent").resolved_guidance_space \
        == "latent"


def test_colour_latent_refuses_other_images():
    rng = np.random.default_rng(2)
    with pytest.raises(PrivDebiasError, match="one grey shape and one colour"):
        fit_colour_codec(rng.uniform(-1, 1, size=(20, 4, 4, 3)), 4)
    with pytest.raises(PrivDebiasError, match="RGB"):
        fit_colour_codec(rng.uniform(-1, 1, size=(20, 4, 4, 1)), 4)
    with pytest.raises(PrivDebiasError, match="colour mode"):
        fit_colour_codec(2.0 * colorize(rng.uniform(size=(5, 4, 4)), np.zeros(5, int), "foreground") - 1.0, 4,
                         mode="stripes")
    with pytest.raises(PrivDebiasError, match="factored denoiser needs"):
        AugmentConfig.cpu_default(latent="pca")


def test_factored_denoiser_keeps_shape_and_colour_conditions_apart():
    """ε_shape depends on the class only and ε_colour on the attribute only (p(g|y) p(c|a))."""
    den = FactoredDenoiser(num_classes=3, num_attributes=4, split=5, width=16, depth=1, embed_dim=8, colour_width=8)
    key = jax.random.key(0)
    z = jax.random.normal(key, (6, 8))
    t = jnp.arange(6) * 10
    y = jnp.array([0, 1, 2, 0, 1, 3])  # 3 = null class token
    a = jnp.array([0, 1, 2, 3, 4, 0])  # 4 = null attribute token
    params = den.init(key, z, t, y, a)["params"]
    # FiLM and output layers start at zero: perturb every parameter so the test sees real dependence
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(jax.random.fold_in(key, i), p.shape)
                                       for i, p in enumerate(leaves)])
    out = den.apply({"params": params}, z, t, y, a)
    other_a = den.apply({"params": params}, z, t, y, (a + 1) % 5)
    other_y = den.apply({"params": params}, z, t, (y + 1) % 4, a)
    np.testing.assert_array_equal(np.asarray(other_a[:, :5]), np.asarray(out[:, :5]))  # shape part ignores a
    np.testing.assert_array_equal(np.asarray(other_y[:, 5:]), np.asarray(out[:, 5:]))  # colour part ignores y
    assert np.abs(np.asarray(other_a[:, 5:] - out[:, 5:])).min() > 1e-4  # the colour follows a
    assert np.abs(np.asarray(other_y[:, :5] - out[:, :5])).max() > 1e-3  # the shape follows y
    # the colour half is the shape-free MLP on the colour coordinates alone
    z2 = z.at[:, :5].set(0.0)
    np.testing.assert_array_equal(np.asarray(den.apply({"params": params}, z2, t, y, a)[:, 5:]),
                                  np.asarray(out[:, 5:]))
    with pytest.raises(PrivDebiasError, match="split"):
        den.apply({"params": params}, z[:, :5], t, y, a)


@pytest.fixture(scope="module")
def tiny_run():
    splits = biased_mnist(0.99, key=0, image_size=8, train_size=200, test_per_class=5)
    cfg = AugmentConfig.tiny(epochs=2, sample_steps=4)
    aug = fit_augmenter(splits.train, num_classes=10, num_attributes=10, config=cfg, key=jax.random.key(0),
                        counterfactual=splits.counterfactual)
    return splits, aug


def test_generate_and_quality_report(tiny_run, tmp_path):
    splits, aug = tiny_run
    plan = plan_augmentation(splits.train, 10, 10, max_new=30)
    assert plan.sum() == 30  # the budget binds: exactly max_new samples
    start = next_free_id(splits.train)
    syn = generate(aug, plan, key=jax.random.key(1), start_id=start, eta=0.5)
    n = int(plan.sum())
    assert syn.x.shape == (n, 8, 8, 3) and syn.x.dtype == np.float32
    assert 0.0 <= syn.x.min() and syn.x.max() <= 1.0
    np.testing.assert_array_equal(syn.idx, np.arange(start, start + n))
    cells = np.repeat(np.arange(100), plan.reshape(-1))
    np.testing.assert_array_equal(syn.y, cells // 10)
    np.testing.assert_array_equal(syn.a, cells % 10)
    again = generate(aug, plan, key=jax.random.key(1), start_id=start, eta=0.5)
    np.testing.assert_array_equal(syn.x, again.x)  # same key, same samples
    other = generate(aug, plan, key=jax.random.key(2), start_id=start, eta=0.5)
    assert np.abs(syn.x - other.x).max() > 1e-3
    # the report against a direct count of the judges' labels
    rep = quality_report(aug, syn)
    py, pa = aug.judge_class.predict(syn.x), aug.judge_attr.predict(syn.x)
    assert rep["class_acc"] == pytest.approx(np.mean(py == syn.y))
    assert rep["attr_acc"] == pytest.approx(np.mean(pa == syn.a))
    for y in range(10):
        for a in range(10):
            rows = (syn.y == y) & (syn.a == a)
            got_c, got_a = rep["class_acc_per_cell"][y][a], rep["attr_acc_per_cell"][y][a]
            if rows.any():
                assert got_c == pytest.approx(np.mean(py[rows] == y))
                assert got_a == pytest.approx(np.mean(pa[rows] == a))
            else:
                assert got_c is None and got_a is None
    path = save_sample_grid(syn, tmp_path / "grid.png", 10, 10)
    assert path.stat().st_size > 1000
    # KL guidance and classifier-free guidance run (and change the samples)
    one = np.zeros((10, 10), int)
    one[3, 7] = 2
    plain = generate(aug, one, key=jax.random.key(3), start_id=0, guidance_scale=1.0, kl_scale=0.0)
    guided = generate(aug, one, key=jax.random.key(3), start_id=0, guidance_scale=2.0, kl_scale=5.0)
    assert np.abs(plain.x - guided.x).max() > 1e-4
    # routed guidance (class step → shape, attribute step → colour) runs through the same API
    # the default routed guidance (class step → shape, attribute step → colour) differs from the
    # image-space step, and runs through the same API
    assert aug.codec is not None and aug.config.resolved_guidance_space == "routed"
    image_aug = dataclasses.replace(aug, config=dataclasses.replace(aug.config, guidance_space="image"),
                                    _samplers={})
    unrouted = generate(image_aug, one, key=jax.random.key(3), start_id=0, guidance_scale=2.0, kl_scale=5.0)
    assert unrouted.x.shape == guided.x.shape and np.isfinite(unrouted.x).all()
    assert np.abs(unrouted.x - guided.x).max() > 1e-4
    # bad input
    with pytest.raises(PrivDebiasError, match="guidance_scale"):
        generate(aug, one, key=jax.random.key(3), start_id=0, guidance_scale=-1.0)
    with pytest.raises(PrivDebiasError, match="kl_scale"):
        generate(aug, one, key=jax.random.key(3), start_id=0, kl_scale=float("nan"))
    with pytest.raises(PrivDebiasError, match="unknown cell"):
        generate(aug, {(10, 0): 1}, key=jax.random.key(3), start_id=0)
    with pytest.raises(PrivDebiasError, match="shape"):
        quality_report(aug, Dataset(np.asarray(splits.train.x)[:, :4], splits.train.y, splits.train.a, splits.train.idx))


def test_fit_augmenter_checkpoint_resume_and_other_config(tmp_path):
    splits = biased_mnist(0.99, key=0, image_size=8, train_size=100, test_per_class=5)
    cfg = AugmentConfig.tiny(epochs=1, classifier_epochs=0)  # classifiers untrained: checkpoints of the denoiser
    kw = dict(num_classes=10, num_attributes=10, key=jax.random.key(0), checkpoint_dir=tmp_path)
    first = fit_augmenter(splits.train, config=cfg, **kw)
    assert (tmp_path / "denoiser" / "1").is_dir() and (tmp_path / "augmenter.json").is_file()
    resumed = fit_augmenter(splits.train, config=cfg, **kw)  # nothing left to train: restored
    assert resumed.info["denoiser_history"] == []
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.state.ema_params, resumed.state.ema_params)
    with pytest.raises(PrivDebiasError, match="another configuration"):
        fit_augmenter(splits.train, config=AugmentConfig.tiny(epochs=1, classifier_epochs=0, width=32), **kw)
    with pytest.raises(PrivDebiasError, match=r"\[0, 1\]"):
        fit_augmenter(Dataset(np.asarray(splits.train.x) * 3, splits.train.y, splits.train.a, splits.train.idx), config=cfg,
                      num_classes=10, num_attributes=10, key=jax.random.key(0))


def test_diffusers_unet_denoiser_trains_at_tiny_size():
    cfg = AugmentConfig.tiny(denoiser="unet", latent="none", unet_channels=(32,), embed_dim=8)  # + cross-attn mid block
    den = create_denoiser(cfg, 3, 2, 3)
    sched = make_schedule(cfg)
    tx = make_denoiser_optimizer(cfg)
    state = init_diffusion_state(den, tx, jax.random.key(0), (8, 8, 3))
    step = jax.jit(make_diffusion_step(den, tx, sched, cfg, 3, 2))
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1, maxval=1)
    batch = (x, jnp.array([0, 1, 2, 0]), jnp.array([1, 0, 1, 1]), jnp.ones(4))
    new, loss = step(state, batch, jax.random.key(2))
    assert np.isfinite(float(loss)) and int(new.step) == 1
    out = den.apply({"params": new.params}, x, jnp.array([5, 5, 5, 5]), batch[1], batch[2])
    assert out.shape == x.shape
    changed = jax.tree_util.tree_map(lambda u, v: float(jnp.abs(u - v).max()), state.params, new.params)
    assert max(jax.tree_util.tree_leaves(changed)) > 0


def test_cli_augment_passes_its_options_to_the_driver(tmp_path, capsys, monkeypatch):
    """The CLI's own work: options → a validated AugmentConfig → the driver → results.json.

    The driver itself (fit → plan → generate → quality → downstream) runs end to end in
    ``test_experiment_and_benchmark_quick`` below, through the experiment script that shares it.
    """
    from privdebias_jax.augment import driver
    from privdebias_jax.cli import main

    calls = []

    def fake_driver(dataset, out, **kw):
        calls.append((dataset, out, kw))
        png = Path(out) / f"{dataset}_samples.png"
        return {"dataset": dataset, "grid_png": str(png), "mi_reduction": 0.9}

    monkeypatch.setattr(driver, "augment_and_evaluate", fake_driver)
    monkeypatch.setattr(driver, "summary_line", lambda r: f"summary of {r['dataset']}")
    argv = ["augment", "--quick", "--dataset", "colored-mnist", "--out", str(tmp_path), "--no-progress",
            "--epochs", "3", "--kl-scale", "0.5", "--steps", "7", "--seed", "4", "--guidance-space", "image",
            "--class-weight", "2.5"]
    assert main(argv) == 0
    (dataset, out, kw), = calls
    assert dataset == "colored-mnist" and Path(out) == tmp_path
    cfg = kw["config"]
    tiny = AugmentConfig.tiny()
    assert (cfg.epochs, cfg.kl_scale, cfg.sample_steps, cfg.guidance_space, cfg.class_weight) == (3, 0.5, 7, "image", 2.5)
    assert cfg.denoiser == tiny.denoiser and cfg.guidance_scale == tiny.guidance_scale  # not overridden
    assert kw["quick"] is True and kw["seed"] == 4 and kw["progress"] is False
    assert kw["checkpoint_dir"] == tmp_path / "checkpoints" and kw["image_size"] == cfg.image_size
    res = json.loads((tmp_path / "results.json").read_text())
    assert res == {"dataset": "colored-mnist", "grid_png": str(tmp_path / "colored-mnist_samples.png"),
                   "mi_reduction": 0.9}
    assert "summary of colored-mnist" in capsys.readouterr().out
    # out-of-range options are named before anything runs
    assert main(["augment", "--quick", "--kl-scale", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "kl_scale" in capsys.readouterr().err
    assert main(["augment", "--quick", "--latent", "pca", "--denoiser", "mlp", "--guidance-space", "routed",
                 "--out", str(tmp_path / "x")]) == 2
    assert "routed" in capsys.readouterr().err
    assert len(calls) == 1 and not (tmp_path / "x").exists()


def test_experiment_and_benchmark_quick(tmp_path):
    sys.path.insert(0, str(REPO_ROOT))
    import importlib

    exp = importlib.import_module("experiments.augment_mnist")
    res = exp.main(["--quick", "--datasets", "colored-mnist", "--out", str(tmp_path / "exp")])
    r = res["datasets"]["colored-mnist"]
    assert r["num_synthetic"] == int(np.sum(r["plan"]))
    assert r["mi_reduction"] >= 0.8 - 1e-6  # the planner's target, measured on the augmented set
    assert r["bias_after"]["mutual_information"] < r["bias_before"]["mutual_information"]
    assert Path(r["grid_png"]).stat().st_size > 1000
    assert set(r["targets"]) == {"every_cell_class_ge_90", "every_cell_attr_ge_90", "mi_reduced_ge_80pct",
                                 "unbiased_acc_gain"}
    bench = importlib.import_module("benchmarks.sampler")
    out = bench.main(["--quick", "--out", str(tmp_path / "s.json")])
    e = out["entries"][0]
    assert e["samples_per_s"]["scan"] > 0 and e["samples_per_s"]["loop_diffusers"] > 0
    assert e["scan_over_loop_diffusers"] == pytest.approx(e["seconds"]["loop_diffusers"] / e["seconds"]["scan"])
    assert e["loop_over_model_calls"] == pytest.approx(e["seconds"]["loop_diffusers"] / e["seconds"]["model_only"])
    assert e["target_met"] == (e["scan_over_loop_diffusers"] >= 1.5)
    assert out["settings"]["guidance_space"] == "routed"  # the tiny config's colour latent routes the guidance
    assert json.loads((tmp_path / "s.json").read_text())["machine"]["cpu_count"] >= 1
