"""Benchmark (a): exact 1-NN search, mia-gen `nearest_neighbours` vs one bare matmul vs sklearn brute force.

Full size: 2,000 queries vs 100,000 samples of 3,072 dims (float32), on two kinds of data:
- "normal": i.i.d. standard normal entries (no structure: no exact pruning can help);
- "dcgan": 3x32x32 images from `mia_gen.models.dcgan.DCGANGenerator(latent_dim=32, resolution=32,
  channels=3, base_channels=16)` with random (seeded, DCGAN-initialised) weights, in train mode
  (BatchNorm on batch statistics, batches of 1,000 latents; in eval mode the untrained network
  outputs ~0), samples and queries from different N(0, 1) latents. Values in about [-0.7, 0.7].
Timed, interleaved, in one run: the default backend (`backend="auto"`), the torch backend, the faiss
backend (when faiss-cpu is installed), one bare torch matmul of the same shape (Q x D @ D x N, its
output freshly allocated), and sklearn `NearestNeighbors(algorithm="brute")` fit + kneighbors.
Targets, for the default backend on every data kind: <= 1.3x the bare matmul, >= 2x faster than
sklearn, and the same nearest neighbour as sklearn for every query. Prints PASS / FAIL per target
and exits 1 if any fails. The top of the output names the CPU model and each BLAS with the core
type it detected (threadpoolctl), since that decides which backend is fast here.

    python benchmarks/bench_knn.py            # full size, both data kinds, 3 repeats, median
    python benchmarks/bench_knn.py --quick    # 1,000 x 20,000, for development
    python benchmarks/bench_knn.py --data dcgan

Also holds the small timing helpers the other benchmark scripts import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch


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
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "blas": blas_info(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss_version,
        "faiss_threads": faiss_threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def blas_info() -> list[dict]:
    """Each BLAS loaded in this process (threadpoolctl): library, version, detected core type, threads.

    torch's own MKL is linked statically and does not show here; `torch_cpu_capability` stands for it.
    """
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
    return [{key: lib.get(key) for key in keys} for lib in threadpool_info() if lib.get("user_api") == "blas"]


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


MATMUL_TARGET = 1.3  # the default backend's time / one bare matmul's, at most
SKLEARN_TARGET = 2.0  # sklearn brute force's time / the default backend's, at least


def run_one(kind: str, n_queries: int, n_samples: int, device: torch.device, repeats: int) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from mia_gen.extras import available
    from mia_gen.neighbours import nearest_neighbours

    queries, database = benchmark_data(kind, n_queries, n_samples)
    dim = queries.shape[1]
    q_dev, db_dev = queries.to(device), database.to(device)
    q_np, db_np = queries.numpy(), database.numpy()
    print(f"\n1-NN on {kind} data: {n_queries} queries x {n_samples} samples x {dim} dims, device={device}")

    backends = ("auto", "torch") + (("faiss",) if device.type == "cpu" and available("faiss") else ())
    candidates: dict[str, Callable[[], object]] = {
        backend: lambda backend=backend: nearest_neighbours(queries, database, k=1, backend=backend, device=str(device))
        for backend in backends
    }
    candidates["matmul"] = lambda: torch.mm(q_dev, db_dev.T)
    candidates["sklearn"] = lambda: NearestNeighbors(n_neighbors=1, algorithm="brute").fit(db_np).kneighbors(q_np)
    timed = time_interleaved(candidates, repeats)
    medians = {name: entry["median_s"] for name, entry in timed.items()}
    sk_idx = timed["sklearn"]["last_result"][1][:, 0]
    differing = {b: np.flatnonzero(timed[b]["last_result"][1][:, 0].numpy() != sk_idx) for b in backends}
    result = {
        "data": kind,
        "shape": {"queries": n_queries, "samples": n_samples, "dim": dim},
        "seconds": {name: {"median": e["median_s"], "runs": e["runs_s"]} for name, e in timed.items()},
        "ratio_to_matmul": {b: medians[b] / medians["matmul"] for b in backends},
        "speedup_vs_sklearn": {b: medians["sklearn"] / medians[b] for b in backends},
        "queries_with_other_neighbour_than_sklearn": {b: int(len(d)) for b, d in differing.items()},
    }
    for b in backends:
        print(
            f"[{kind}] backend={b}: median {medians[b]:.3f} s = {result['ratio_to_matmul'][b]:.2f}x the matmul "
            f"({medians['matmul']:.3f} s), {result['speedup_vs_sklearn'][b]:.2f}x faster than sklearn "
            f"({medians['sklearn']:.3f} s); other neighbour than sklearn for {len(differing[b])} of {n_queries} queries"
        )
        for row in differing[b][:5]:  # say whether a difference is a tie in exact float64 distance
            pair = database[[int(sk_idx[row]), int(timed[b]["last_result"][1][row, 0])]].double()
            exact = ((pair - queries[row].double()) ** 2).sum(1)
            print(f"    query {row}: sklearn's {sk_idx[row]} at {exact[0]:.9g}, {b}'s at {exact[1]:.9g} (float64)")
    result["targets"] = {
        f"default <= {MATMUL_TARGET}x matmul": result["ratio_to_matmul"]["auto"] <= MATMUL_TARGET,
        f"default >= {SKLEARN_TARGET}x faster than sklearn": result["speedup_vs_sklearn"]["auto"] >= SKLEARN_TARGET,
        "default: same neighbours as sklearn for every query": len(differing["auto"]) == 0,
    }
    return result


def print_machine(info: dict) -> None:
    print(f"CPU: {info['cpu']} ({info['cpu_count']} logical CPUs, load average {info['load_average_at_start']})")
    print(f"torch {info['torch']}: {info['torch_blas']}, CPU capability {info['torch_cpu_capability']}, "
          f"{info['torch_threads']} threads")
    for lib in info["blas"]:
        print(f"BLAS {lib['internal_api']} {lib['version']}: detected core type {lib['architecture']}, "
              f"{lib['num_threads']} threads ({lib['filepath']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 queries x 20,000 samples")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", choices=("both", "normal", "dcgan"), default="both")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (our search and the matmul)")
    parser.add_argument("--out", default=None, help="JSON result path (default benchmarks/results/)")
    args = parser.parse_args()

    import sklearn.neighbors  # noqa: F401  (loads scipy's BLAS, so machine_info lists every BLAS; it imports faiss)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("mia_gen").setLevel(logging.INFO)  # the line saying which backend ran and why
    n_queries, n_samples = (1000, 20_000) if args.quick else (2000, 100_000)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    info = machine_info()
    print_machine(info)
    kinds = ("normal", "dcgan") if args.data == "both" else (args.data,)
    result = {
        "benchmark": "knn",
        "command": "python benchmarks/bench_knn.py" + (" --quick" if args.quick else "")
        + (f" --data {args.data}" if args.data != "both" else "")
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        "device": str(device),
        "machine": info,
        "data": {kind: run_one(kind, n_queries, n_samples, device, args.repeats) for kind in kinds},
    }
    write_result("knn_quick" if args.quick else "knn", result, args.out)
    print()
    failed = 0
    for kind, entry in result["data"].items():
        for target, ok in entry["targets"].items():
            print(f"{'PASS' if ok else 'FAIL'} [{kind}] {target}")
            failed += not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
