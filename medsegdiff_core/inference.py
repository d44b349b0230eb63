"""Running a trained model over a folder: predictions on disk, and metrics where masks exist.

``predict_folder`` is what ``medsegdiff predict`` and ``medsegdiff evaluate`` run. Scores come
from one place: each case is scored at the input's own resolution, in 3-D for volumes (one
Dice per case and class, so the empty slices of a volume do not each count as a perfect case),
by the writers below. ``evaluate_dataset`` runs the same writers without writing files; it is
what federated evaluation, and so the model card, reports, so the card's Dice is what
``medsegdiff evaluate`` prints on the same data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .checkpoint import LoadedModel, atomic_write_bytes
from .config import InferenceConfig
from .data import (
    OutputFolder,
    channels_to_labels,
    labels_to_channels,
    read_display_image,
    resize_probability,
    write_label_map,
    write_overlay,
    write_uncertainty,
)
from .data.volumes import read_label_volume
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
    classes: dict[str, list[int]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Dice/IoU/HD95 of the fused ensemble per case, as ``medsegdiff evaluate`` scores them
    (see the module docstring): (per-case rows, summary).

    ``dataset`` is a layout's dataset (:func:`~.data.layouts.open_dataset`) or a
    ``ConcatDataset`` of them (each part is sampled from ``cfg.seed``, as if run on its own)."""
    scores: list[CaseMetrics] = []
    names: list[str] = []
    for part in getattr(dataset, "datasets", [dataset]):
        writer = _writer(part, classes, outputs=None)
        _segment_into(writer, model, schedule, part, cfg, classes, device, amp_dtype, progress)
        scores += writer.scores
        names += writer.scored
    if not scores:
        raise ValueError("evaluate_dataset: no case has a mask to score")
    merged = CaseMetrics.concat(scores)
    return case_rows(merged, names), summarize(merged)


def _writer(
    dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
) -> _PlanarWriter | _VolumeWriter:
    from .data.layouts import SliceDataset

    kind = _VolumeWriter if isinstance(dataset, SliceDataset) else _PlanarWriter
    return kind(dataset, classes, outputs)


def _segment_into(
    writer: _PlanarWriter | _VolumeWriter,
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    dataset: Dataset,
    cfg: InferenceConfig,
    classes: dict[str, list[int]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool,
) -> None:
    """Segment every item and hand it to ``writer`` at the input's own resolution."""
    segmented = 0
    for items, result in segment_dataset(
        model.to(device),
        schedule,
        dataset,
        cfg,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
    ):
        for offset, item in enumerate(items):
            size = tuple(item["original_size"])
            # One full-size (M, H, W) float32 map alive at a time: each is dropped as soon as it
            # is reduced to the (H, W) map written (a large image's maps are GBs each).
            probability = resize_probability(result.probability[offset].cpu().numpy(), size)
            labels = channels_to_labels(probability >= cfg.threshold, classes)
            del probability
            uncertainty = None
            if writer.outputs is not None:  # scoring alone needs no uncertainty map
                full = resize_probability(result.uncertainty[offset].cpu().numpy(), size)
                uncertainty = full.max(0)
                del full
            writer.add(segmented, labels, uncertainty)
            segmented += 1
    writer.close()


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
    layout: str = "generic",
    require_masks: bool = False,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> PredictionReport:
    """Segment every case of a folder in ``layout`` and write the results in the input's own
    format and geometry, plus ``metrics.json`` and ``metrics.txt`` where the folder has masks.

    2-D layouts, per image at its own resolution: ``masks/<name>.png`` (label map),
    ``uncertainty/<name>.png`` (max over classes, 255 = members disagree) and
    ``overlays/<name>.png`` (the image with the labels drawn); metrics per image.
    Volume layouts, per case on the image's grid (same shape, affine and header; NRRD stays NRRD,
    NIfTI and DICOM series give NIfTI): ``masks/<case>`` (label volume) and
    ``uncertainty/<case>`` (float32); metrics per case in 3-D, in millimetres.
    """
    from .data.layouts import open_dataset

    outputs = OutputFolder(out_dir, [folder])  # before reading: out_dir must not be the data
    dataset = open_dataset(
        folder,
        layout,
        loaded.classes,
        loaded.spec.image_size,
        in_channels=loaded.spec.image_channels,
        require_masks=require_masks,
        lazy=True,  # a volume folder is segmented case by case in bounded memory
    )
    writer = _writer(dataset, loaded.classes, outputs)
    scored = any(case.mask_path is not None for case in dataset.cases)
    metrics = [out_dir / "metrics.json", out_dir / "metrics.txt"] if scored else []
    for path in [*writer.planned(), *metrics]:
        outputs.claim(path)  # a file in the way stops the run before any sampling, not midway
    _segment_into(
        writer,
        loaded.model,
        loaded.diffusion.noise_schedule(),
        dataset,
        cfg,
        loaded.classes,
        device,
        amp_dtype,
        progress,
    )
    rows: list[dict[str, Any]] = []
    summary = None
    if writer.scores:
        merged = CaseMetrics.concat(writer.scores)
        rows, summary = case_rows(merged, writer.scored), summarize(merged)
        report = {"cases": rows, "summary": summary}
        metrics_json = outputs.claim(out_dir / "metrics.json")
        atomic_write_bytes(metrics_json, json.dumps(report, indent=2).encode())
        outputs.claim(out_dir / "metrics.txt").write_text(format_table(rows, summary) + "\n")
    return PredictionReport(out_dir, writer.cases, rows, summary)


def _score(
    labels: np.ndarray,
    target: np.ndarray,
    classes: dict[str, list[int]],
    source: str,
    spacing: tuple[float, ...] | None = None,
) -> CaseMetrics:
    """Metrics of one case from label maps (2-D or 3-D) at the input's resolution."""
    pred = labels_to_channels(labels, classes, source="prediction") > 0.5
    truth = labels_to_channels(target, classes, source=source) > 0.5
    return segmentation_metrics(
        torch.from_numpy(pred)[None],
        torch.from_numpy(truth)[None],
        spacing=spacing,
        class_names=list(classes),
    )


class _PlanarWriter:
    """PNG mask, uncertainty and overlay per image (none with ``outputs=None``); metrics where
    the image has a mask."""

    _KINDS = ("masks", "uncertainty", "overlays")

    def __init__(
        self, dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
    ) -> None:
        self.dataset, self.classes, self.outputs = dataset, classes, outputs
        self.cases = 0
        self.scores: list[CaseMetrics] = []
        self.scored: list[str] = []

    def _paths(self, name: str) -> list[Path]:
        if self.outputs is None:
            return []
        return [self.outputs.out_dir / kind / f"{name}.png" for kind in self._KINDS]

    def planned(self) -> list[Path]:
        """Every file this writer will write."""
        return [path for case in self.dataset.cases for path in self._paths(case.name)]

    def add(self, index: int, labels: np.ndarray, uncertainty: np.ndarray | None) -> None:
        case = self.dataset.cases[index]
        if self.outputs is not None:
            paths = map(self.outputs.claim, self._paths(case.name))
            mask_path, uncertainty_path, overlay_path = paths
            write_label_map(mask_path, labels)
            write_uncertainty(uncertainty_path, uncertainty)
            # uint8 as on disk: the overlay needs no float copy of the image.
            write_overlay(overlay_path, read_display_image(case.image_path), labels)
        target = self.dataset.target_labels(index)
        if target is not None:
            self.scores.append(_score(labels, target, self.classes, str(case.mask_path)))
            self.scored.append(case.name)
        self.cases += 1

    def close(self) -> None:
        pass


class _VolumeWriter:
    """Collects a case's slices; writes its volumes (and scores it in 3-D) when the case ends.

    Items of a :class:`~.data.layouts.SliceDataset` come case by case, so one case is held in
    memory at a time. With ``outputs=None`` it only scores."""

    def __init__(
        self, dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
    ) -> None:
        self.dataset, self.classes, self.outputs = dataset, classes, outputs
        self.cases = 0
        self.scores: list[CaseMetrics] = []
        self.scored: list[str] = []
        self._case: Any = None
        self._labels: dict[int, np.ndarray] = {}
        self._uncertainty: dict[int, np.ndarray] = {}

    def _paths(self, case: str) -> list[Path]:
        if self.outputs is None:
            return []
        name = self.dataset.output_name(case)
        return [self.outputs.out_dir / kind / name for kind in ("masks", "uncertainty")]

    def planned(self) -> list[Path]:
        """Every file this writer will write."""
        return [path for case in self.dataset.volume_cases for path in self._paths(case)]

    def add(self, index: int, labels: np.ndarray, uncertainty: np.ndarray | None) -> None:
        case = self.dataset.cases[index]
        if self._case is not None and case.name != self._case.name:
            self.close()
        self._case = case
        _, k = self.dataset.locate(index)
        self._labels[k] = labels.astype(np.uint8)
        if uncertainty is not None:
            self._uncertainty[k] = uncertainty.astype(np.float32)

    def close(self) -> None:
        case = self._case
        if case is None:
            return
        if self.outputs is not None:
            for path in self._paths(case.name):
                self.outputs.claim(path)
            out_dir = self.outputs.out_dir
            self.dataset.write_prediction(out_dir, case.name, self._labels, self._uncertainty)
        if case.mask_path is not None:
            reference = self.dataset.reference(case.name)
            labels = self.dataset.assemble(case.name, self._labels)
            # On the image's grid: a mask stored with flipped axes is reoriented as in training.
            target = read_label_volume(case.mask_path, reference=reference).data
            spacing = tuple(float(v) for v in reference.spacing)
            self.scores.append(_score(labels, target, self.classes, str(case.mask_path), spacing))
            self.scored.append(case.name)
        self.cases += 1
        self._case, self._labels, self._uncertainty = None, {}, {}
