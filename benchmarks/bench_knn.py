"""Benchmark (a): exact 1-NN search, mia-gen `nearest_neighbours` vs sklearn brute force vs one matmul.

Full size: 2,000 queries vs 100,000 samples of 3,072 dims (float32), on two kinds of data:
- "normal": i.i.d. standard normal entries (no structure: no exact pruning can help);
- "dcgan": 3x32x32 images from `mia_gen.models.dcgan.DCGANGenerator(latent_dim=32, resolution=32,
  channels=3, base_channels=16)` with random (seeded, DCGAN-initialised) weights, in train mode
  (BatchNorm on batch statistics, batches of 1,000 latents; in eval mode the untrained network
  outputs ~0), samples and queries from different N(0, 1) latents. Values in about [-0.7, 0.7].
Targets: >= 3x faster than sklearn `NearestNeighbors(algorithm="brute")` fit + kneighbors, and
within 1.5x of one bare torch matmul of the same shape (Q x D @ D x N), measured in the same run.

    python benchmarks/bench_knn.py            # full size, both data kinds, 3 repeats, median
    python benchmarks/bench_knn.py --quick    # 200 x 20,000, for a smoke test
    python benchmarks/bench_knn.py --data dcgan

Also holds the small timing helpers the other benchmark scripts import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What ran the benchmark: CPU, core count, threads, library versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import faiss

        faiss_version, faiss_threads = faiss.__version__, faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        faiss_version, faiss_threads = None, None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss_version,
        "faiss_threads": faiss_threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Run each candidate `repeats` times, interleaved (so machine noise hits all alike).

    Returns name -> {"median_s", "runs_s", "last_result"}.
    """
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            last[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            runs[name].append(time.perf_counter() - start)
            print(f"  {name}: {runs[name][-1]:.2f} s", flush=True)
    return {
        name: {"median_s": statistics.median(times), "runs_s": times, "last_result": last[name]}
        for name, times in runs.items()
    }


def write_result(name: str, result: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return path


def benchmark_data(kind: str, n_queries: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries `(n_queries, 3072)`, samples `(n_samples, 3072)`) float32, seeded; see the docstring."""
    if kind == "normal":
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n_queries, 3072, generator=gen), torch.randn(n_samples, 3072, generator=gen)
    from mia_gen.models.dcgan import DCGANGenerator

    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=32, resolution=32, channels=3, base_channels=16).train()
    with torch.no_grad():
        rows = [generator(torch.randn(1000, 32)).reshape(1000, -1) for _ in range(-(-(n_queries + n_samples) // 1000))]
    rows = torch.cat(rows)
    return rows[:n_queries].contiguous(), rows[n_queries : n_queries + n_samples].contiguous()


def run_one(kind: str, n_queries: int, n_samples: int, device: torch.device, repeats: int) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from mia_gen.neighbours import nearest_neighbours

    queries, database = benchmark_data(kind, n_queries, n_samples)
    dim = queries.shape[1]
    q_dev, db_dev = queries.to(device), database.to(device)
    q_np, db_np = queries.numpy(), database.numpy()
    print(f"1-NN on {kind} data: {n_queries} queries x {n_samples} samples x {dim} dims, device={device}")

    backends = ("faiss", "torch") if device.type == "cpu" else ("torch",)
    candidates = {
        f"mia_gen_{backend}": (
            lambda backend=backend: nearest_neighbours(queries, database, k=1, backend=backend, device=str(device))
        )
        for backend in backends
    }

    def matmul():
        return torch.mm(q_dev, db_dev.T)

    def sklearn_brute():
        index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(db_np)
        return index.kneighbors(q_np)

    candidates.update(torch_matmul=matmul, sklearn_brute=sklearn_brute)
    timed = time_interleaved(candidates, repeats)
    _, sk_idx = timed["sklearn_brute"]["last_result"]
    agreement = {
        f"mia_gen_{b}": float((timed[f"mia_gen_{b}"]["last_result"][1][:, 0].numpy() == sk_idx[:, 0]).mean())
        for b in backends
    }
    medians = {name: entry["median_s"] for name, entry in timed.items()}
    result = {
        "data": kind,
        "shape": {"queries": n_queries, "samples": n_samples, "dim": dim},
        "seconds": {name: {"median": e["median_s"], "runs": e["runs_s"]} for name, e in timed.items()},
        "speedup_vs_sklearn": {f"mia_gen_{b}": medians["sklearn_brute"] / medians[f"mia_gen_{b}"] for b in backends},
        "ratio_to_matmul": {f"mia_gen_{b}": medians[f"mia_gen_{b}"] / medians["torch_matmul"] for b in backends},
        "same_neighbours_as_sklearn": agreement,
    }
    for b in backends:
        name = f"mia_gen_{b}"
        print(
            f"[{kind}] {name}: median {medians[name]:.2f} s vs matmul {medians['torch_matmul']:.2f} s and "
            f"sklearn {medians['sklearn_brute']:.2f} s -> {result['speedup_vs_sklearn'][name]:.2f}x faster "
            f"than sklearn (target >= 3), {result['ratio_to_matmul'][name]:.2f}x the matmul (target <= 1.5); "
            f"same neighbour as sklearn for {agreement[name]:.2%} of queries"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 queries x 20,000 samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=("both", "normal", "dcgan"), default="both")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (our search and the matmul)")
    parser.add_argument("--out", default=None, help="JSON result path (default benchmarks/results/)")
    args = parser.parse_args()

    n_queries, n_samples = (200, 20_000) if args.quick else (2000, 100_000)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "cpu" and args.device == "auto":
        device = torch.device("cpu")
    kinds = ("normal", "dcgan") if args.data == "both" else (args.data,)
    result = {
        "benchmark": "knn",
        "command": "python benchmarks/bench_knn.py" + (" --quick" if args.quick else "")
        + (f" --data {args.data}" if args.data != "both" else "")
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        "device": str(device),
        "auto_backend": "mia_gen_torch",  # mia_gen.neighbours: backend="auto" is torch on every device
        "machine": machine_info(),
        "data": {kind: run_one(kind, n_queries, n_samples, device, args.repeats) for kind in kinds},
    }
    write_result("knn_quick" if args.quick else "knn", result, args.out)


if __name__ == "__main__":
    main()
