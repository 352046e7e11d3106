"""benchmarks/bench_gpu.py, the prepared GPU figures, as a CPU dry run at tiny sizes: every section's code runs
here, so the script is ready whenever a GPU machine is lent (its figures are only read off a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_gpu  # noqa: E402

from mia_gen.models.denoiser import MICRO_BATCH  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    returned = bench_gpu.main(["--dry-run", "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_the_dry_run_writes_every_section(dry_run):
    returned, written = dry_run
    assert written["dry_run"] is True and not written["skipped"]
    for section in bench_gpu.SECTIONS:
        assert section in written and written[section + "_s"] > 0
    assert written["table"] == returned["table"]
    environment = written["environment"]
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"


def test_device_independence_scores_every_attack_on_both_devices(dry_run):
    _, written = dry_run
    part = written["device_independence"]
    assert set(part["ddpm_digits"]["attacks"]) == set(bench_gpu.DDPM_ATTACKS)
    assert set(part["tiny_sd_lora"]["attacks"]) == set(bench_gpu.T2I_ATTACKS)
    for model in ("ddpm_digits", "tiny_sd_lora"):
        for name, row in part[model]["attacks"].items():
            # the CPU stands in for the GPU: the same weights on the same device give the same scores
            assert row["max_relative_difference"] == 0.0, (model, name)
            assert row["scored"] == row["records"], (model, name)
            assert row["auc_gpu"] == row["auc_cpu"] and 0.0 <= row["auc_cpu"] <= 1.0, (model, name)
            assert f"| CUDA vs CPU | {model} {name} |" in written["table"]


def test_gsa_section_compares_batched_features_with_the_loop_and_the_floor(dry_run):
    _, written = dry_run
    gsa = written["gsa"]
    rows = gsa["gsa1"]["rows"]
    assert {"loop", "batched_2"} <= set(rows) and any(name.startswith("floor") for name in rows)
    assert rows["batched_2"]["max_relative_difference"] <= 1e-4  # the same features as GSA's per-record loop
    assert gsa["gsa2"]["rows"]["batched_2"]["max_relative_difference"] <= 1e-4
    assert gsa["target"]["speedup_target"] == bench_gpu.GSA_SPEEDUP_TARGET
    assert gsa["target"]["best_speedup"] == rows[gsa["gsa1"]["best"]]["speedup_vs_loop"]


def test_real_size_throughput_sits_beside_its_bare_forward_passes(dry_run):
    _, written = dry_run
    part = written["real_size"]
    assert part["parameters"]["unet"] > 0 and part["rows_per_call"] == MICRO_BATCH["cpu"]
    figures = part["float32"]
    assert set(figures["attacks"]) == set(bench_gpu.REAL_SIZE_ATTACKS)
    for row in figures["attacks"].values():
        assert row["records_per_s"] > 0 and row["bare_records_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["bare_records_per_s"] / row["records_per_s"])
        assert row["unet_call_rows"] == [MICRO_BATCH["cpu"]]  # every UNet call of one shape (rows_per_call)
    sampling = figures["per_caption_sampling"]
    assert sampling["images"] == bench_gpu.SIZES["dry"]["sampling_images"] and sampling["images_per_s"] > 0


def test_the_real_size_configs_are_stable_diffusion_v1_5s():
    """The published SD v1.5 component configs, as written out (860M-parameter UNet, 4x64x64 latents)."""
    unet, vae, text = bench_gpu.SD15_UNET, bench_gpu.SD15_VAE, bench_gpu.SD15_TEXT
    assert unet["block_out_channels"] == (320, 640, 1280, 1280) and unet["cross_attention_dim"] == 768
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == vae["sample_size"] == 512
    assert vae["scaling_factor"] == 0.18215 and text["hidden_size"] == unet["cross_attention_dim"]
    assert text["max_position_embeddings"] == 77 and text["vocab_size"] == 49408


def test_a_spent_budget_skips_sections_and_says_why(tmp_path):
    result = bench_gpu.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path / "gpu.json")])
    assert set(result["skipped"]) == set(bench_gpu.SECTIONS)
    assert all("out of time" in reason for reason in result["skipped"].values())
    with pytest.raises(SystemExit, match="unknown section"):
        bench_gpu.main(["--dry-run", "--sections", "nothing", "--out", str(tmp_path / "gpu.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_full_run_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(SystemExit, match="--dry-run"):
        bench_gpu.main(["--out", str(tmp_path / "gpu.json")])
