"""Batched latent inversion (GAN-Leaks white-box) against a per-target loop, same iterations.

256 digit targets are inverted through the quick-start DCGAN generator of `configs/model/dcgan.yaml`
(z = 32, 16 px, random weights: the cost does not depend on training) with the white-box objective
(L2 + 0.001 (||z||^2 - dim)^2; LPIPS off). "batched" optimises all targets at once
(`mia_gen.attacks.latent_inversion.invert`, one generator call per step for every target); "loop" runs the
same function on one target at a time, as GAN-Leaks' scripts do. Both run the same number of
optimiser steps from the same starts; the two are timed interleaved in one run.

    python benchmarks/bench_inversion.py [--targets 256] [--iterations 50] [--repeats 3] [--optimizer adam|lbfgs] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf


from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402

from mia_gen.attacks.latent_inversion import ReconstructionObjective, invert  # noqa: E402
from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.device import resolve_device  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "dcgan.yaml"


def quickstart_generator(device: torch.device) -> torch.nn.Module:
    from hydra.utils import instantiate

    root = OmegaConf.create({"model": OmegaConf.load(CONFIG), "data": {"resolution": 16, "channels": 1}, "seed": 0})
    torch.manual_seed(0)
    return instantiate(root.model.generator).to(device).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    generator = quickstart_generator(device)
    records = load_dataset({"name": "digits", "resolution": 16, "channels": 1})
    targets = records.get(torch.arange(args.targets).numpy()).to(device)
    z0 = torch.randn(args.targets, generator.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    batched_objective = ReconstructionObjective(generator, targets, 0.0, 0.001, device=device)
    single_objectives = [ReconstructionObjective(generator, targets[i : i + 1], 0.0, 0.001, device=device)
                         for i in range(args.targets)]

    def batched():
        return invert(batched_objective, z0, args.optimizer, args.iterations, 0.05, batch_size=args.targets)[0]

    def loop():
        return torch.cat([invert(single_objectives[i], z0[i : i + 1], args.optimizer, args.iterations, 0.05,
                                 batch_size=1)[0] for i in range(args.targets)])

    # warm-up: the first call at each batch size pays for kernel selection, not for the search
    invert(batched_objective, z0, args.optimizer, 1, 0.05, batch_size=args.targets)
    invert(single_objectives[0], z0[:1], args.optimizer, 1, 0.05, batch_size=1)
    timings = time_interleaved({"batched": batched, "loop": loop}, args.repeats)
    batched_d, loop_d = timings["batched"]["last_result"], timings["loop"]["last_result"]
    agreement = float(((batched_d - loop_d).abs() / loop_d.abs().clamp_min(1e-8)).max())
    speedup = timings["loop"]["median_s"] / timings["batched"]["median_s"]
    result = {
        "machine": machine_info(), "device": str(device), "targets": args.targets, "iterations": args.iterations,
        "optimizer": args.optimizer, "threads": torch.get_num_threads(), "generator": "configs/model/dcgan.yaml (z=32, 16 px, base 64)",
        "batched_s": timings["batched"]["median_s"], "loop_s": timings["loop"]["median_s"],
        "runs_s": {k: v["runs_s"] for k, v in timings.items()},
        "speedup": speedup, "max_relative_difference_of_scores": agreement,
    }
    print(f"{args.optimizer}, {args.targets} targets x {args.iterations} steps: batched {result['batched_s']:.2f} s, "
          f"loop {result['loop_s']:.2f} s -> {speedup:.1f}x; scores agree to {agreement:.1e} (relative)")
    write_result(f"inversion_{args.optimizer}_{device.type}", result, args.out)


if __name__ == "__main__":
    main()
