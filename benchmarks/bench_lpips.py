"""Benchmark (b): exact LPIPS nearest neighbours via the embedding vs pairwise `lpips` calls.

200 query images vs 2,000 images (1 x 16 x 16, resized to 64 px, AlexNet). Ours: embed every
image once (`LPIPSEmbedding`), then `nearest_neighbours` on the embeddings. Baseline: for each
query, the real `lpips.LPIPS` on (query, image) for all 2,000 images, then argmin (what GAN-Leaks
style code does). Target: identical neighbours, >= 20x faster.

The baseline costs 2 x 2,000 network passes per query, so on a small CPU it is timed on the
first `--baseline-queries` queries and scaled linearly to all queries (its cost is exactly
linear in the number of queries); neighbours are compared on those queries.
Without the torchvision AlexNet file in the torch hub cache a seeded random backbone is used
(fine for timing: same network shape and cost; the JSON records which).

    python benchmarks/bench_lpips.py                       # 200 x 2,000, baseline on 5 queries
    python benchmarks/bench_lpips.py --baseline-queries 200
    python benchmarks/bench_lpips.py --quick               # 20 x 200, baseline on 2 queries
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402


def main() -> None:
    from mia_gen.lpips_embedding import LPIPSEmbedding, lpips_pairwise
    from mia_gen.neighbours import nearest_neighbours

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 queries x 200 images")
    parser.add_argument("--baseline-queries", type=int, default=None, help="queries timed with pairwise lpips")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of our (fast) method")
    parser.add_argument("--net", default="alex")
    parser.add_argument("--resize", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    n_queries, n_images = (20, 200) if args.quick else (200, 2000)
    n_baseline = args.baseline_queries or (2 if args.quick else 5)
    n_baseline = min(n_baseline, n_queries)
    gen = torch.Generator().manual_seed(0)
    queries = torch.rand(n_queries, 1, 16, 16, generator=gen) * 2 - 1
    images = torch.rand(n_images, 1, 16, 16, generator=gen) * 2 - 1
    logging.getLogger("mia_gen.lpips_embedding").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="LPIPS.*RANDOM backbone")
    embed = LPIPSEmbedding(args.net, resize=args.resize, allow_random_backbone=True, device=args.device)
    lpips_pairwise(queries[:1], images[:2], args.net, args.resize, True, args.device)  # warm-up
    print(f"LPIPS-{args.net} 1-NN: {n_queries} queries x {n_images} images, backbone={embed.backbone}")

    def ours():
        return nearest_neighbours(queries, images, k=1, feature_fn=embed, chunk_size=1024, device=args.device)

    def pairwise():
        distances = torch.stack(
            [lpips_pairwise(q[None], images, args.net, args.resize, True, args.device) for q in queries[:n_baseline]]
        )
        return distances.min(1)

    timed = time_interleaved({"embedding_knn": ours}, args.repeats)
    print(f"  pairwise lpips on {n_baseline} queries ...", flush=True)
    start = time.perf_counter()
    best_d, best_i = pairwise()
    baseline_s = time.perf_counter() - start
    baseline_all = baseline_s * n_queries / n_baseline
    our_d, our_i = timed["embedding_knn"]["last_result"]
    same = bool(torch.equal(our_i[:n_baseline, 0], best_i))
    max_rel = float(((our_d[:n_baseline, 0] - best_d).abs() / best_d).max())
    ours_s = timed["embedding_knn"]["median_s"]
    result = {
        "benchmark": "lpips_knn",
        "command": "python benchmarks/bench_lpips.py" + (" --quick" if args.quick else "")
        + (f" --baseline-queries {args.baseline_queries}" if args.baseline_queries else ""),
        "shape": {"queries": n_queries, "images": n_images, "image": [1, 16, 16], "resize": args.resize},
        "net": args.net,
        "backbone": embed.backbone,
        "device": args.device,
        "machine": machine_info(),
        "seconds": {
            "embedding_knn": {"median": ours_s, "runs": timed["embedding_knn"]["runs_s"]},
            "pairwise_lpips_measured": {"queries": n_baseline, "seconds": baseline_s},
            "pairwise_lpips_all_queries_extrapolated": baseline_all,
        },
        "speedup": baseline_all / ours_s,
        "identical_neighbours_on_baseline_queries": same,
        "max_relative_distance_difference": max_rel,
    }
    print(
        f"embedding kNN {ours_s:.2f} s (median) vs pairwise lpips {baseline_s:.1f} s for {n_baseline} "
        f"queries -> {baseline_all:.0f} s for {n_queries} -> {result['speedup']:.0f}x faster (target >= 20); "
        f"identical neighbours: {same}; max relative distance difference {max_rel:.1e}"
    )
    write_result("lpips_quick" if args.quick else "lpips", result, args.out)


if __name__ == "__main__":
    main()
