"""The jitted ``lax.scan`` DDIM sampler vs a Python loop calling diffusers' scheduler step by step.

Same denoiser (the CPU default: the factored FiLM MLP in the shape/colour latent, random
weights: speed does not depend on training), same
steps, same classifier-free guidance, at several batch sizes. Variants, each timed as one
complete sampling run (medians of interleaved repeats):

* ``scan``: :func:`privdebias_jax.augment.make_sampler` under one ``jax.jit``;
* ``loop_diffusers``: :func:`privdebias_jax.augment.sample_loop`, a jitted denoiser call
  and an eager ``FlaxDDIMScheduler.step`` per step (what a diffusers user writes);
* ``loop_fused``: a Python loop of one jitted call per step (denoiser + our DDIM update);
* ``model_only``: the ``S`` jitted denoiser calls alone (no update): the floor of any loop;
* ``scan_kl``: the scan sampler with KL-gradient guidance taken as the configuration's
  ``resolved_guidance_space`` says (the default: routed through the shape/colour latent, two
  guidance gradients per step), the guidance overhead vs ``scan``.

Batches 1, 16, 256 and ``config.sample_batch`` (500: what :func:`~privdebias_jax.augment.generate`
uses by default).

Where the time goes (``breakdown``): ``eager_scheduler_ms`` (one eager diffusers step,
timed alone) × steps, and the per-step dispatch ``loop_fused − scan``;
``loop_over_model_calls = loop_diffusers / model_only``. At large batches, where a call's
dispatch is negligible next to the denoiser's compute, no sampler runs faster than its
denoiser calls, so that ratio bounds what any sampler can gain over the loop (at small
batches the scan also removes the calls' dispatch and beats ``model_only``). ``target_met``:
the scan reaches 1.5× the loop.

    python benchmarks/sampler.py [--quick] [--out benchmarks/results/sampler.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, median, time_interleaved, write_result  # noqa: E402
from privdebias_jax.augment import (  # noqa: E402
    AugmentConfig,
    create_denoiser,
    ddim_scheduler,
    ddim_timesteps,
    make_eps_fn,
    make_sampler,
    make_schedule,
    sample_loop,
)
from privdebias_jax.augment.augmenter import guidance_options  # noqa: E402
from privdebias_jax.augment.latent import fit_colour_codec, fit_pca_codec  # noqa: E402
from privdebias_jax.augment.schedule import ddim_step  # noqa: E402
from privdebias_jax.data.mnist import colorize  # noqa: E402
from privdebias_jax.models import create_model, init_model  # noqa: E402

C = A = 10


def _random_params(denoiser, key, shape):
    @jax.jit
    def init(k):
        z = jnp.zeros(1, jnp.int32)
        p = denoiser.init(k, jnp.zeros((1, *shape)), z, z, z)["params"]
        leaves, tree = jax.tree_util.tree_flatten(p)
        ks = jax.random.split(jax.random.fold_in(k, 1), len(leaves))
        return jax.tree_util.tree_unflatten(tree, [v + 0.02 * jax.random.normal(q, v.shape) for v, q in zip(leaves, ks, strict=False)])

    return init(key)


def measure(config: AugmentConfig, batch: int, repeats: int, w: float = 2.0) -> dict:
    image = (config.image_size, config.image_size, 3)
    codec = None
    if config.latent == "pca":  # latent samplers: guidance decodes x̂₀ to images
        codec = fit_pca_codec(jax.random.uniform(jax.random.key(9), (64, *image), minval=-1, maxval=1), config.latent_dim)
    elif config.latent == "colour":  # the CPU default: shape PCA + colour, fitted on random grey shapes in colours
        gray = np.asarray(jax.random.uniform(jax.random.key(9), (64, *image[:2])))
        codec = fit_colour_codec(2.0 * colorize(gray, np.arange(64) % 10, "foreground") - 1.0, config.latent_dim)
    shape = image if codec is None else (codec.latent_dim,)
    den = create_denoiser(config, C, A, 3)
    params = _random_params(den, jax.random.key(0), shape)
    sched = make_schedule(config)
    steps = config.sample_steps
    y = jnp.arange(batch, dtype=jnp.int32) % C
    a = (jnp.arange(batch, dtype=jnp.int32) * 3) % A
    mask = jnp.ones(batch)
    key = jax.random.key(1)
    kw = dict(image_shape=shape, num_classes=C, num_attributes=A, steps=steps, cfg=True)
    scan = jax.jit(make_sampler(den, sched, **kw))
    clf = create_model("mlp", C, hidden=tuple(config.classifier_hidden))
    cp, _ = init_model(clf, jax.random.key(2), image)
    ap, _ = init_model(clf, jax.random.key(3), image)

    def logits(p, x):
        return clf.apply({"params": p}, x)[0]

    guided = guidance_options(codec, config.resolved_guidance_space, logits, logits, num_classes=C)
    scan_kl = jax.jit(make_sampler(den, sched, clip=None if codec is None else codec.clip, **guided, **kw))
    eps_fn = jax.jit(make_eps_fn(den, C, A, True))
    scheduler, sstate = ddim_scheduler(config)
    ts, prev = ddim_timesteps(config.num_train_timesteps, steps)

    @jax.jit
    def fused_step(params, x, t, t_prev):
        return ddim_step(sched, x, eps_fn(params, x, t, y, a, w), t, t_prev)

    x_init = jax.random.normal(jax.random.fold_in(key, 0), (batch, *shape))

    def run_loop_fused():
        x = x_init
        for t, tp in zip(ts, prev, strict=False):
            x = fused_step(params, x, t, tp)
        return x

    def run_model_only():
        x = x_init
        for t in ts:
            x = eps_fn(params, x, t, y, a, w)
        return x

    fns = {
        "scan": lambda: scan(params, None, y, a, mask, key, w, 0.0, 0.0),
        "loop_diffusers": lambda: sample_loop(den, params, scheduler, sstate, y, a, key, image_shape=shape,
                                              num_classes=C, num_attributes=A, steps=steps, guidance_scale=w,
                                              eps_fn=eps_fn),
        "loop_fused": run_loop_fused,
        "model_only": run_model_only,
        "scan_kl": lambda: scan_kl(params, (cp, ap), y, a, mask, key, w, 1.0, 0.0),
    }
    t0 = time.perf_counter()
    times = time_interleaved(fns, repeats=repeats, warmup=1)
    total = time.perf_counter() - t0
    # one eager diffusers step, timed alone
    st = scheduler.set_timesteps(sstate, steps)
    eps = eps_fn(params, x_init, ts[0], y, a, w)
    jax.block_until_ready(scheduler.step(st, eps, ts[0], x_init).prev_sample)
    eager = []
    for _ in range(max(3, repeats)):
        t1 = time.perf_counter()
        jax.block_until_ready(scheduler.step(st, eps, ts[1], x_init).prev_sample)
        eager.append(time.perf_counter() - t1)
    med = {k: median(v) for k, v in times.items()}
    sps = {k: batch / v for k, v in med.items()}
    return {
        "batch": batch,
        "steps": steps,
        "seconds": med,
        "samples_per_s": sps,
        "raw_seconds": times,
        "scan_over_loop_diffusers": med["loop_diffusers"] / med["scan"],
        "scan_over_loop_fused": med["loop_fused"] / med["scan"],
        "kl_guidance_overhead": med["scan_kl"] / med["scan"],
        # at large batches, where a call's dispatch is negligible next to its compute, no sampler
        # runs faster than its denoiser calls, so this bounds what any sampler gains over the loop
        "loop_over_model_calls": med["loop_diffusers"] / med["model_only"],
        "target_met": med["loop_diffusers"] / med["scan"] >= 1.5,
        "breakdown": {
            "model_only_s": med["model_only"],
            "eager_scheduler_ms_per_step": 1e3 * median(eager),
            "eager_scheduler_s_total": median(eager) * steps,
            "loop_diffusers_minus_loop_fused_s": med["loop_diffusers"] - med["loop_fused"],
            "loop_fused_minus_scan_s": med["loop_fused"] - med["scan"],
            "scan_minus_model_only_s": med["scan"] - med["model_only"],
        },
        "timing_seconds": total,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sampler.json")
    args = parser.parse_args(argv)
    if args.quick:
        config, batches, repeats = AugmentConfig.tiny(sample_steps=5), (4,), 1
    else:
        config, repeats = AugmentConfig.cpu_default(), 5
        batches = tuple(sorted({1, 16, 256, config.sample_batch}))
    entries = []
    for b in batches:
        e = measure(config, b, repeats)
        entries.append(e)
        print(f"batch {b:4d}, {e['steps']} steps: scan {e['samples_per_s']['scan']:,.1f} samples/s, "
              f"loop(diffusers) {e['samples_per_s']['loop_diffusers']:,.1f}, ratio {e['scan_over_loop_diffusers']:.2f}x "
              f"(vs fused loop {e['scan_over_loop_fused']:.2f}x); KL guidance x{e['kl_guidance_overhead']:.2f}; "
              f"eager scheduler {e['breakdown']['eager_scheduler_ms_per_step']:.2f} ms/step; "
              f"loop / model calls {e['loop_over_model_calls']:.2f}x", flush=True)
    payload = {
        "benchmark": "sampler",
        "command": "python benchmarks/sampler.py" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "settings": {"quick": args.quick, "denoiser": config.denoiser, "latent": config.latent,
                     "latent_dim": config.latent_dim, "width": config.width, "depth": config.depth,
                     "image_size": config.image_size, "steps": config.sample_steps, "guidance_scale": 2.0,
                     "guidance_space": config.resolved_guidance_space,
                     "repeats": repeats, "batches": list(batches)},
        "entries": entries,
        "target_scan_over_loop": 1.5,
    }
    path = write_result(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
