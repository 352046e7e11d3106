"""Per-record random streams: what an attack draws for a record is a function of (seed, record id).

A record's draws come from its own generator, never from one shared by the batch, so its score
does not depend on which other records are scored with it, on their order, or on the batch size
(DESIGN.md, batch invariance). Different uses of randomness within one attack take different
`stream` tags, so that, e.g., a record's random start and its search noise are independent.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream tags. Non-zero: numpy's SeedSequence pads short entropy with zeros, so [s, r] and [s, r, 0]
# would seed the same stream.
LATENT_INIT = 1  # random starting latents of an inversion
LATENT_SEARCH = 2  # the noise of a gradient-free latent search


def record_generator(seed: int, record_id: int, *stream: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from (seed, record id, *stream) through `np.random.SeedSequence`."""
    entropy = [int(seed), int(record_id), *(int(tag) for tag in stream)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))
