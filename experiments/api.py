"""mia-gen from Python: load a model, build an attack, score records, evaluate the scores.

The same attacks and metrics as a Hydra run, without configs or a pipeline. `score` hands an attack
only what its threat model allows (`mia_gen.attacks.base.Access`), as the pipeline does, and says
which keyword argument is missing when the attack needs more::

    import mia_gen
    scores = mia_gen.score("sample_distance", records, samples=generated)
    mia_gen.evaluate(scores, is_member)["auc"]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext
from mia_gen.attacks.base import build_attack as _build_registered
from mia_gen.device import resolve_device
from mia_gen.errors import MiaGenError
from mia_gen.metrics import evaluate_scores
from mia_gen.sample_store import InMemorySampleStore, SampleStore, as_float_tensor

# The model each white-box / query attack reads, and where a Hydra run takes it from.
_DENOISER = ("denoiser", "denoiser=mia_gen.load_denoiser(<diffusers pipeline dir>)",
             "model=diffusers model.checkpoint=<dir>, or model=ddpm")
_GENERATOR = ("generator", "generator=mia_gen.load_generator(<checkpoint dir>) (a GAN generator with "
              "`latent_dim` and `sample_latent`)", "model=dcgan / model.checkpoint=<dir>")
_DISCRIMINATOR = ("discriminator", "discriminator=mia_gen.load_discriminator(<checkpoint dir>)",
                  "a GAN trained by mia-gen, model.checkpoint=<dir>")
MODEL_ARGUMENT = {
    "diffusion_loss": _DENOISER, "pia": _DENOISER, "pian": _DENOISER, "secmi_stat": _DENOISER,
    "secmi_nn": _DENOISER, "latent_inversion": _GENERATOR, "latent_inversion_pbb": _GENERATOR,
    "co_membership": _GENERATOR, "logan": _DISCRIMINATOR,
}


# ---------------------------------------------------------------------- loading
def _device(device: str | torch.device | None) -> torch.device:
    return resolve_device("auto") if device is None else resolve_device(str(device))


def load_denoiser(path: str | os.PathLike, device: str | torch.device | None = None, *,
                  prediction_type: Optional[str] = None, use_ema: bool = True, allow_download: bool = False,
                  betas: Optional[Mapping[str, Any]] = None,
                  lora: str | os.PathLike | None = None) -> torch.nn.Module:
    """A diffusion model as the `mia_gen.models.denoiser.Denoiser` white-box attacks read, in eval mode.

    Args:
        path: a diffusers pipeline directory (`model_index.json`, `unet/` [`unet_ema/`], `scheduler/`; a
            Stable Diffusion or DiT pipeline with its VAE, tokenizer and text encoder), a bare UNet directory
            (`config.json` + safetensors; then give `betas`), or a hub id (with `allow_download=True`, or
            already in the local Hugging Face cache).
        device: "cpu", "cuda", "cuda:N" or "auto"; None = "auto" (CUDA when available).
        prediction_type: None reads it from the scheduler; "epsilon" | "v_prediction" | "sample".
        use_ema: prefer `unet_ema/` when the pipeline has one (the weights SecMI and PIA attack).
        betas: the noise schedule of a bare UNet directory, e.g. `{"num_train_timesteps": 1000,
            "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}`.
        lora: a LoRA adapter (its directory or `.safetensors` file) merged into the UNet (`model.lora`).
    """
    from mia_gen.models.denoiser import load_denoiser as load

    path_obj = Path(path).expanduser()
    if path_obj.is_dir() and (path_obj / "config.json").is_file() and not (path_obj / "model_index.json").is_file() \
            and betas is None:
        raise MiaGenError(
            f"{path_obj} is a bare UNet directory without a scheduler: pass its noise schedule as betas={{"
            "'num_train_timesteps': 1000, 'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02}} "
            "(the one it was trained with), or pass the whole pipeline directory (with model_index.json)."
        )
    cfg = {"prediction_type": prediction_type, "use_ema": use_ema, "allow_download": allow_download,
           "betas": None if betas is None else dict(betas), "lora": None if lora is None else str(lora)}
    return load(cfg, path, _device(device))


def load_generator(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """The generator of a GAN checkpoint written by mia-gen (`generator.safetensors` + `generator.json`),
    in eval mode on `device` (None = "auto"). It has `latent_dim` and `sample_latent(n, torch_generator)`."""
    return _load_gan_part(path, "generator", device)


def load_discriminator(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """The discriminator of a GAN checkpoint written by mia-gen (white-box LOGAN reads it)."""
    return _load_gan_part(path, "discriminator", device)


def _load_gan_part(path: str | os.PathLike, name: str, device: str | torch.device | None) -> torch.nn.Module:
    from mia_gen.models.checkpoint import load_module

    return load_module(Path(path).expanduser(), name, map_location=_device(device))


# ---------------------------------------------------------------------- attacks
def build_attack(name: str, **params: Any) -> Attack:
    """The registered attack `name` with its defaults, overridden by `params`.

    e.g. `build_attack("pia", timestep=200, p=4)`; an unknown name or parameter is a `MiaGenError`
    listing the valid ones.
    """
    return _build_registered(name, params)


IMAGE_SLACK = 1e-4  # float rounding of images mapped to [-1, 1]


def _as_records(values: Any, argument: str) -> torch.Tensor:
    """A tensor or array of records `(N, ...)` as float32 on CPU (where the pipeline keeps records): finite, and
    images (N, C, H, W) in [-1, 1]."""
    values = as_float_tensor(values, argument)
    if values.ndim < 2:
        raise MiaGenError(f"{argument} must have shape (N, ...) with one record per row, got {tuple(values.shape)}; "
                          "add a leading axis for a single record (x[None]).")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).flatten(1).any(dim=1).sum())
        raise MiaGenError(f"{argument}: {bad} record(s) hold NaN or infinite values; remove or repair them.")
    if values.ndim == 4 and len(values) and (values.min() < -1 - IMAGE_SLACK or values.max() > 1 + IMAGE_SLACK):
        raise MiaGenError(
            f"{argument} are images (N, C, H, W) with values in [{float(values.min()):.3g}, {float(values.max()):.3g}], "
            "but mia-gen's images lie in [-1, 1]: map [0, 1] images with 2 * x - 1 and [0, 255] ones with "
            "x / 127.5 - 1.")
    return values


def _check_reference(reference: torch.Tensor, queries: torch.Tensor) -> None:
    """Reference records like the scored ones and disjoint from them (DESIGN.md `reference_data`)."""
    if tuple(reference.shape[1:]) != tuple(queries.shape[1:]):
        raise MiaGenError(f"reference records have shape {tuple(reference.shape[1:])} but the scored records "
                          f"{tuple(queries.shape[1:])}; give reference records of the same kind and size.")
    scored = {row.tobytes() for row in queries.numpy().reshape(len(queries), -1)}
    shared = sum(row.tobytes() in scored for row in reference.numpy().reshape(len(reference), -1))
    if not shared:
        return
    message = (f"{shared} reference record(s) equal scored records: reference data must be disjoint from the records "
               "scored (a record in both looks typical of the population and hides its own leak)")
    if queries.ndim == 4:
        raise MiaGenError(message + "; remove them from `reference`.")
    warnings.warn(message + " (identical table rows may be different people; check).", stacklevel=3)


def _as_store(samples: Any) -> SampleStore:
    if isinstance(samples, SampleStore):
        return samples
    if isinstance(samples, (str, os.PathLike)):
        return SampleStore.open(samples)
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        return InMemorySampleStore(samples)
    raise MiaGenError(f"samples must be a tensor or array (N, ...), a SampleStore, or the path of one, "
                      f"got {type(samples).__name__}.")


def _model_device(*models: Optional[torch.nn.Module]) -> torch.device:
    for model in models:
        if isinstance(model, torch.nn.Module):
            parameter = next(model.parameters(), None)
            if parameter is not None:
                return parameter.device
    return torch.device("cpu")


def _missing(attack: Attack, what: str, argument: str, hydra: str) -> MiaGenError:
    return MiaGenError(f"{attack.name} needs {what}: pass {argument} (in a Hydra run: {hydra}).")


def _record_ids(record_ids: Any, n: int) -> np.ndarray:
    if record_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(record_ids.cpu() if isinstance(record_ids, torch.Tensor) else record_ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise MiaGenError(f"record_ids must be {n} integers, one per record, got {ids.dtype} of shape {ids.shape}; "
                          "they seed each record's own random draws, so give each record its dataset index.")
    if len(np.unique(ids)) != n:
        raise MiaGenError("record_ids must be distinct: two records with one id would share their random draws.")
    return ids.astype(np.int64)


def score(attack: str | Attack, records: Any, *, samples: Any = None, generator: Optional[torch.nn.Module] = None,
          discriminator: Optional[torch.nn.Module] = None, denoiser: Optional[torch.nn.Module] = None,
          reference: Any = None, record_ids: Any = None, device: str | torch.device | None = None, seed: int = 0,
          labelled_subset: Optional[tuple[Any, Any]] = None,
          groups: Optional[Mapping[int, np.ndarray]] = None, conditions: Any = None,
          captions: Optional[Sequence[str]] = None) -> np.ndarray:
    """Per-record membership scores, float64 `(N,)`: higher = more likely a member (every attack).

    Args:
        attack: a registered name (built with its defaults) or an `Attack` (`build_attack(name, **params)`).
        records (`torch.Tensor` or `np.ndarray` of shape `(N, ...)`): the records to score, images in
            [-1, 1] NCHW, unlabelled.
        samples: generated samples, for sample-based attacks: a tensor / array `(M, ...)` (held in an
            `InMemorySampleStore`), a `SampleStore`, or the path of one.
        generator / discriminator / denoiser: the model, for query and white-box attacks
            (`load_generator`, `load_discriminator`, `load_denoiser`).
        reference (`(R, ...)`): records from the same distribution, disjoint from `records`, for attacks
            that need reference data (DOMIAS).
        record_ids (`(N,)` distinct ints): seed each record's own random draws (noise, starts);
            default `arange(N)`. Give dataset indices to reproduce a pipeline run's scores.
        device: None = the device of the model's parameters, else CPU.
        seed: the attack's seed (`AttackContext.seed`).
        labelled_subset (`(positions, labels)`): for attacks that learn from labels (`secmi_nn`):
            positions into `records` and their 0/1 member labels; leave those records out of `evaluate`.
        groups (`{n: (G, n) positions}`): for `co_membership`, from `mia_gen.groups.draw_groups`.
        conditions (`(N,)` int class ids): for a class-conditional `denoiser`, each record's class label
            (part of the record, never its membership label), aligned with `records`.
        captions (`N` strings): for a text-to-image `denoiser` (Stable Diffusion), each record's caption,
            embedded with the pipeline's own tokenizer and text encoder unless `conditions` are given; for
            `sample_distance` on a store drawn per caption, each record is compared with its caption's samples.

    The attack gets only what its access allows (samples for sample-based attacks, the model for
    query / white-box ones, ...), so one set of keyword arguments can serve every attack of a loop.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MiaGenError(f"seed must be an integer, got {seed!r}.")
    if isinstance(captions, str):
        raise MiaGenError("captions must be a list of strings, one per record, not a single string (it would be "
                          "read character by character); pass [caption] for one record.")
    if isinstance(attack, str):
        attack = build_attack(attack)
    if not isinstance(attack, Attack):
        raise MiaGenError(f"attack must be an attack name or an Attack (mia_gen.build_attack), "
                          f"got {type(attack).__name__}.")
    queries = _as_records(records, "records")
    if attack.needs_reference_model:
        inner = getattr(attack, "inner", None)
        raise MiaGenError(
            f"{attack.name} needs a reference model, which score() does not train: score "
            f"'{getattr(inner, 'name', 'the wrapped attack')}' once against your model and once against a model "
            "trained the same way on reference records, and subtract the two score arrays "
            "(in a Hydra run: split.n_reference > 0, or attack.calibration.reference_checkpoint=<dir>)."
        )
    if attack.needs_shadow_models:
        raise MiaGenError(
            f"{attack.name} needs a zoo of shadow models, which score() does not train: run it in a Hydra run "
            "with zoo.n_shadows=K (the zoo is trained as a multirun, `mia-gen-train -m ... zoo.index='range(0,K)'`), "
            "or fit the per-record statistics yourself with mia_gen.attacks.shadow_stats (lira_online, rmia).")
    context = AttackContext(queries=queries, record_ids=_record_ids(record_ids, len(queries)), seed=int(seed))
    if captions is not None:  # a text model's conditions, or a per-caption sample store's match
        context.captions = [str(caption) for caption in captions]
        if len(context.captions) != len(queries):
            raise MiaGenError(f"captions: {len(context.captions)} given for {len(queries)} records; give one "
                              "caption per record, aligned with `records`.")
    if attack.uses_samples:
        if samples is None:
            raise _missing(attack, "generated samples", "samples=<tensor or SampleStore>",
                           "sampling.* / sampling.store")
        context.samples = _as_store(samples)
    if attack.access in (Access.QUERY, Access.WHITE_BOX):
        given = {"generator": generator, "discriminator": discriminator, "denoiser": denoiser}
        # An attack outside the table (a user's own) may read any of the three.
        argument, example, hydra = MODEL_ARGUMENT.get(
            attack.name, (None, "generator=<GAN generator> or denoiser=<Denoiser>", "model.checkpoint=<dir>"))
        missing = given[argument] is None if argument else all(model is None for model in given.values())
        if missing:
            raise _missing(attack, f"the model's weights ({attack.access.value} access)", example, hydra)
        context.generator = generator
        if attack.access is Access.WHITE_BOX:
            context.discriminator, context.denoiser = discriminator, denoiser
            context.conditions = None if conditions is None else torch.as_tensor(conditions)
            if captions is not None:
                if context.conditions is None and getattr(denoiser, "condition_kind", "none") == "text":
                    context.conditions = denoiser.text_conditions(context.captions)
    if attack.needs_reference_data:
        if reference is None or len(reference) == 0:
            raise _missing(attack, "reference data (records from the same distribution, disjoint from the "
                           "scored ones)", "reference=<tensor of records>", "split.n_reference")
        context.reference = _as_records(reference, "reference")
        _check_reference(context.reference, queries)
    if attack.needs_labelled_subset:
        if labelled_subset is None:
            raise _missing(attack, "a labelled subset of the records to learn from",
                           "labelled_subset=(positions, labels)", "evaluation.labelled_fraction")
        context.labelled_subset = tuple(np.asarray(part) for part in labelled_subset)
    if attack.group_draw() is not None:
        if groups is None:
            raise _missing(attack, "groups of records to decide jointly",
                           "groups=mia_gen.groups.draw_groups(is_member, sizes, n_groups, seed)",
                           f"attack.{attack.name}.group_sizes / n_groups")
        context.groups = {int(n): np.asarray(rows) for n, rows in groups.items()}
    context.device = _model_device(context.denoiser, context.generator, context.discriminator) if device is None \
        else resolve_device(str(device))
    return attack(context).scores


# ---------------------------------------------------------------------- metrics
def evaluate(scores: Any, labels: Any, alphas: Sequence[float] = (0.1, 0.01, 0.001), *, n_bootstrap: int = 1000,
             seed: int = 0) -> dict:
    """Metrics of one attack's scores, as in `results.json`.

    Args:
        scores (`(N,)`): higher = member (what `score` returns).
        labels (`(N,)`): 1 = member, 0 = non-member; both present.
        alphas: FPR bounds of `tpr_at_fpr`.
        n_bootstrap: resamples of the 95% intervals (0: no intervals).

    Returns:
        `{"auc", "asr", "tpr_at_fpr": {"0.1": ..., ...}, "ci95": {"auc": [lo, hi], "asr": ...,
        "tpr_at_fpr": {...}}, "n_members", "n_non_members", "warnings"}` (`mia_gen.metrics.evaluate_scores`).
    """
    def plain(values: Any) -> np.ndarray:
        return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)

    return evaluate_scores(plain(labels), plain(scores), alphas=tuple(alphas), n_bootstrap=n_bootstrap, seed=seed)
