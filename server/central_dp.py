"""Central (site-level) DP on the aggregate, done the way its epsilon is computed.

The model card's central epsilon is the RDP of a Gaussian mechanism on a sum of k clipped
updates, k fixed before the round. So the mechanism must not depend on the sites' data in
anything but that sum:

- k is the number of sites *sampled* for the round (the train messages sent), not the number
  of updates that came back accepted: a sampled site that declined, failed or was rejected adds
  a zero update, so dropping out changes the sum by at most C, as the analysis assumes.
- each accepted update (its difference from the global model) is clipped to L2 norm C;
- the result is global + sum / k + N(0, (sigma C / k)^2) on every weight.

Screening before clipping may only look at the update itself (finite values, keys, shapes):
the norm-outlier rule compares a site with the round's median, which depends on the other
sites' data, so the server turns it off under central DP (clipping bounds every site's
influence instead). Flower's ``DifferentialPrivacyServerSideFixedClipping`` divides by the
number of updates it is handed, which is why the round is aggregated here, with Flower's own
clipping and noise functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_stdv,
)


@dataclass(frozen=True)
class CentralDP:
    noise_multiplier: float
    clipping_norm: float

    def aggregate(
        self, global_arrays: ArrayRecord, updates: list[ArrayRecord], sampled: int
    ) -> ArrayRecord:
        """The noisy mean of the clipped updates over ``sampled`` sites (see the module)."""
        if sampled < len(updates) or sampled < 1:
            raise ValueError(f"{len(updates)} updates from {sampled} sampled sites")
        keys = list(global_arrays.keys())
        base = global_arrays.to_numpy_ndarrays()
        total = [np.zeros(b.shape, dtype=np.float64) for b in base]
        trained = [np.issubdtype(b.dtype, np.floating) for b in base]  # counters stay as they are
        for update in updates:
            delta = [
                u.astype(np.float64) - b if t else np.zeros(b.shape)
                for u, b, t in zip(update.to_numpy_ndarrays(), base, trained, strict=True)
            ]
            if any(d.any() for d in delta):  # Flower's clip divides by the norm
                clip_inputs_inplace(delta, self.clipping_norm)
            for acc, d in zip(total, delta, strict=True):
                acc += d
        mean = [acc / sampled for acc in total]
        add_gaussian_noise_inplace(
            mean, compute_stdv(self.noise_multiplier, self.clipping_norm, sampled)
        )
        return ArrayRecord(
            {
                key: Array(np.asarray(b + m, dtype=b.dtype) if t else b)
                for key, b, m, t in zip(keys, base, mean, trained, strict=True)
            }
        )
