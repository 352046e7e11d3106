"""DOMIAS (van Breugel et al., AISTATS'23): density ratio between the generator and the data.

A member sits where the generator put more mass than the data distribution does:
score = log p_G(x) - log p_R(x), with p_G a Gaussian KDE of generated samples and p_R a Gaussian
KDE of reference records, both on PCA features fitted on the reference records (images, and the encoded
rows of a table: `n_components=auto` keeps 10 directions, or fewer where the reference records span fewer,
so that a table's one-hot groups, which each sum to a constant, do not make the reference KDE singular; a
generator that never draws some category can still leave its own KDE singular, which is refused unless
`kde_regularization` > 0) or on the raw columns (`features=pixels`). The log ratio ranks exactly like the paper's ratio.
"""

from __future__ import annotations

import numpy as np
import torch

from mia_gen.attacks.base import Access, Attack, AttackContext, AttackOutput, check_positive_int, register_attack
from mia_gen.features import as_numpy, build_features, feature_matrix, spanned_dimensions
from mia_gen.kde import GaussianKDE


@register_attack
class Domias(Attack):
    name = "domias"
    access = Access.SAMPLES
    needs_reference_data = True
    defaults = {
        "features": "pca",  # pca (fitted on reference data) | pixels (raw values; tabular data)
        # auto: 10, or as many directions as the reference records span if fewer (a table's one-hot groups each
        # sum to a constant, so its encoded rows span fewer directions than columns); an integer is taken as given
        "n_components": "auto",
        "bandwidth": "scott",  # Scott's rule, as scipy.stats.gaussian_kde, or a float factor
        "kde_regularization": 0.0,  # ridge added to both covariances; 0 = error on a singular one
        "max_generated": None,  # use at most this many generated samples (an i.i.d. prefix)
    }

    def components(self, context: AttackContext) -> int:
        """The PCA dimension: `n_components`, or for `auto` min(10, the directions the reference records span)."""
        if self.n_components != "auto":
            return check_positive_int(self.n_components, "n_components", self.name)
        if self.features != "pca" or context.reference is None or len(context.reference) == 0:
            return 10  # unused by pixels; build_features says what PCA lacks
        return min(10, max(spanned_dimensions(context.reference), 1))

    def score(self, context: AttackContext) -> AttackOutput:
        n_components = self.components(context)
        feature_fn = build_features(self.features, context.reference, n_components, context.seed)
        samples = context.samples
        if self.max_generated is not None and int(self.max_generated) < len(samples):
            samples = samples.get(np.arange(int(self.max_generated)))
        with torch.no_grad():
            generated = feature_matrix(samples, feature_fn)
            reference = feature_fn(context.reference)
            queries = feature_fn(context.queries)
        bandwidth = self.bandwidth if self.bandwidth == "scott" else float(self.bandwidth)
        regularization = float(self.kde_regularization)
        p_generated = GaussianKDE(generated, bandwidth, regularization, label="generated samples")
        p_reference = GaussianKDE(reference, bandwidth, regularization, label="reference records")
        scores = p_generated.log_density(queries) - p_reference.log_density(queries)
        return AttackOutput(scores=as_numpy(scores), info={"n_components": n_components} if self.features == "pca" else {})
