"""White-box diffusion attacks: time per record against the same number of bare model forwards.

Each attack is timed on N digit records with the CPU-sized DDPM of `configs/model/ddpm.yaml`
(random weights: the cost of a forward pass does not depend on training). Its baseline, timed in
the same run and interleaved with it, is exactly the model calls the attack made
(`info["model_calls_made_per_record"]` x N) as bare `Denoiser.epsilon` calls on random inputs at
the attack's batch size. N defaults to that batch size (256), so every call of the attack is a full
batch too. Overhead = attack / baseline - 1 (target: at most 15%).

`--latent`: the latent, text-conditioned case. A Stable Diffusion pipeline with random weights (32 px RGB
records -> 4x16x16 VAE latents, a `UNet2DConditionModel` with cross-attention, a 2-layer `CLIPTextModel`),
saved with `save_pretrained` and loaded with `load_denoiser`; N digit records captioned "a handwritten digit k";
`diffusion_loss`, `secmi_stat`, `pia`, `pian` and `clid` at their defaults (CLiD with a given alpha). Timed:
what the pipeline does, embed the captions (`Denoiser.text_conditions`) and run the attack. Baseline, the
bare cost of that work: the UNet calls the attack made (as many, each with as many rows) as
`Denoiser.epsilon` calls on random latents with precomputed text embeddings, plus one VAE encode per record
(`Denoiser.to_x0` of the N records), plus one text-encoder row per caption string the attack embedded (the N
captions; CLiD's weakened captions too). Counts come from hooks on the networks during an untimed first run.

    python benchmarks/bench_diffusion_attacks.py [--quick] [--records 256] [--repeats 3] [--device cpu|cuda]
    python benchmarks/bench_diffusion_attacks.py --latent [--records 128] [--threads 1] [--repeats 3]

`--rows-per-call`: the cost of calling the network on batches of one fixed shape (`Denoiser.micro_batch`, which
makes a record's prediction independent of its batch on any CPU): `Denoiser.epsilon` on N random 1x16x16
inputs at each `--micro-batches` size, against the bare network called once on all N (what `epsilon` did
before), with the CPU-sized DDPM. Reported: ms per image and the ratio to the bare call.

    python benchmarks/bench_diffusion_attacks.py --rows-per-call [--records 256] [--micro-batches 16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf


from bench_knn import machine_info, time_interleaved, write_result  # noqa: E402

from mia_gen.attacks import AttackContext, build_attack  # noqa: E402
from mia_gen.datasets import load_dataset  # noqa: E402
from mia_gen.device import resolve_device  # noqa: E402
from mia_gen.models.ddpm import build_scheduler, build_unet  # noqa: E402
from mia_gen.models.denoiser import Denoiser, load_denoiser  # noqa: E402

ATTACKS = ("diffusion_loss", "secmi_stat", "pia", "pian")
LATENT_ATTACKS = {"diffusion_loss": {}, "secmi_stat": {}, "pia": {}, "pian": {}, "clid": {"alpha": 0.5}}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "ddpm.yaml"
TESTS = Path(__file__).resolve().parents[1] / "tests"
LATENT_RESOLUTION, TEXT_WIDTH = 32, 64


def cpu_ddpm(device: torch.device) -> Denoiser:
    # The model config's interpolations point into the root config; give them the digits' values.
    root = OmegaConf.create({"model": OmegaConf.load(CONFIG), "data": {"resolution": 16, "channels": 1},
                             "seed": 0})
    model_cfg = root.model
    torch.manual_seed(0)
    unet = build_unet(model_cfg.unet)
    return Denoiser.from_unet(unet, build_scheduler(model_cfg)).to(device).eval()


def latent_sd_pipeline(directory: Path) -> Path:
    """A `StableDiffusionPipeline` directory with random weights, larger than the tests' `tiny_sd_pipeline`
    (whose tokenizer, scheduler and layout it keeps): 32 px RGB -> 4x16x16 latents (VAE blocks (16, 32)),
    a cross-attention UNet with blocks (32, 64), a 2-layer CLIPTextModel of width 64 (16 tokens)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(TESTS))
    from tiny_pipelines import tiny_sd_pipeline

    tiny_sd_pipeline(directory)  # then replace its networks, same classes
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), subfolder="tokenizer")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        norm_num_groups=8, sample_size=LATENT_RESOLUTION, scaling_factor=0.18215,
    ).save_pretrained(str(directory / "vae"))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(str(directory / "text_encoder"))
    UNet2DConditionModel(
        sample_size=LATENT_RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=4, cross_attention_dim=TEXT_WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(str(directory / "unet"))
    return directory


@contextmanager
def counted_work(denoiser: Denoiser):
    """Counts what runs inside: `unet` (rows of each UNet call), `vae_rows` / `text_rows` (rows through the VAE
    encoder / text encoder, padding included) and `captions` (the strings handed to the text encoder)."""
    counts = {"unet": [], "vae_rows": 0, "text_rows": 0, "captions": []}

    def add(key):
        def hook(module, args, kwargs):
            rows = len((args or list(kwargs.values()))[0])
            if key == "unet":
                counts["unet"].append(rows)
            else:
                counts[key] += rows
        return hook

    handles = [denoiser.network.register_forward_pre_hook(add("unet"), with_kwargs=True),
               denoiser.latent.vae.encoder.register_forward_pre_hook(add("vae_rows"), with_kwargs=True),
               denoiser.text.text_encoder.register_forward_pre_hook(add("text_rows"), with_kwargs=True)]
    encode = denoiser.text.encode

    def counting_encode(captions):
        counts["captions"].extend(captions)
        return encode(captions)

    denoiser.text.encode = counting_encode
    try:
        yield counts
    finally:
        del denoiser.text.encode
        for handle in handles:
            handle.remove()


def bare_latent_work(denoiser: Denoiser, counts: dict, queries: torch.Tensor, captions: list[str],
                     device: torch.device):
    """The bare cost of an attack's counted work (`counted_work`): its text-encoder strings, one VAE encode a
    record, and its UNet calls (as many, each with as many rows) on random latents with precomputed embeddings."""
    unet_calls, strings = counts["unet"], counts["captions"]
    latents = torch.randn(max(unet_calls), *denoiser.sample_shape, device=device)
    timesteps = torch.full((len(latents),), 100, dtype=torch.long, device=device)
    embeddings = denoiser.text_conditions(captions[:1]).expand(len(latents), -1, -1).contiguous()

    def bare_work() -> None:
        denoiser.text_conditions(strings)
        denoiser.to_x0(queries)
        for rows in unet_calls:
            denoiser.epsilon(latents[:rows], timesteps[:rows], embeddings[:rows])

    return bare_work


def latent_main(args) -> None:
    n_records, repeats = args.records or 128, 1 if args.quick else args.repeats
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_dir = latent_sd_pipeline(Path(tmp) / "sd")
        denoiser = load_denoiser({}, pipeline_dir, device)
    records = load_dataset({"name": "digits", "resolution": LATENT_RESOLUTION, "channels": 3, "captions": True})
    ids = np.arange(n_records)
    queries, captions = records.get(ids), records.captions(ids)
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in (
        ("unet", denoiser.network), ("vae_encoder", denoiser.latent.vae.encoder),
        ("text_encoder", denoiser.text.text_encoder))}
    print(f"{n_records} captioned records, 3x{LATENT_RESOLUTION}x{LATENT_RESOLUTION} -> latents "
          f"{'x'.join(map(str, denoiser.sample_shape))}, parameters {sizes}, device={device}, "
          f"torch threads={torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)

    def run_attack(attack):  # what the pipeline does for a text model: embed the captions, then attack
        context = AttackContext(queries=queries, record_ids=ids, denoiser=denoiser, device=device, seed=0,
                                captions=captions, conditions=denoiser.text_conditions(captions))
        return attack(context)

    result = {"machine": machine_info(), "case": "latent", "records": n_records, "parameters": sizes,
              "sample_shape": list(denoiser.sample_shape), "attacks": {}}
    for name, params in LATENT_ATTACKS.items():
        attack = build_attack(name, params)
        with counted_work(denoiser) as counts:  # untimed: counts the work, warms up
            run_attack(build_attack(name, params))
        unet_calls, text_strings = counts["unet"], counts["captions"]
        bare_work = bare_latent_work(denoiser, counts, queries, captions, device)

        print(f"{name}: {len(unet_calls)} UNet calls ({sum(unet_calls) / n_records:g} rows per record, largest "
              f"{max(unet_calls)}), VAE rows {counts['vae_rows']}, text strings {len(text_strings)} "
              f"(encoder rows {counts['text_rows']})", flush=True)
        timed = time_interleaved({name: lambda: run_attack(attack), "bare_work": bare_work}, repeats)
        attack_s, bare_s = timed[name]["median_s"], timed["bare_work"]["median_s"]
        # each repeat's attack / bare pair ran back to back: their ratio does not drift with the machine's load
        paired = statistics.median(a / b for a, b in zip(timed[name]["runs_s"], timed["bare_work"]["runs_s"]))
        result["attacks"][name] = {
            "params": params, "unet_calls": len(unet_calls), "unet_rows_per_record": sum(unet_calls) / n_records,
            "unet_call_rows": sorted(set(unet_calls)), "vae_rows_attack": counts["vae_rows"],
            "text_strings": len(text_strings), "text_encoder_rows_attack": counts["text_rows"],
            "attack_s": attack_s, "bare_s": bare_s, "attack_ms_per_record": 1000 * attack_s / n_records,
            "ratio": attack_s / bare_s, "paired_ratio_median": paired,
            "runs": {k: v["runs_s"] for k, v in timed.items()},
        }
        print(f"[{name}] {1000 * attack_s / n_records:.1f} ms/record; bare {bare_s:.2f} s -> "
              f"{attack_s / bare_s:.3f}x, median of paired ratios {paired:.3f}x (target <= 1.15x)", flush=True)
    result["load_average_at_end"] = os.getloadavg()
    write_result("diffusion_attacks_latent_quick" if args.quick else "diffusion_attacks_latent", result, args.out)


def rows_per_call_main(args) -> None:
    n_records, repeats = args.records or 256, 1 if args.quick else args.repeats
    device = resolve_device(args.device)
    denoiser = cpu_ddpm(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_records, *denoiser.sample_shape, generator=generator).to(device)
    t = torch.randint(0, denoiser.num_train_timesteps, (n_records,), generator=generator).to(device)
    sizes = [int(size) for size in args.micro_batches.split(",")]

    def fixed(rows):
        def run():
            denoiser.micro_batch = rows
            return denoiser.epsilon(x, t)
        return run

    def bare():
        with torch.no_grad():
            return denoiser.network(x, t).sample

    print(f"{n_records} inputs 1x16x16, device={device}, torch threads={torch.get_num_threads()}", flush=True)
    timed = time_interleaved({"bare_one_call": bare, **{f"rows_{rows}": fixed(rows) for rows in sizes}}, repeats)
    bare_s = timed["bare_one_call"]["median_s"]
    result = {"machine": machine_info(), "records": n_records, "bare_one_call_s": bare_s, "sizes": {}}
    for rows in sizes:
        row_s = timed[f"rows_{rows}"]["median_s"]
        result["sizes"][rows] = {"median_s": row_s, "runs_s": timed[f"rows_{rows}"]["runs_s"],
                                 "ms_per_image": 1000 * row_s / n_records, "ratio_to_bare": row_s / bare_s}
        print(f"[rows {rows}] {1000 * row_s / n_records:.3f} ms/image, {row_s / bare_s:.3f}x the bare call "
              f"({1000 * bare_s / n_records:.3f} ms/image)", flush=True)
    write_result("rows_per_call_quick" if args.quick else "rows_per_call", result, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=None, help="default 256 (DDPM), 128 (--latent)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 repeat: a smoke test")
    parser.add_argument("--latent", action="store_true", help="the latent text-conditioned case (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rows-per-call", action="store_true", help="the fixed call shape's cost (see above)")
    parser.add_argument("--micro-batches", default="16,32,64,128,256")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.latent:
        return latent_main(args)
    if args.rows_per_call:
        return rows_per_call_main(args)
    n_records, repeats = (args.records or 256, 1) if args.quick else (args.records or 256, args.repeats)
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
