"""What a hospital's ClientApp knows about its own site: config, data folder, device, state.

Flower creates the ClientApp anew for every message, so nothing here may rely on living in
memory between rounds: data are re-read (and cached per process), and state that must outlive
a round lives in the site's ``state_dir`` on disk.

Where the data are:

* a real site (deployment) sets ``data-path`` in its SuperNode's node config: a folder with
  ``train/`` and ``val/``, each in the experiment's ``data.layout`` (generic: ``images/`` +
  ``masks/``); ``site-name`` and ``state-dir`` are optional;
* in simulation each ``partition-id`` is one of the built-in synthetic hospitals, written once
  under the workdir on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context

from medsegdiff_core.config import ExperimentConfig, config_from_run_config, resolve_workdir
from medsegdiff_core.data import SegmentationDataset
from medsegdiff_core.data.synthetic import DEFAULT_CASES, write_fundus_sites
from medsegdiff_core.errors import DataError
from medsegdiff_core.training import open_checked, pick_device

APP_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Site:
    """One hospital as its ClientApp sees it."""

    name: str
    folder: Path
    state_dir: Path
    config: ExperimentConfig
    device: torch.device

    @classmethod
    def from_context(cls, context: Context) -> Site:
        config = config_from_run_config(context.run_config, APP_ROOT)
        workdir = resolve_workdir(context.run_config.get("workdir") or None)
        node = context.node_config
        if node.get("data-path"):
            folder = Path(str(node["data-path"])).expanduser().resolve()
            name = str(node.get("site-name") or folder.name)
        else:
            partition = int(node["partition-id"])
            sites = builtin_sites(
                workdir,
                config.federation.simulated_sites,
                train_slices=config.federation.simulated_train_slices,
            )
            if partition >= len(sites):
                raise DataError(
                    f"partition-id {partition}: only {len(sites)} built-in sites "
                    "(federation.simulated_sites)"
                )
            folder, name = sites[partition], f"site-{partition}"
        state_dir = Path(str(node.get("state-dir") or workdir / "sites" / name))
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(name, folder, state_dir, config, pick_device(config.train.device))

    def dataset(self, split: str, *, augment: bool = False) -> SegmentationDataset:
        """The site's ``train`` or ``val`` cases at the model's resolution (cached per process).

        The folder is checked whole first, so a bad file stops the round with every problem
        named (cases listed in ``data.skip_cases`` are left out)."""
        return _open_split(
            self.config.model_dump_json(), str(self.folder / split), split == "train", augment
        )

    def seed(self, server_round: int, purpose: str) -> int:
        """A seed fixed by (experiment seed, round, site, purpose): a re-run round after a crash
        trains exactly as the first attempt did."""
        key = f"{self.config.train.seed}/{server_round}/{self.name}/{purpose}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 2**63


@lru_cache(maxsize=8)
def _open_split(config_json: str, folder: str, train: bool, augment: bool) -> SegmentationDataset:
    config = ExperimentConfig.model_validate_json(config_json)
    return open_checked(config, Path(folder), train=train, augment=augment)


def builtin_sites(
    workdir: Path, num_sites: int, *, train_slices: int = DEFAULT_CASES["train"]
) -> list[Path]:
    """The built-in synthetic sites under ``workdir``, written once (several simulated clients
    may ask at the same moment: a file lock makes one of them write, the others wait).

    ``train_slices`` per site (``federation.simulated_train_slices``); sites with other than
    the default 40 live in their own folder, ``synthetic-<sites>-train<N>``."""
    root = workdir / "data" / builtin_sites_folder(num_sites, train_slices)
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                write_fundus_sites(root, num_sites=num_sites, train_slices_per_site=train_slices)
                done.touch()
    return [root / f"site-{k}" for k in range(num_sites)]


def builtin_sites_folder(num_sites: int, train_slices: int = DEFAULT_CASES["train"]) -> str:
    """The folder name, under ``<workdir>/data``, of :func:`builtin_sites`."""
    suffix = "" if train_slices == DEFAULT_CASES["train"] else f"-train{train_slices}"
    return f"synthetic-{num_sites}{suffix}"
