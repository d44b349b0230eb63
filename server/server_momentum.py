"""Server momentum on the averaged update: FedAvgM (Hsu et al., 2019, arXiv:1909.06335).

The averaged update of K sites that each took S steps moves the model about as far as S steps
on a K-times larger batch, so far from convergence a federated round makes less progress than
K*S centralized steps. Server momentum carries the direction of earlier rounds forward:
``v <- beta * v + (w_old - w_avg)``, ``w_new <- w_old - lr * v``.

Flower's ``FedAvgM`` does the same step inside its FedAvg only; this one follows whichever
average the strategy produced (FedAvg, FedProx, central DP), and exposes its velocity so the run
store can checkpoint it, which a resumed run needs to continue as an uninterrupted one would.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


class ServerMomentum:
    """The server's optimizer state: one velocity tensor per floating-point weight."""

    def __init__(
        self, momentum: float, lr: float = 1.0, velocity: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.momentum = momentum
        self.lr = lr
        self.velocity: dict[str, torch.Tensor] = dict(velocity or {})

    @property
    def enabled(self) -> bool:
        return self.momentum > 0 or self.lr != 1.0

    def step(self, previous: ArrayRecord, averaged: ArrayRecord) -> ArrayRecord:
        """The next global weights from the previous ones and the sites' average."""
        if not self.enabled:
            return averaged
        old = previous.to_torch_state_dict()
        new = averaged.to_torch_state_dict()
        result = {}
        for key, value in new.items():
            if not value.is_floating_point():  # counters and the like are taken as averaged
                result[key] = value
                continue
            direction = old[key] - value  # a pseudo-gradient: the update points downhill
            if self.momentum > 0:
                if key in self.velocity:
                    direction = self.velocity[key].mul_(self.momentum).add_(direction)
                self.velocity[key] = direction
            result[key] = old[key] - self.lr * direction
        return ArrayRecord(result)
