"""Benchmark (c): peak memory of sampling 10^6 images into the store, and of 1-NN over it.

Draws 1,000,000 samples of 1 x 16 x 16 from a DCGAN generator (`mia_gen.models.dcgan.DCGANGenerator`,
z = 32, random weights: the cost does not depend on training) into a uint8 `SampleStore`, then
runs streaming exact 1-NN for 1,000 queries over the whole store. Each step runs in its own
subprocess and reports its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`). Target:
sampling under 2 GB. Baseline in the same run: a subprocess that only imports the same modules
and builds the generator (the floor every step pays), and, for scale, the size the samples
would take held in memory as float32.

    python benchmarks/bench_sampling_memory.py              # 10^6 samples
    python benchmarks/bench_sampling_memory.py --quick      # 10^5 samples
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_knn import machine_info, write_result  # noqa: E402

LATENT_DIM, RESOLUTION, BASE_CHANNELS = 32, 16, 16
N_QUERIES = 1000


def _generator():
    import torch

    from mia_gen.models.dcgan import DCGANGenerator

    torch.manual_seed(0)
    return DCGANGenerator(latent_dim=LATENT_DIM, resolution=RESOLUTION, channels=1, base_channels=BASE_CHANNELS).eval()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(step: str, path: str, n_samples: int, shard_size: int) -> dict:
    import torch

    from mia_gen.neighbours import nearest_neighbours
    from mia_gen.sample_store import SampleStore, write_samples

    generator = _generator()
    start = time.perf_counter()
    if step == "sample":

        @torch.no_grad()
        def sample_fn(n, rng):
            z = torch.randn(n, LATENT_DIM, generator=rng)
            x = torch.cat([generator(z[i : i + 2048]) for i in range(0, n, 2048)])
            return x, z

        store = write_samples(path, sample_fn, n_samples, shard_size=shard_size, seed=0, progress=False)
        info = {"n_samples": len(store), "disk_mb": sum(f.stat().st_size for f in Path(path).iterdir()) / 2**20}
    elif step == "knn":
        store = SampleStore.open(path)
        queries = torch.rand(N_QUERIES, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1)) * 2 - 1
        d, i = nearest_neighbours(queries, store, k=1)
        info = {"n_samples": len(store), "queries": N_QUERIES, "mean_sq_distance": float(d.mean())}
    else:  # "baseline": imports and the generator only
        info = {}
    return {"step": step, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), **info}


def run_child(step: str, path: Path, n_samples: int, shard_size: int) -> dict:
    command = [sys.executable, __file__, "--child", step, "--path", str(path), "--n", str(n_samples),
               "--shard-size", str(shard_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {step}: peak RSS {result['peak_rss_mb']:.0f} MB, {result['seconds']:.1f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^5 samples")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--workdir", default=None, help="where the store is written (default: a temp dir)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.path, args.n, args.shard_size)))
        return

    n_samples = 100_000 if args.quick else 1_000_000
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mia_gen_bench_"))
    path = workdir / "store"
    shutil.rmtree(path, ignore_errors=True)
    print(f"sampling {n_samples} x 1x{RESOLUTION}x{RESOLUTION} into {path}")
    try:
        steps = {step: run_child(step, path, n_samples, args.shard_size) for step in ("baseline", "sample", "knn")}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    baseline = steps["baseline"]["peak_rss_mb"]
    in_memory_float32_mb = n_samples * RESOLUTION * RESOLUTION * 4 / 2**20
    result = {
        "benchmark": "sampling_memory",
        "command": "python benchmarks/bench_sampling_memory.py" + (" --quick" if args.quick else ""),
        "n_samples": n_samples,
        "shard_size": args.shard_size,
        "generator": f"mia_gen.models.dcgan.DCGANGenerator(latent_dim={LATENT_DIM}, resolution={RESOLUTION}, "
        f"channels=1, base_channels={BASE_CHANNELS}), random weights",
        "machine": machine_info(),
        "steps": steps,
        "baseline_peak_rss_mb": baseline,
        "samples_as_float32_in_memory_mb": in_memory_float32_mb,
        "sample_peak_rss_over_baseline": steps["sample"]["peak_rss_mb"] / baseline,
        "knn_peak_rss_over_baseline": steps["knn"]["peak_rss_mb"] / baseline,
        "sampling_under_2GB": steps["sample"]["peak_rss_mb"] < 2048,
    }
    print(
        f"peak RSS: baseline {baseline:.0f} MB, sampling {steps['sample']['peak_rss_mb']:.0f} MB "
        f"({result['sample_peak_rss_over_baseline']:.2f}x baseline; target < 2048 MB), 1-NN over the "
        f"store {steps['knn']['peak_rss_mb']:.0f} MB ({result['knn_peak_rss_over_baseline']:.2f}x); "
        f"the samples alone as float32 would be {in_memory_float32_mb:.0f} MB"
    )
    write_result("sampling_memory_quick" if args.quick else "sampling_memory", result, args.out)


if __name__ == "__main__":
    main()
