"""The diffusion must learn: a tiny model trained for about a minute beats trivial masks by far.

The official code's users report all-black outputs after long training; this test catches any
change that makes the model learn nothing (a broken loss, sampler, conditioning or data path).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsegdiff_core.checkpoint import load_checkpoint
from medsegdiff_core.config import InferenceConfig, parse_config
from medsegdiff_core.data.layouts import open_dataset
from medsegdiff_core.inference import evaluate_dataset
from medsegdiff_core.metrics import segmentation_metrics
from medsegdiff_core.training import fit


@pytest.mark.timeout(1800)  # about 90 s on an idle 2-core machine; generous for a busy one
def test_tiny_model_learns_disc_and_cup(fundus_sites: list[Path], tmp_path: Path) -> None:
    config = parse_config(
        {
            "data": {"train": [str(s / "train") for s in fundus_sites]},
            "model": {"preset": "tiny", "image_size": 32},
            "diffusion": {"prediction": "v"},
            "train": {
                "steps": 700,
                "batch_size": 8,
                "lr": 1e-3,
                "ema_decay": 0.99,
                "warmup_steps": 20,
                "checkpoint_every": 700,
                "out_dir": str(tmp_path / "run"),
            },
        }
    )
    result = fit(config, progress=False, log=lambda _: None)
    loaded = load_checkpoint(result.checkpoint)
    test = torch.utils.data.ConcatDataset(
        [
            open_dataset(s / "test", "generic", loaded.classes, 32, in_channels=3)
            for s in fundus_sites
        ]
    )
    cfg = InferenceConfig(sampler="dpm++", sampling_steps=10, ensemble=3, batch_size=8)
    schedule = loaded.diffusion.noise_schedule()
    _, summary = evaluate_dataset(
        loaded.model,
        schedule,
        test,
        cfg,
        loaded.classes,
        device=torch.device("cpu"),
    )

    targets = torch.stack([test[i]["mask"] for i in range(len(test))]).bool()
    empty = segmentation_metrics(torch.zeros_like(targets), targets)
    full = segmentation_metrics(torch.ones_like(targets), targets)
    for index, name in enumerate(["disc", "cup"]):
        dice = summary["per_class"][name]["dice"]
        trivial = max(float(empty.dice[:, index].mean()), float(full.dice[:, index].mean()))
        assert dice > trivial + 0.2, (name, dice, trivial)
    assert summary["per_class"]["disc"]["dice"] > 0.7, summary
