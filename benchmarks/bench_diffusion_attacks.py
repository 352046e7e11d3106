"""White-box diffusion attacks: time per record against the same number of bare model forwards.

Each attack is timed on N digit records with the CPU-sized DDPM of `configs/model/ddpm.yaml`
(random weights: the cost of a forward pass does not depend on training). Its baseline, timed in
the same run and interleaved with it, is exactly the model calls the attack made
(`info["model_calls_made_per_record"]` x N) as bare `Denoiser.epsilon` calls on random inputs at
the attack's batch size. N defaults to that batch size (256), so every call of the attack is a full
batch too. Overhead = attack / baseline - 1 (target: at most 15%).

    python benchmarks/bench_diffusion_attacks.py [--quick] [--records 256] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402

from mia_gen.attacks import AttackContext, build_attack  # noqa: E402
from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.device import resolve_device  # noqa: E402
from mia_gen.models.ddpm import build_scheduler, build_unet  # noqa: E402
from mia_gen.models.denoiser import Denoiser  # noqa: E402

ATTACKS = ("diffusion_loss", "secmi_stat", "pia", "pian")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "ddpm.yaml"


def cpu_ddpm(device: torch.device) -> Denoiser:
    # The model config's interpolations point into the root config; give them the digits' values.
    root = OmegaConf.create({"model": OmegaConf.load(CONFIG), "data": {"resolution": 16, "channels": 1},
                             "seed": 0})
    model_cfg = root.model
    torch.manual_seed(0)
    unet = build_unet(model_cfg.unet)
    return Denoiser.from_unet(unet, build_scheduler(model_cfg)).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 repeat: a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n_records, repeats = (args.records, 1) if args.quick else (args.records, args.repeats)
    device = resolve_device(args.device)

    denoiser = cpu_ddpm(device)
    records = load_dataset({"name": "digits", "resolution": 16, "channels": 1})
    queries = records.get(np.arange(n_records))
    context = AttackContext(queries=queries, record_ids=np.arange(n_records), denoiser=denoiser,
                            device=device, seed=0)
    print(f"{n_records} records, 1x16x16, DDPM UNet ({sum(p.numel() for p in denoiser.parameters()):,} "
          f"parameters), device={device}, torch threads={torch.get_num_threads()}", flush=True)

    result = {"machine": machine_info(), "records": n_records, "attacks": {}}
    for name in ATTACKS:
        attack = build_attack(name)
        calls = build_attack(name)(context).info["model_calls_made_per_record"] * n_records
        batch_size = int(attack.batch_size)
        inputs = torch.randn(batch_size, 1, 16, 16, device=device)
        timesteps = torch.full((batch_size,), 100, dtype=torch.long, device=device)
        n_full, rest = divmod(calls, batch_size)

        def bare_forwards():
            for _ in range(n_full):
                denoiser.epsilon(inputs, timesteps)
            if rest:
                denoiser.epsilon(inputs[:rest], timesteps[:rest])

        print(f"{name}: {calls // n_records} model calls per record, batch {batch_size}", flush=True)
        timed = time_interleaved({name: lambda: attack(context), "bare_forwards": bare_forwards}, repeats)
        attack_s, bare_s = timed[name]["median_s"], timed["bare_forwards"]["median_s"]
        result["attacks"][name] = {
            "model_calls_per_record": calls // n_records, "batch_size": batch_size,
            "attack_s": attack_s, "bare_forwards_s": bare_s,
            "attack_ms_per_record": 1000 * attack_s / n_records,
            "overhead": attack_s / bare_s - 1, "runs": {k: v["runs_s"] for k, v in timed.items()},
        }
        print(f"[{name}] {1000 * attack_s / n_records:.1f} ms/record; bare forwards {bare_s:.2f} s -> "
              f"overhead {100 * (attack_s / bare_s - 1):+.1f}% (target <= +15%)", flush=True)
    write_result("diffusion_attacks_quick" if args.quick else "diffusion_attacks", result, args.out)


if __name__ == "__main__":
    main()
