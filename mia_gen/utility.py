"""Utility beside privacy: how good are the model's samples? (Fréchet distance in a feature space.)

A defense that stops membership inference by ruining the samples is no defense; the benchmark table
puts a utility figure next to every AUC. Two feature spaces, chosen by `utility.metric`:

- `fid_inception`: the FID of Heusel et al. (NeurIPS'17) in the 2048-d pool features of the
  TF-ported InceptionV3 that torch-fidelity (and torchmetrics) use; torch-fidelity comes with the
  `[fid]` extra (`pip install "mia-gen[fid]"`). Its weights are not bundled and this tool never
  downloads them: give `utility.inception_weights=<file>` or put torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth` in the torch hub cache (`$TORCH_HOME/hub/checkpoints`).
- `fid_classifier` (the offline fallback, labelled as such everywhere it is reported): the same
  Fréchet distance in the penultimate features of a small CNN trained here on the dataset's own
  labelled records (cached per dataset). Its numbers are not comparable with Inception FIDs from
  papers, only with each other (same dataset, same numbers of samples).

`auto` takes Inception when torch-fidelity is installed and its weights are present, else the
classifier when the dataset has class labels, else measures nothing; the log says why Inception was
not taken. Both FIDs use `n_samples` generated samples against `n_real` records of the dataset
(seeded subset); lower is better.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mia_gen.errors import MiaGenError, MissingAssetError, MissingExtraError
from mia_gen.extras import install_line, require
from mia_gen.hashing import config_hash

log = logging.getLogger(__name__)

METRICS = ("auto", "fid_inception", "fid_classifier", "none")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name
# How the offline feature classifier is trained; part of every cache key that depends on its features.
CLASSIFIER_RECIPE = "FeatureClassifier-32, Adam 3e-3, batch 64, 80% split"
LABELS = {"fid_inception": "FID (InceptionV3)",
          "fid_classifier": "classifier-feature FID (offline fallback, not comparable with Inception FID)"}


@dataclass(frozen=True)
class UtilityConfig:
    metric: str = "auto"
    n_samples: int = 2000
    n_real: int = 10000
    inception_weights: str | None = None
    classifier_epochs: int = 30
    batch_size: int = 256

    @classmethod
    def from_config(cls, cfg: Any) -> "UtilityConfig":
        raw = {} if cfg is None else (OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig)
                                      else dict(cfg))
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise MiaGenError(f"utility has no setting(s) {unknown}; it takes {sorted(cls.__dataclass_fields__)}.")
        config = cls(**raw)
        if config.metric not in METRICS:
            raise MiaGenError(f"utility.metric={config.metric!r} is not one of {METRICS}.")
        if config.metric == "fid_inception":
            torch_fidelity()  # a missing [fid] extra stops with the install line where the config is read
        for key in ("n_samples", "n_real", "classifier_epochs", "batch_size"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise MiaGenError(f"utility.{key} must be an integer >= 2, got {value!r}.")
        return config


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (float64).

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which stays finite when a covariance is
    singular (fewer images than feature dimensions, dead features)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `(N, D)` features."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise MiaGenError(f"a Fréchet distance needs at least 2 images per side, got {len(features)}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# ---- feature extractors ------------------------------------------------------------------------
def torch_fidelity():
    """torch-fidelity's InceptionV3 module, or `MissingExtraError` with `pip install "mia-gen[fid]"`."""
    return require("torch_fidelity.feature_extractor_inceptionv3", "utility.metric=fid_inception (Inception FID)")


def inception_unavailable(config: UtilityConfig) -> str | None:
    """Why the Inception FID cannot run on this machine (None when it can), for `auto`'s fallback.
    A configured weights file that does not exist still raises (a typo is not a reason to fall back)."""
    reasons = []
    try:
        torch_fidelity()
    except MissingExtraError:  # an installed but broken torch-fidelity raises its own ImportError instead
        reasons.append(f"torch-fidelity is not installed ({install_line('fid')})")
    if inception_weights_path(config.inception_weights) is None:
        reasons.append(f"no InceptionV3 weights (torch-fidelity's {INCEPTION_WEIGHTS} in "
                       f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or utility.inception_weights=<file>)")
    return " and ".join(reasons) or None


def inception_weights_path(configured: str | None) -> Path | None:
    """The InceptionV3 weights file to use: `configured`, else torch-fidelity's file in the hub cache."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise MissingAssetError(
                f"utility.inception_weights={configured} does not exist; give the path of torch-fidelity's "
                f"{INCEPTION_WEIGHTS}, or set utility.metric=fid_classifier to measure offline."
            )
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return path if path.is_file() else None


class InceptionFeatures:
    """2048-d pool features of torch-fidelity's InceptionV3 (images in [-1, 1], 1 or 3 channels)."""

    def __init__(self, weights: Path, device: torch.device):
        extractor_class = torch_fidelity().FeatureExtractorInceptionV3
        try:  # refuse anything but plain tensors before torch-fidelity unpickles the file itself
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise MiaGenError(f"{weights} is not a plain InceptionV3 state dict ({error}); use torch-fidelity's "
                              f"{INCEPTION_WEIGHTS}.") from error
        self.model = extractor_class("inception-v3-compat", ["2048"],
                                     feature_extractor_weights_path=str(weights)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        (features,) = self.model(uint8.to(self.device))
        return features.double().cpu().numpy()


class FeatureClassifier(nn.Module):
    """A small CNN whose 128-d pooled features are the offline FID space."""

    def __init__(self, channels: int, n_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ClassifierFeatures:
    """Penultimate features of a `FeatureClassifier` trained on the dataset's labelled records
    (80% train, 20% held out for the accuracy it reports), cached under `cache_dir`."""

    def __init__(self, records, cache_dir: Path, config: UtilityConfig, device: torch.device, seed: int = 0):
        if records.kind != "image" or records.labels is None or len(torch.unique(records.labels)) < 2:
            raise MiaGenError(
                f"utility.metric=fid_classifier trains a classifier on the dataset's class labels, and dataset "
                f"'{records.name}' has none; give the InceptionV3 weights (utility.inception_weights=<file>, "
                "metric fid_inception) or set utility.metric=none."
            )
        self.device = device
        labels = records.labels
        classes = torch.unique(labels)
        key = config_hash({"fingerprint": records.fingerprint, "labels": labels.tolist(),
                           "epochs": config.classifier_epochs, "seed": seed,
                           "recipe": CLASSIFIER_RECIPE})
        path = Path(cache_dir) / "utility" / f"classifier-{key}.safetensors"
        self.model = FeatureClassifier(records.record_shape[0], len(classes))
        from safetensors.torch import load_file, save_file

        if path.is_file():
            state = load_file(str(path))
            self.accuracy = float(state.pop("_held_out_accuracy").item())
            self.model.load_state_dict(state)
        else:
            self.accuracy = self._train(records, torch.searchsorted(classes, labels), config, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.contiguous() for k, v in self.model.state_dict().items()}
            tensors["_held_out_accuracy"] = torch.tensor([self.accuracy])
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)
        self.model.to(device).eval()

    def _train(self, records, targets: torch.Tensor, config: UtilityConfig, seed: int) -> float:
        rng = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(records), generator=rng)
        n_train = int(0.8 * len(order))
        train, held_out = order[:n_train], order[n_train:]
        x = records.get(np.arange(len(records)))
        with torch.random.fork_rng(devices=[]):  # seeded initial weights; the run's global RNG is untouched
            torch.manual_seed(seed)
            self.model = FeatureClassifier(records.record_shape[0], int(targets.max()) + 1)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        for _ in range(config.classifier_epochs):
            for batch in torch.randperm(n_train, generator=rng).split(64):
                index = train[batch]
                loss = nn.functional.cross_entropy(self.model(x[index]), targets[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = (self.model(x[held_out]).argmax(1) == targets[held_out]).float().mean().item()
        log.info("utility: feature classifier trained on %d records, held-out accuracy %.3f", n_train, accuracy)
        return accuracy

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.model.features(images.to(self.device)).double().cpu().numpy()


# ---- the measurement --------------------------------------------------------------------------
def choose_metric(config: UtilityConfig, records) -> str:
    """The metric `auto` resolves to here (see the module docstring)."""
    if config.metric != "auto":
        return config.metric
    if records.kind != "image":
        return "none"
    if inception_unavailable(config) is None:
        return "fid_inception"
    if records.labels is not None and len(torch.unique(records.labels)) >= 2:
        return "fid_classifier"
    return "none"


def _features(extractor, images_of, n: int, batch_size: int) -> np.ndarray:
    return np.concatenate([extractor(images_of(np.arange(i, min(i + batch_size, n))))
                           for i in range(0, n, batch_size)])


def measure_utility(records, samples, config: UtilityConfig, cache_dir: Path, device: torch.device,
                    seed: int = 0) -> dict | None:
    """The utility of a sample store against the dataset it imitates, or None when `metric` resolves
    to none. Returns {"metric", "label", "value", "n_samples", "n_real", ...}."""
    metric = choose_metric(config, records)
    if config.metric == "auto" and records.kind != "image":
        log.warning("utility not measured: both FIDs compare images, and dataset '%s' holds %s records",
                    records.name, records.kind)
    elif config.metric == "auto" and metric != "fid_inception":
        why = inception_unavailable(config)
        if metric == "none":
            log.warning("utility not measured: the Inception FID needs what is missing here (%s), and dataset "
                        "'%s' has no class labels for the offline classifier-feature FID", why, records.name)
        else:
            log.info("utility: %s, because the Inception FID needs what is missing here: %s", LABELS[metric], why)
    if metric == "none":
        return None
    if metric == "fid_inception":
        torch_fidelity()  # before the weights: installing the extra is the first step
        weights = inception_weights_path(config.inception_weights)
        if weights is None:
            raise MissingAssetError(
                f"utility.metric=fid_inception needs the InceptionV3 weights, which are not bundled: put "
                f"torch-fidelity's {INCEPTION_WEIGHTS} in {Path(torch.hub.get_dir()) / 'checkpoints'} or set "
                "utility.inception_weights=<file>; or use utility.metric=fid_classifier (offline)."
            )
        extractor, extra = InceptionFeatures(weights, device), {"weights": str(weights)}
    else:
        extractor = ClassifierFeatures(records, cache_dir, config, device, seed)
        extra = {"classifier_held_out_accuracy": extractor.accuracy}
    n_fake = min(config.n_samples, len(samples))
    rng = np.random.default_rng([seed, 11])
    real_ids = np.sort(rng.choice(len(records), size=min(config.n_real, len(records)), replace=False))
    if n_fake < 2:
        raise MiaGenError(f"utility needs at least 2 samples, the store has {len(samples)}.")
    real = _features(extractor, lambda i: records.get(real_ids[i]), len(real_ids), config.batch_size)
    fake = _features(extractor, samples.get, n_fake, config.batch_size)
    value = fid_from_features(real, fake)
    log.info("utility: %s = %.3f (%d samples vs %d records)", metric, value, n_fake, len(real_ids))
    return {"metric": metric, "label": LABELS[metric], "value": value, "n_samples": n_fake,
            "n_real": int(len(real_ids)), **extra}
