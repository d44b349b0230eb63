"""Running a trained model over a folder: predictions on disk, and metrics where masks exist.

``predict_folder`` is what ``medsegdiff predict`` and ``medsegdiff evaluate`` run; the federated
client runs the same function on a site's own folder with a released model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .checkpoint import LoadedModel, atomic_write_bytes
from .config import InferenceConfig
from .data import (
    SegmentationFolder,
    channels_to_labels,
    labels_to_channels,
    read_image,
    read_label_map,
    resize_probability,
    write_label_map,
    write_overlay,
    write_uncertainty,
)
from .diffusion import NoiseSchedule
from .ensemble import Segmentation, segment
from .metrics import CaseMetrics, case_rows, format_table, segmentation_metrics, summarize
from .model import MedSegDiffUNet


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(dataset), batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]


def segment_dataset(
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    dataset: Dataset,
    cfg: InferenceConfig,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[list[dict[str, Any]], Segmentation]]:
    """Yield (cases, segmentation) per batch of ``cfg.batch_size`` images (seed ``cfg.seed``)."""
    from tqdm.auto import tqdm

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    bar = tqdm(total=len(dataset), desc="segment", unit="img", disable=not progress)
    for items in _batches(dataset, cfg.batch_size):
        images = torch.stack([it["image"] for it in items]).to(device)
        result = segment(
            model,
            schedule,
            images,
            cfg,
            generator=generator,
            amp_dtype=amp_dtype,
        )
        bar.update(len(items))
        yield items, result
    bar.close()


def evaluate_dataset(
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    dataset: Dataset,
    cfg: InferenceConfig,
    class_names: list[str],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Dice/IoU/HD95 of the fused ensemble at the model's resolution: (per-case rows, summary)."""
    names, preds, targets = [], [], []
    for items, result in segment_dataset(
        model,
        schedule,
        dataset,
        cfg,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
    ):
        preds.append(result.mask.cpu())
        targets.append(torch.stack([it["mask"] for it in items]).bool())
        names += [it["name"] for it in items]
    metrics = segmentation_metrics(torch.cat(preds), torch.cat(targets), class_names=class_names)
    return case_rows(metrics, names), summarize(metrics)


@dataclass
class PredictionReport:
    """What ``predict_folder`` wrote; ``summary`` is None when the folder has no masks."""

    out_dir: Path
    cases: int
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None


def predict_folder(
    loaded: LoadedModel,
    folder: Path,
    out_dir: Path,
    cfg: InferenceConfig,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> PredictionReport:
    """Segment every image of a folder and write, per case, at the image's own resolution:

    ``masks/<name>.png`` (label map), ``uncertainty/<name>.png`` (max over classes, 255 = members
    disagree), ``overlays/<name>.png`` (image with the labels drawn); plus ``metrics.json`` and
    ``metrics.txt`` when the folder has masks.
    """
    spec, classes = loaded.spec, loaded.classes
    class_names = list(classes)
    dataset = SegmentationFolder(
        folder, classes, spec.image_size, in_channels=spec.image_channels, require_masks=False
    )
    schedule = loaded.diffusion.noise_schedule()
    model = loaded.model.to(device)
    names: list[str] = []
    scores: list[CaseMetrics] = []
    scored: list[str] = []
    for items, result in segment_dataset(
        model,
        schedule,
        dataset,
        cfg,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
    ):
        for index, item in enumerate(items):
            case = dataset.cases[index + len(names)]
            size = tuple(item["original_size"])
            probability = resize_probability(result.probability[index].cpu().numpy(), size)
            channels = probability >= cfg.threshold
            labels = channels_to_labels(channels, classes)
            uncertainty = resize_probability(result.uncertainty[index].cpu().numpy(), size)
            write_label_map(out_dir / "masks" / f"{case.name}.png", labels)
            write_uncertainty(out_dir / "uncertainty" / f"{case.name}.png", uncertainty.max(0))
            write_overlay(
                out_dir / "overlays" / f"{case.name}.png", read_image(case.image_path), labels
            )
            if case.mask_path is not None:
                target = labels_to_channels(
                    read_label_map(case.mask_path), classes, source=str(case.mask_path)
                )
                scores.append(
                    segmentation_metrics(
                        torch.from_numpy(channels)[None],
                        torch.from_numpy(target > 0.5)[None],
                        class_names=class_names,
                    )
                )
                scored.append(case.name)
        names += [it["name"] for it in items]
    rows: list[dict[str, Any]] = []
    summary = None
    if scores:
        merged = CaseMetrics.concat(scores)
        rows, summary = case_rows(merged, scored), summarize(merged)
        report = {"cases": rows, "summary": summary}
        atomic_write_bytes(out_dir / "metrics.json", json.dumps(report, indent=2).encode())
        (out_dir / "metrics.txt").write_text(format_table(rows, summary) + "\n")
    return PredictionReport(out_dir, len(names), rows, summary)
