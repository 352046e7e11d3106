"""GPU figures in one run (<= 10 minutes on one H100, start-up included), written as one JSON and a table.

A GPU machine is lent only now and then, for minutes: every question that needs one is asked here, in one
prepared script that needs nothing from a hub (every config is written out below) and little beyond torch:

1. device independence: every white-box diffusion attack (loss, PIA, PIAN, SecMI-stat, SecMI-NNs, LiRA,
   RMIA, GSA) on a `ddpm_digits`-sized DDPM (configs/model/ddpm.yaml) quickly memorising 64 digits (with
   K shadows trained the same way on the zoo's halves), and loss / PIA / PIAN / SecMI-stat / CLiD on a tiny
   Stable Diffusion pipeline + LoRA (random weights), each scored on CUDA and on the CPU with the same
   weights: largest relative difference of the scores, their rank correlation, the AUC on both;
2. GSA at the paper's size: GSA1 / GSA2 features with batched per-sample gradients against GSA's
   per-record loop and against the floor (one batched backward, no per-record split), on the
   `ddpm_cifar10` UNet (35.7M parameters, 3x32x32, random weights): the 5x target of BENCHMARKS.md (f);
3. throughput at real size: loss, SecMI-stat, PIA and CLiD records per second and peak GPU memory on
   Stable Diffusion v1.5's UNet / VAE / text-encoder configs with random weights, in float16 and float32,
   each beside the bare forward passes of the same shapes (the UNet calls the attack made, one VAE encode a
   record, the text-encoder rows);
4. `sampling.per_caption` images per second into the sample store with the same model, beside its bare
   UNet steps and VAE decodes;
and the environment (GPU, driver, torch, CUDA) beside the figures.

`--dry-run` runs every section at tiny sizes with the CPU standing in for the GPU (a test runs it, so the
script cannot rot; its figures mean nothing). The GPU machine has torch, transformers, peft, scikit-learn
and pandas but not diffusers or omegaconf: `make gpu-wheels` prepares those wheels (Python 3.12) in
`.whl/`, and `benchmarks/gpu_run.sh` installs them with the repository and runs this script.

    python benchmarks/bench_gpu.py [--dry-run] [--out PATH] [--budget-s 540] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_diffusion_attacks import bare_latent_work, counted_work, cpu_ddpm  # noqa: E402
from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402
from bench_shadow_attacks import GSA_SPEEDUP_TARGET, bench_gsa  # noqa: E402

from mia_gen.attacks import AttackContext, build_attack  # noqa: E402
from mia_gen.attacks.timesteps import forward_noise  # noqa: E402
from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.models.denoiser import Denoiser, load_denoiser  # noqa: E402
from mia_gen.models.diffusion_sampling import DiffusionSampler  # noqa: E402
from mia_gen.models.latent import LatentEncoder, TextEncoder  # noqa: E402
from mia_gen.sample_store import write_samples  # noqa: E402
from mia_gen.zoo import draw_zoo  # noqa: E402

# Stable Diffusion v1.5's published component configs (unet/, vae/, text_encoder/ config.json and its
# scheduler), written out: nothing is downloaded, the weights are random (cost does not depend on them).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# The same layout shrunk, for --dry-run (32 px images -> 4x8x8 latents).
TINY_UNET = {**SD15_UNET, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (16, 32),
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 4, "norm_num_groups": 8}
TINY_VAE = {**SD15_VAE, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 64}
TINY_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 32}
WORDS = ("a", "handwritten", "digit", "photo", "of", "the", "number")

# Sizes of a full run (one H100, <= 10 minutes with start-up) and of the CPU dry run (seconds).
SIZES = {
    "full": dict(members=64, non_members=64, population=32, train_steps=800, shadows=4, shadow_steps=400,
                 gsa_records=64, gsa_batch_sizes=[16, 64], gsa2_records=16, real_records=32, real_dtypes=["float16", "float32"],
                 sampling_images=32, sampling_steps=20, t2i_records=32, repeats=3),
    "dry": dict(members=8, non_members=8, population=4, train_steps=3, shadows=4, shadow_steps=2,
                gsa_records=2, gsa_batch_sizes=[2], gsa2_records=2, real_records=2, real_dtypes=["float32"],
                sampling_images=2, sampling_steps=2, t2i_records=8, repeats=1),
}
DDPM_ATTACKS = {"diffusion_loss": {}, "pia": {}, "pian": {}, "secmi_stat": {}, "secmi_nn": {},
                "lira": {}, "rmia": {}, "gsa": {}}
T2I_ATTACKS = {"diffusion_loss": {}, "pia": {}, "pian": {}, "secmi_stat": {}, "clid": {}}
REAL_SIZE_ATTACKS = {"diffusion_loss": {}, "secmi_stat": {}, "pia": {}, "clid": {"alpha": 0.5}}
# Dry-run settings that keep every attack's code path but cut its work.
DRY_PARAMS = {"secmi_stat": {"t_sec": 20}, "secmi_nn": {"t_sec": 20, "nn_epochs": 1},
              "gsa": {"n_timesteps": 2, "n_estimators": 5},
              "lira": {"params": {"timesteps": [100]}}, "rmia": {"params": {"timesteps": [100]}}}


def environment(device: torch.device) -> dict:
    """GPU, driver, torch and CUDA versions, beside the CPU facts of `machine_info`."""
    info = {"machine": machine_info(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    import diffusers
    info["diffusers"] = diffusers.__version__
    return info


# ---------------------------------------------------------------------------------------------- 1
def memorise(denoiser: Denoiser, x0: torch.Tensor, steps: int, seed: int) -> Denoiser:
    """Train the network on records x0 with the plain DDPM loss (Adam, lr 1e-3, batch = all records): a
    quick memoriser, so that the AUCs compared across devices show signal. Noise drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    network = denoiser.network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    x0 = x0.to(denoiser.device)
    for _ in range(steps):
        t = torch.randint(0, denoiser.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = forward_noise(x0, t.to(x0.device), noise.to(x0.device), denoiser.alphas_cumprod)
        loss = ((denoiser.epsilon(x_t, t, grad=True) - noise.to(x0.device)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    network.eval()
    return denoiser


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(scores)
    if len(set(labels[keep].tolist())) < 2:
        return None
    return float(roc_auc_score(labels[keep], scores[keep]))


def auc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def compare_scores(gpu: np.ndarray, cpu: np.ndarray, labels: np.ndarray, evaluated: np.ndarray) -> dict:
    """The largest relative difference |gpu - cpu| / |cpu| over the scored records, rank correlation, AUCs."""
    from scipy.stats import spearmanr

    both = np.isfinite(gpu) & np.isfinite(cpu)
    relative = np.abs(gpu[both] - cpu[both]) / np.maximum(np.abs(cpu[both]), 1e-30)
    rank = spearmanr(gpu[both], cpu[both]).statistic if both.sum() > 2 and np.ptp(cpu[both]) > 0 else None
    return {"max_relative_difference": float(relative.max()) if both.any() else None,
            "max_abs_difference": float(np.abs(gpu[both] - cpu[both]).max()) if both.any() else None,
            "spearman": None if rank is None else float(rank),
            "auc_gpu": auc(gpu[evaluated], labels[evaluated]), "auc_cpu": auc(cpu[evaluated], labels[evaluated]),
            "scored": int(both.sum()), "records": len(cpu)}


class World:
    """Queries, their labels and what each attack may see, on one device (mirrors the pipeline's views)."""

    def __init__(self, queries, labels, denoiser, shadows=(), membership=None, population=None, captions=None):
        self.queries, self.labels, self.denoiser = queries, labels, denoiser
        self.shadows, self.membership, self.population, self.captions = list(shadows), membership, population, captions
        self.ids = np.arange(len(queries))
        # a labelled 20% per class (member / non-member), the rest evaluated
        rng = np.random.default_rng(0)
        self.labelled = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c),
                                                           max(1, int(0.2 * (labels == c).sum())), replace=False)
                                                for c in (0, 1)]))

    def view(self, denoiser, device) -> AttackContext:
        context = AttackContext(queries=self.queries, record_ids=self.ids, denoiser=denoiser, device=device, seed=0)
        if self.captions is not None:
            context.captions = list(self.captions)
            context.conditions = denoiser.text_conditions(self.captions)
        return context

    def context(self, attack, device, models) -> AttackContext:
        target, shadows = models
        context = self.view(target, device)
        if attack.needs_labelled_subset:
            context.labelled_subset = (self.labelled, self.labels[self.labelled])
        if attack.needs_shadow_models:
            context.shadow_models = [self.view(s, device) for s in shadows]
            context.shadow_membership = self.membership
            context.shadow_indices = list(range(len(shadows)))
            if attack.needs_population:
                pop_ids = np.arange(len(self.population)) + 10_000
                for view, model in [(context, target), *zip(context.shadow_models, shadows)]:
                    view.population = AttackContext(queries=self.population, record_ids=pop_ids, denoiser=model,
                                                    device=device, seed=0)
        return context

    def evaluated(self, attack) -> np.ndarray:
        mask = np.ones(len(self.queries), dtype=bool)
        if attack.needs_labelled_subset:
            mask[self.labelled] = False
        return mask


def score_on_both(world: World, attacks: dict, gpu_models, cpu_models, gpu: torch.device, dry: bool) -> dict:
    rows = {}
    for name, params in attacks.items():
        params = {**params, **(DRY_PARAMS.get(name, {}) if dry else {})}
        attack = build_attack(name, params)
        start = time.perf_counter()
        on_gpu = np.asarray(attack(world.context(attack, gpu, gpu_models)).scores, dtype=np.float64)
        gpu_s = time.perf_counter() - start
        start = time.perf_counter()
        on_cpu = np.asarray(attack(world.context(attack, torch.device("cpu"), cpu_models)).scores, dtype=np.float64)
        cpu_s = time.perf_counter() - start
        rows[name] = {**compare_scores(on_gpu, on_cpu, world.labels, world.evaluated(attack)),
                      "gpu_s": gpu_s, "cpu_s": cpu_s, "params": params}
        print(f"  [{name}] max rel diff {rows[name]['max_relative_difference']:.2e}, AUC gpu "
              f"{auc_text(rows[name]['auc_gpu'])} cpu {auc_text(rows[name]['auc_cpu'])} ({gpu_s:.1f} s / {cpu_s:.1f} s)",
              flush=True)
    return rows


def device_independence(gpu: torch.device, sizes: dict, dry: bool) -> dict:
    """Section 1: the same weights scored on `gpu` and on the CPU."""
    records = load_dataset({"name": "digits", "resolution": 16, "channels": 1})
    n_m, n_n, n_p = sizes["members"], sizes["non_members"], sizes["population"]
    queries = records.get(np.arange(n_m + n_n))
    population = records.get(np.arange(n_m + n_n, n_m + n_n + n_p))
    labels = np.r_[np.ones(n_m, dtype=int), np.zeros(n_n, dtype=int)]
    target = memorise(cpu_ddpm(gpu), queries[:n_m], sizes["train_steps"], seed=0)
    membership = draw_zoo(records, np.arange(n_m + n_n), sizes["shadows"], seed=0).membership
    shadows = [memorise(cpu_ddpm(gpu), queries[torch.as_tensor(np.flatnonzero(row))], sizes["shadow_steps"], seed=k + 1)
               for k, row in enumerate(membership)]
    to_cpu = lambda model: copy.deepcopy(model).to("cpu").eval()  # noqa: E731
    world = World(queries, labels, target, shadows, membership, population)
    print(f"device independence, DDPM digits: {n_m} members + {n_n} non-members, {len(shadows)} shadows", flush=True)
    ddpm = score_on_both(world, DDPM_ATTACKS, (target, shadows), (to_cpu(target), [to_cpu(s) for s in shadows]),
                         gpu, dry)

    from tiny_pipelines import tiny_lora, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_sd_pipeline(Path(tmp) / "sd")
        lora = tiny_lora(Path(tmp) / "lora", base)
        on_gpu = load_denoiser({"lora": str(lora)}, base, gpu)
        on_cpu = load_denoiser({"lora": str(lora)}, base, "cpu")
    text_records = load_dataset({"name": "digits", "resolution": 16, "channels": 3, "captions": True})
    ids = np.arange(sizes["t2i_records"])
    half = len(ids) // 2
    t2i_labels = np.r_[np.ones(half, dtype=int), np.zeros(len(ids) - half, dtype=int)]
    t2i = World(text_records.get(ids), t2i_labels, on_gpu, captions=text_records.captions(ids))
    print(f"device independence, tiny SD + LoRA (random weights: AUC is chance): {len(ids)} captioned records",
          flush=True)
    sd = score_on_both(t2i, T2I_ATTACKS, (on_gpu, []), (on_cpu, []), gpu, dry)
    return {"ddpm_digits": {"members": n_m, "non_members": n_n, "shadows": len(shadows),
                            "train_steps": sizes["train_steps"], "attacks": ddpm},
            "tiny_sd_lora": {"records": len(ids), "attacks": sd}}


# ---------------------------------------------------------------------------------------------- 2
def cifar10_ddpm(device: torch.device) -> Denoiser:
    """The `ddpm_cifar10` UNet (configs/model/ddpm_cifar10.yaml at 3x32x32) with random weights."""
    import yaml
    from diffusers import DDPMScheduler, UNet2DModel

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/model/ddpm_cifar10.yaml").read_text())
    unet = {k: (32 if v == "${data.resolution}" else 3 if v == "${data.channels}" else v)
            for k, v in config["unet"].items()}
    torch.manual_seed(0)
    network = UNet2DModel(**unet)
    return Denoiser.from_unet(network, DDPMScheduler(**config["betas"])).to(device).eval()


def gsa_at_size(gpu: torch.device, sizes: dict, dry: bool) -> dict:
    """Section 2: bench_shadow_attacks' GSA comparison on the CIFAR-10 DDPM (the tiny DDPM in a dry run)."""
    denoiser = cpu_ddpm(gpu) if dry else cifar10_ddpm(gpu)
    resolution, channels = denoiser.sample_shape[1], denoiser.sample_shape[0]
    records = load_dataset({"name": "digits", "resolution": resolution, "channels": channels})
    parameters = sum(p.numel() for p in denoiser.parameters())
    print(f"GSA on {'the tiny DDPM (dry run)' if dry else 'the ddpm_cifar10 UNet'}: {parameters:,} parameters",
          flush=True)
    k = 2 if dry else None  # None: the attack's default timesteps
    result = {"model": "ddpm_digits (dry run)" if dry else "ddpm_cifar10", "parameters": parameters,
              "gsa1": bench_gsa(denoiser, records, sizes["gsa_records"], sizes["gsa_batch_sizes"], "gsa1",
                                sizes["repeats"], gpu, floor=True, n_timesteps=k),
              "gsa2": bench_gsa(denoiser, records, sizes["gsa2_records"], [sizes["gsa2_records"]], "gsa2",
                                sizes["repeats"], gpu, floor=False, n_timesteps=k)}
    best = result["gsa1"]["rows"][result["gsa1"]["best"]]
    floor = next((row for name, row in result["gsa1"]["rows"].items() if name.startswith("floor")), None)
    result["target"] = {"speedup_target": GSA_SPEEDUP_TARGET, "best_speedup": best["speedup_vs_loop"],
                        "floor_speedup": None if floor is None else floor["speedup_vs_loop"],
                        "met": best["speedup_vs_loop"] >= GSA_SPEEDUP_TARGET}
    return result


# ---------------------------------------------------------------------------------------------- 3 and 4
def real_size_model(device: torch.device, dry: bool, directory: Path) -> Denoiser:
    """Stable Diffusion v1.5's components (random weights) behind a `Denoiser`, float32 on `device`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mia_gen.models.ldm import write_clip_vocabulary

    unet_cfg, vae_cfg, text_cfg = (TINY_UNET, TINY_VAE, TINY_TEXT) if dry else (SD15_UNET, SD15_VAE, SD15_TEXT)
    vocab, merges = write_clip_vocabulary(directory, WORDS)
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=text_cfg["max_position_embeddings"])
    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn where they run: seconds, not minutes, at 860M
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return Denoiser.from_unet(unet.eval(), DDPMScheduler(**SD15_SCHEDULE), latent=LatentEncoder(vae.eval()),
                              text=TextEncoder(tokenizer, text.eval())).to(device).eval()


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def throughput(denoiser: Denoiser, gpu: torch.device, sizes: dict, dry: bool) -> dict:
    """Section 3: records per second of each attack beside the bare forward passes of the same shapes."""
    n = sizes["real_records"]
    c, h, w = denoiser.image_shape
    queries = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = np.arange(n)
    captions = [f"a handwritten digit {i % 10}" for i in ids]
    rows = {}
    for name, params in REAL_SIZE_ATTACKS.items():
        params = {**params, **(DRY_PARAMS.get(name, {}) if dry else {})}

        def run(attack=build_attack(name, params)):
            context = AttackContext(queries=queries, record_ids=ids, denoiser=denoiser, device=gpu, seed=0,
                                    captions=captions, conditions=denoiser.text_conditions(captions))
            return attack(context)

        with counted_work(denoiser) as counts:  # untimed: counts the work, warms up
            run()
        unet_calls = counts["unet"]
        bare = bare_latent_work(denoiser, counts, queries, captions, gpu)
        reset_peak(gpu)
        timed = time_interleaved({name: run, "bare": bare}, sizes["repeats"])
        attack_s, bare_s = timed[name]["median_s"], timed["bare"]["median_s"]
        rows[name] = {"records_per_s": n / attack_s, "bare_records_per_s": n / bare_s, "ratio": attack_s / bare_s,
                      "unet_rows_per_record": sum(unet_calls) / n, "unet_call_rows": sorted(set(unet_calls)),
                      "peak_gpu_memory_gib": peak_memory(gpu), "params": params}
        print(f"  [{name}] {n / attack_s:.2f} records/s, bare {n / bare_s:.2f} -> {attack_s / bare_s:.3f}x, "
              f"peak {rows[name]['peak_gpu_memory_gib']} GiB", flush=True)
    return rows


def sampling_throughput(denoiser: Denoiser, gpu: torch.device, sizes: dict) -> dict:
    """Section 4: `sampling.per_caption` images per second into the sample store, beside the bare work (the
    same UNet steps and one VAE decode an image)."""
    n, steps = sizes["sampling_images"], sizes["sampling_steps"]
    sampler = DiffusionSampler(denoiser, "ddim", steps=steps)
    captions = [f"a handwritten digit {i % 10}" for i in range(n)]
    latents = torch.randn(n, *denoiser.sample_shape, device=gpu)
    embeddings = denoiser.text_conditions(captions)

    @torch.no_grad()
    def sample_fn(count, rng, shard_captions):
        z = sampler.sample_latent(count, rng)
        return sampler(z, denoiser.text_conditions(shard_captions)).float().cpu(), z

    def bare():
        for t in sampler.timesteps:
            denoiser.epsilon(latents, torch.full((n,), t, dtype=torch.long, device=gpu), embeddings)
        denoiser.to_images(latents)

    def into_store():
        with tempfile.TemporaryDirectory() as tmp:
            write_samples(Path(tmp) / "store", sample_fn, n, shard_size=n, seed=0, storage_dtype="uint8",
                          progress=False, captions=captions)

    reset_peak(gpu)
    timed = time_interleaved({"sample_store": into_store, "bare": bare}, sizes["repeats"])
    store_s, bare_s = timed["sample_store"]["median_s"], timed["bare"]["median_s"]
    return {"images": n, "ddim_steps": steps, "images_per_s": n / store_s, "bare_images_per_s": n / bare_s,
            "ratio": store_s / bare_s, "peak_gpu_memory_gib": peak_memory(gpu)}


def real_size(gpu: torch.device, sizes: dict, dry: bool) -> dict:
    """Sections 3 and 4 in each dtype (float32 first, then the same weights in float16)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        denoiser = real_size_model(gpu, dry, Path(tmp))
    out["parameters"] = {name: sum(p.numel() for p in module.parameters()) for name, module in (
        ("unet", denoiser.network), ("vae", denoiser.latent.vae), ("text_encoder", denoiser.text.text_encoder))}
    out["image_shape"], out["sample_shape"] = list(denoiser.image_shape), list(denoiser.sample_shape)
    out["rows_per_call"] = denoiser.rows_per_call
    for dtype in sorted(sizes["real_dtypes"], key=lambda d: d != "float32"):
        denoiser.to(dtype=getattr(torch, dtype))
        print(f"real size ({'tiny stand-in' if dry else 'SD v1.5 configs'}), {dtype}", flush=True)
        out[dtype] = {"attacks": throughput(denoiser, gpu, sizes, dry),
                      "per_caption_sampling": sampling_throughput(denoiser, gpu, sizes)}
    return out


# ---------------------------------------------------------------------------------------------- table
def table(result: dict) -> str:
    lines = ["| section | case | figure |", "| --- | --- | --- |"]
    for model, part in result.get("device_independence", {}).items():
        for name, row in part["attacks"].items():
            lines.append(f"| CUDA vs CPU | {model} {name} | max rel diff {row['max_relative_difference']:.1e}, "
                         f"AUC {auc_text(row['auc_gpu'])} (GPU) / {auc_text(row['auc_cpu'])} (CPU) |")
    gsa = result.get("gsa")
    if gsa:
        for variant in ("gsa1", "gsa2"):
            for name, row in gsa[variant]["rows"].items():
                lines.append(f"| GSA {gsa['model']} | {variant} {name} | {row['ms_per_record']:.2f} ms/record, "
                             f"{row['speedup_vs_loop']:.2f}x the loop |")
    for dtype, part in result.get("real_size", {}).items():
        if not isinstance(part, dict) or "attacks" not in part:
            continue
        for name, row in part["attacks"].items():
            lines.append(f"| real size {dtype} | {name} | {row['records_per_s']:.2f} records/s (bare "
                         f"{row['bare_records_per_s']:.2f}, {row['ratio']:.2f}x), peak {row['peak_gpu_memory_gib']} GiB |")
        s = part["per_caption_sampling"]
        lines.append(f"| real size {dtype} | per_caption sampling | {s['images_per_s']:.2f} images/s (bare "
                     f"{s['bare_images_per_s']:.2f}, {s['ratio']:.2f}x) |")
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped | {reason} |")
    return "\n".join(lines)


SECTIONS = {"gsa": gsa_at_size, "device_independence": device_independence, "real_size": real_size}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, the CPU standing in for the GPU")
    parser.add_argument("--out", default=None, help="the JSON (default benchmarks/results/gpu[_dry_run].json)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip a section that starts after this many seconds (its reason is recorded)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [section for section in sections if section not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench_gpu.py: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}.")
    started = time.perf_counter()
    sizes = dict(SIZES["dry" if args.dry_run else "full"])
    if args.repeats:
        sizes["repeats"] = args.repeats
    if args.dry_run:
        gpu = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device; run it on a GPU machine, or with --dry-run here.")
    else:
        gpu = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the CPU comparison is of float32 against float32
        torch.backends.cudnn.allow_tf32 = False
    name = "gpu_dry_run" if args.dry_run else "gpu"
    result = {"dry_run": args.dry_run, "sizes": sizes, "environment": environment(gpu), "skipped": {}}
    print(json.dumps(result["environment"], default=str), flush=True)
    for section in sections:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            result["skipped"][section] = f"out of time ({elapsed:.0f} s > --budget-s {args.budget_s:.0f})"
            continue
        start = time.perf_counter()
        result[section] = SECTIONS[section](gpu, sizes, args.dry_run)
        result[section + "_s"] = time.perf_counter() - start
        write_result(name, result, args.out)  # after every section: a time-out keeps what finished
    result["total_s"] = time.perf_counter() - started
    result["table"] = table(result)
    print(result["table"])
    write_result(name, result, args.out)
    return result


if __name__ == "__main__":
    main()
