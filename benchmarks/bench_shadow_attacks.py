"""Shadow-model attacks on the CPU-sized DDPM: GSA's batched per-sample gradients against a per-record
backward loop, and LiRA's scoring time against the bare forward passes it needs.

Models: the UNet of `configs/model/ddpm.yaml` (1x16x16, ~0.65M parameters) in a `Denoiser`, with random
weights (timing does not depend on training); each shadow is the same network with its weights drawn
again from another seed. Records: digits, 1x16x16 in [-1, 1].

GSA (`gsa_features`, torch.func `vmap` of `grad`) at several batch sizes, against
- "loop": GSA's reference code (`gsa1`: the record repeated over its k timesteps, one forward of those k
  images, one backward of the timestep-averaged loss; `gsa2`: one backward per timestep with
  retain_graph), features read from `.grad` of each parameter tensor;
- "floor": one ordinary forward + backward of the same batch of records x k images with the summed loss
  (one gradient for the whole batch, not one per record): the compute any per-record method needs at least.
GSA1 runs at every `--batch-sizes` and the attack's default (16), GSA2 at the default (all its records if
fewer). Reported: ms per record, speed-up over the loop (target >= 5x) and the largest relative difference of
the features from the loop's, over the features whose gradient is not zero in exact arithmetic (the
attention key bias gets none: softmax ignores a shift of every score of a query; its rounding noise,
~1e-9 of the record's largest feature, is reported separately).

LiRA (`mia_gen.attacks.lira.LiRA`, online, on `diffusion_loss` with its defaults) with K shadows on N
records, against "bare forwards": the same number of model calls (K + 1 models x N records x the loss
attack's calls per record) as bare `Denoiser.epsilon` calls on random inputs at the loss attack's batch
size, on the same models. Reported: LiRA / bare (target <= 1.15) and ms per record per model; the
Gaussian fits (`lira_online`) are also timed alone.

Each candidate is timed `--repeats` times, interleaved with its baseline; the median is reported. PASS / FAIL
lines end the output (the exit status stays 0: GSA1 misses the 5x target on this CPU, BENCHMARKS.md (f)).

    python benchmarks/bench_shadow_attacks.py [--quick] [--threads 1] [--repeats 3] [--gsa-records 64]
        [--batch-sizes 8,16,32,64] [--gsa2-records 16] [--lira-records 512] [--shadows 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch


from bench_diffusion_attacks import cpu_ddpm  # noqa: E402
from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402

from mia_gen.attacks import AttackContext, build_attack  # noqa: E402
from mia_gen.attacks.gsa import GSA, reference_timesteps  # noqa: E402
from mia_gen.attacks.gsa_features import gsa_features  # noqa: E402
from mia_gen.attacks.shadow_stats import lira_online  # noqa: E402
from mia_gen.attacks.timesteps import chunks, forward_noise, record_noise  # noqa: E402
from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.device import resolve_device  # noqa: E402
from mia_gen.models.denoiser import Denoiser  # noqa: E402
from mia_gen.zoo import draw_zoo  # noqa: E402

GSA_SPEEDUP_TARGET = 5.0  # loop / batched, at least
LIRA_RATIO_TARGET = 1.15  # LiRA / bare forwards, at most
ZERO_GRADIENT = 1e-6  # a loop feature below this fraction of its record's largest is rounding noise


def shadow_of(denoiser: Denoiser, seed: int) -> Denoiser:
    """The same network with every layer's weights drawn again (its own initialiser) from `seed`."""
    shadow = copy.deepcopy(denoiser)
    torch.manual_seed(seed)
    for module in shadow.modules():
        if module is not shadow and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return shadow.eval()


def record_losses(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-image losses `(B * k,)` of records x0 `(B, C, H, W)` at every timestep, with the autograd graph."""
    b, k = len(x0), len(timesteps)
    x0_jobs = x0[:, None].expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
    t_jobs = timesteps.repeat(b)
    eps = noise.reshape(b * k, *x0.shape[1:])
    x_t = forward_noise(x0_jobs, t_jobs, eps, denoiser.alphas_cumprod)
    return ((denoiser.epsilon(x_t, t_jobs, grad=True) - eps) ** 2).flatten(1).sum(dim=1)


def grad_norms(denoiser: Denoiser, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    denoiser.zero_grad(set_to_none=True)
    loss.backward(retain_graph=retain_graph)
    return torch.stack([p.grad.double().norm() if p.grad is not None else torch.zeros((), dtype=torch.float64)
                        for p in denoiser.parameters()]).cpu()


def loop_features(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  variant: str) -> np.ndarray:
    """GSA's reference code: one record at a time, its k timesteps in one forward, features from `.grad`."""
    rows = []
    for n in range(len(x0)):
        losses = record_losses(denoiser, x0[n:n + 1], noise[n:n + 1], timesteps)
        if variant == "gsa1":
            rows.append(grad_norms(denoiser, losses.mean()))
        else:
            rows.append(torch.stack([grad_norms(denoiser, losses[i], retain_graph=i < len(losses) - 1)
                                     for i in range(len(losses))]).mean(dim=0))
    denoiser.zero_grad(set_to_none=True)
    return torch.stack(rows).numpy()


def floor_pass(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               batch_size: int) -> None:
    """One ordinary backward per batch of records (the summed gradient): the compute per-record gradients need."""
    for part in chunks(len(x0), batch_size):
        grad_norms(denoiser, record_losses(denoiser, x0[part], noise[part], timesteps).sum())
    denoiser.zero_grad(set_to_none=True)


def compare(batched: np.ndarray, loop: np.ndarray, names: list[str]) -> dict:
    """Largest relative difference over features with a gradient; the rounding-noise features apart."""
    noise_level = loop < ZERO_GRADIENT * loop.max(axis=1, keepdims=True)
    relative = np.abs(batched - loop) / np.where(noise_level, 1.0, np.abs(loop))
    versus_record_max = np.abs(batched - loop) / loop.max(axis=1, keepdims=True)
    return {
        "max_relative_difference": float(relative[~noise_level].max()),
        "zero_gradient_features": sorted({names[j] for j in np.flatnonzero(noise_level.any(axis=0))}),
        "zero_gradient_max_abs_difference_vs_record_max":
            float(versus_record_max[noise_level].max()) if noise_level.any() else None,
    }


def bench_gsa(denoiser: Denoiser, records, n_records: int, batch_sizes: list[int], variant: str, repeats: int,
              device: torch.device, floor: bool, n_timesteps: int | None = None) -> dict:
    """GSA `variant` at each batch size against the loop (and the floor); k = the attack's default timesteps."""
    k = int(GSA.defaults["n_timesteps"]) if n_timesteps is None else n_timesteps
    timesteps = reference_timesteps(k, int(denoiser.num_train_timesteps))
    ids = np.arange(n_records)
    x0 = records.get(ids).float().to(device)
    noise = record_noise(ids, 0, len(timesteps), tuple(x0.shape[1:])).to(device)
    t = torch.tensor(timesteps, device=device)
    names = [name for name, _ in denoiser.named_parameters()]
    default = int(GSA.defaults["batch_size"])
    candidates = {"loop": lambda: loop_features(denoiser, x0, noise, t, variant)}
    for b in batch_sizes:
        candidates[f"batched_{b}"] = (lambda b=b: gsa_features(denoiser, x0, ids, 0, timesteps, variant, b, device)[0])
    if floor:
        candidates[f"floor_{default}"] = lambda: floor_pass(denoiser, x0, noise, t, default)
    print(f"GSA ({variant}): {n_records} records, k={len(timesteps)} timesteps {timesteps}, "
          f"{len(names)} parameter tensors", flush=True)
    timed = time_interleaved(candidates, repeats)
    loop_s = timed["loop"]["median_s"]
    rows = {}
    for name, result in timed.items():
        row = {"median_s": result["median_s"], "runs_s": result["runs_s"],
               "ms_per_record": 1000 * result["median_s"] / n_records,
               "speedup_vs_loop": loop_s / result["median_s"]}
        if name.startswith("batched"):
            row.update(compare(result["last_result"], timed["loop"]["last_result"], names))
        rows[name] = row
        print(f"[gsa {variant}] {name}: {row['ms_per_record']:.1f} ms/record, {row['speedup_vs_loop']:.2f}x vs loop"
              + (f", max rel diff {row['max_relative_difference']:.1e}" if "max_relative_difference" in row else ""),
              flush=True)
    batched = {name: row for name, row in rows.items() if name.startswith("batched")}
    best = max(batched, key=lambda name: batched[name]["speedup_vs_loop"])
    return {"variant": variant, "records": n_records, "timesteps": timesteps, "default_batch_size": default,
            "best": best, "rows": rows}


def bench_lira(target: Denoiser, records, n_records: int, n_shadows: int, repeats: int, device: torch.device) -> dict:
    ids = np.arange(n_records)
    queries = records.get(ids)
    shadows = [shadow_of(target, seed=k + 1) for k in range(n_shadows)]
    membership = draw_zoo(records, ids, n_shadows, seed=0).membership

    def context(denoiser: Denoiser) -> AttackContext:
        return AttackContext(queries=queries, record_ids=ids, denoiser=denoiser, device=device, seed=0)

    zoo_context = context(target)
    zoo_context.shadow_models = [context(s) for s in shadows]
    zoo_context.shadow_membership = membership
    zoo_context.shadow_indices = list(range(n_shadows))
    lira = build_attack("lira")  # online, diffusion_loss with its defaults
    loss_attack = build_attack("diffusion_loss")
    calls_per_record = loss_attack(context(target)).info["model_calls_made_per_record"]
    batch_size = int(loss_attack.batch_size)
    calls_per_model = calls_per_record * n_records
    n_full, rest = divmod(calls_per_model, batch_size)
    inputs = torch.randn(batch_size, *queries.shape[1:], device=device)
    t = torch.full((batch_size,), 100, dtype=torch.long, device=device)

    def bare_forwards() -> None:
        for model in [target, *shadows]:
            for _ in range(n_full):
                model.epsilon(inputs, t)
            if rest:
                model.epsilon(inputs[:rest], t[:rest])

    n_models = n_shadows + 1
    print(f"LiRA online on diffusion_loss: K={n_shadows} shadows, {n_records} records, {calls_per_record} model "
          f"calls per record and model, batch {batch_size}: {n_models * calls_per_model:,} UNet inputs", flush=True)
    timed = time_interleaved({"lira": lambda: lira(zoo_context), "bare_forwards": bare_forwards}, repeats)
    lira_s, bare_s = timed["lira"]["median_s"], timed["bare_forwards"]["median_s"]
    scores = timed["lira"]["last_result"].scores
    if not np.isfinite(scores).all():
        raise RuntimeError("LiRA left records unscored in the benchmark; the zoo matrix should make every record fit.")
    # The Gaussian fits alone, on statistics of the same shape (they do not depend on the values' source).
    rng = np.random.default_rng(0)
    fit_runs = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        lira_online(rng.normal(size=(n_records, 1)), rng.normal(size=(n_shadows, n_records, 1)), membership)
        fit_runs.append(time.perf_counter() - start)
    fit_s = float(np.median(fit_runs))
    result = {
        "shadows": n_shadows, "records": n_records, "model_calls_per_record_per_model": calls_per_record,
        "batch_size": batch_size, "unet_inputs": n_models * calls_per_model,
        "lira_s": lira_s, "bare_forwards_s": bare_s, "ratio": lira_s / bare_s,
        "lira_ms_per_record_per_model": 1000 * lira_s / (n_records * n_models),
        "bare_ms_per_record_per_model": 1000 * bare_s / (n_records * n_models),
        "gaussian_fits_s": fit_s, "runs": {k: v["runs_s"] for k, v in timed.items()},
    }
    print(f"[lira] {lira_s:.2f} s vs bare forwards {bare_s:.2f} s -> {lira_s / bare_s:.3f}x (target <= "
          f"{LIRA_RATIO_TARGET}); {result['lira_ms_per_record_per_model']:.2f} ms per record per model; "
          f"Gaussian fits alone {1000 * fit_s:.1f} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gsa-records", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="GSA batch sizes to try (records per vmap)")
    parser.add_argument("--gsa2-records", type=int, default=16,
                        help="GSA2 records (0: skip); its loop runs k backward passes a record")
    parser.add_argument("--lira-records", type=int, default=512)
    parser.add_argument("--shadows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat: a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.gsa_records, args.batch_sizes = 1, 8, "4,8"
        args.gsa2_records, args.lira_records, args.shadows = 4, 64, 4
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    default = int(GSA.defaults["batch_size"])

    target = cpu_ddpm(device)
    records = load_dataset({"name": "digits", "resolution": 16, "channels": 1})
    result = {"machine": machine_info(), "parameters": sum(p.numel() for p in target.parameters())}
    print(f"DDPM UNet ({result['parameters']:,} parameters), device={device}, torch threads="
          f"{torch.get_num_threads()}, load average {result['machine']['load_average_at_start']}", flush=True)

    gsa_batch_sizes = batch_sizes if args.quick else sorted(set(batch_sizes) | {default})  # always the default
    result["gsa1"] = bench_gsa(target, records, args.gsa_records, gsa_batch_sizes, "gsa1", args.repeats, device,
                               floor=not args.quick)
    if args.gsa2_records:
        result["gsa2"] = bench_gsa(target, records, args.gsa2_records, [min(default, args.gsa2_records)], "gsa2",
                                   args.repeats, device, floor=False)
    result["lira"] = bench_lira(target, records, args.lira_records, args.shadows, args.repeats, device)

    checks = []
    for variant in ("gsa1", "gsa2"):
        if variant in result:
            best = result[variant]["rows"][result[variant]["best"]]
            checks.append((f"GSA {variant} best batched ({result[variant]['best']}) >= {GSA_SPEEDUP_TARGET}x the loop "
                           f"({best['speedup_vs_loop']:.2f}x)", best["speedup_vs_loop"] >= GSA_SPEEDUP_TARGET))
            checks.append((f"GSA {variant} features within 1e-4 of the loop's ({best['max_relative_difference']:.1e})",
                           best["max_relative_difference"] <= 1e-4))
    checks.append((f"LiRA <= {LIRA_RATIO_TARGET}x its bare forwards ({result['lira']['ratio']:.3f}x)",
                   result["lira"]["ratio"] <= LIRA_RATIO_TARGET))
    result["checks"] = {text: ok for text, ok in checks}
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    write_result("shadow_attacks_quick" if args.quick else "shadow_attacks", result, args.out)


if __name__ == "__main__":
    main()
