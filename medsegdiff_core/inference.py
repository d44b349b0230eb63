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
from collections.abc import Callable, Iterator
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
from .data.writers import Provenance, dicom_seg_path
from .diffusion import NoiseSchedule
from .ensemble import Segmentation, segment
from .metrics import CaseMetrics, case_rows, format_table, segmentation_metrics, summarize
from .model import MedSegDiffUNet
from .reliability import (
    CaseAgreement,
    CaseReliability,
    PixelReliability,
    case_reliability_row,
    reliability_summary,
)
from .report import CaseFigure, case_figure, write_report


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(dataset), batch_size):
        yield [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]


Segmenter = Callable[[torch.Tensor], Segmentation]
"""Segments a batch of (B, C, S, S) images at the model's resolution. The diffusion ensemble is
one (:func:`diffusion_segmenter`); a benchmark's deterministic UNet, wrapped the same way, is
scored by exactly the same code."""


def diffusion_segmenter(
    model: MedSegDiffUNet,
    schedule: NoiseSchedule,
    cfg: InferenceConfig,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Segmenter:
    """The configured ensemble of ``model``, its noise drawn from one generator seeded with
    ``cfg.seed`` (the same folder in the same order gives the same members)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = model.to(device)

    def run(images: torch.Tensor) -> Segmentation:
        return segment(
            model, schedule, images.to(device), cfg, generator=generator, amp_dtype=amp_dtype
        )

    return run


def segment_dataset(
    segmenter: Segmenter, dataset: Dataset, batch_size: int, *, progress: bool = False
) -> Iterator[tuple[list[dict[str, Any]], Segmentation]]:
    """Yield (cases, segmentation) per batch of ``batch_size`` images, in dataset order."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(dataset), desc="segment", unit="img", disable=not progress)
    for items in _batches(dataset, batch_size):
        result = segmenter(torch.stack([it["image"] for it in items]))
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
    """Dice/IoU/HD95 and the uncertainty figures of the fused ensemble per case, as
    ``medsegdiff evaluate`` scores them (see the module docstring): (per-case rows, summary).

    ``dataset`` is a layout's dataset (:func:`~.data.layouts.open_dataset`) or a
    ``ConcatDataset`` of them (each part is sampled from ``cfg.seed``, as if run on its own)."""
    return score_dataset(
        lambda: diffusion_segmenter(model, schedule, cfg, device=device, amp_dtype=amp_dtype),
        dataset,
        classes,
        batch_size=cfg.batch_size,
        threshold=cfg.threshold,
        progress=progress,
    )


def score_dataset(
    make_segmenter: Callable[[], Segmenter],
    dataset: Dataset,
    classes: dict[str, list[int]],
    *,
    batch_size: int,
    threshold: float,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score any segmenter as :func:`evaluate_dataset` scores the ensemble: (rows, summary).

    ``make_segmenter`` is called once per part of a ``ConcatDataset`` (a fresh generator each)."""
    writers = []
    for part in getattr(dataset, "datasets", [dataset]):
        writer = _writer(part, classes, outputs=None)
        segmented = segment_dataset(make_segmenter(), part, batch_size, progress=progress)
        _score_into(writer, segmented, threshold, classes)
        writers.append(writer)
    if not any(w.scores for w in writers):
        raise ValueError("evaluate_dataset: no case has a mask to score")
    return _report(writers, classes)


def _report(
    writers: list[_PlanarWriter | _VolumeWriter], classes: dict[str, list[int]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of every scored case: Dice/IoU/HD95 and the uncertainty figures."""
    merged = CaseMetrics.concat([score for w in writers for score in w.scores])
    rows = case_rows(merged, [name for w in writers for name in w.scored])
    reliability = [case for w in writers for case in w.reliability]
    pooled = PixelReliability(len(classes))
    for w in writers:
        pooled.merge(w.pooled)
    for row, case in zip(rows, reliability, strict=True):
        row["uncertainty"] = case_reliability_row(case, list(classes))
    summary = summarize(merged)
    summary["uncertainty"] = reliability_summary(
        reliability, merged.dice.numpy(), pooled, list(classes)
    )
    return rows, summary


def _writer(
    dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
) -> _PlanarWriter | _VolumeWriter:
    from .data.layouts import SliceDataset

    kind = _VolumeWriter if isinstance(dataset, SliceDataset) else _PlanarWriter
    return kind(dataset, classes, outputs)


def _score_into(
    writer: _PlanarWriter | _VolumeWriter,
    segmented_batches: Iterator[tuple[list[dict[str, Any]], Segmentation]],
    threshold: float,
    classes: dict[str, list[int]],
) -> None:
    """Hand every segmented item to ``writer`` at the input's own resolution."""
    segmented = 0
    for items, result in segmented_batches:
        for offset, item in enumerate(items):
            size = tuple(item["original_size"])
            # Full-size (M, H, W) float32 maps are dropped as soon as they are reduced to what
            # is written and scored (a large image's maps are GBs each); an image without a mask
            # holds one at a time.
            probability = resize_probability(result.probability[offset].cpu().numpy(), size)
            labels = channels_to_labels(probability >= threshold, classes)
            scored = writer.has_target(segmented)
            if not scored:
                del probability
            uncertainty = evidence = None
            if writer.outputs is not None or scored:
                full = resize_probability(result.uncertainty[offset].cpu().numpy(), size)
                uncertainty = full.max(0)
                if scored:
                    votes = (result.members[offset] >= threshold).cpu().numpy()
                    evidence = _Evidence(probability, full, votes)
                del full
            writer.add(segmented, labels, uncertainty, evidence)
            del evidence
            segmented += 1
    writer.close()


def provenance(loaded: LoadedModel) -> Provenance:
    """The model as outputs name it: its release (name, version), or the checkpoint's name."""
    release = loaded.metadata.get("release") or {}
    if release.get("name"):
        return Provenance(loaded.classes, str(release["name"]), release.get("version", "?"))
    name = loaded.path.stem if loaded.path is not None else "checkpoint"
    return Provenance(loaded.classes, name, "unreleased")


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
    ``uncertainty/<case>`` (float32), and for a DICOM series also ``dicom-seg/<case>.dcm``, a
    DICOM Segmentation referencing it; metrics per case in 3-D, in millimetres.
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
    writer.provenance = provenance(loaded)
    writer.uncertainty_kind = cfg.uncertainty
    writer.figures = []
    scored = any(case.mask_path is not None for case in dataset.cases)
    metrics = [out_dir / "metrics.json", out_dir / "metrics.txt"] if scored else []
    for path in [*writer.planned(), *metrics, out_dir / "report.html"]:
        outputs.claim(path)  # a file in the way stops the run before any sampling, not midway
    segmenter = diffusion_segmenter(
        loaded.model, loaded.diffusion.noise_schedule(), cfg, device=device, amp_dtype=amp_dtype
    )
    segmented = segment_dataset(segmenter, dataset, cfg.batch_size, progress=progress)
    _score_into(writer, segmented, cfg.threshold, loaded.classes)
    rows: list[dict[str, Any]] = []
    summary = None
    if writer.scores:
        rows, summary = _report([writer], loaded.classes)
        report = {"cases": rows, "summary": summary}
        metrics_json = outputs.claim(out_dir / "metrics.json")
        atomic_write_bytes(metrics_json, json.dumps(report, indent=2).encode())
        outputs.claim(out_dir / "metrics.txt").write_text(format_table(rows, summary) + "\n")
    _write_report(outputs.claim(out_dir / "report.html"), loaded, writer, rows, summary)
    return PredictionReport(out_dir, writer.cases, rows, summary)


def _write_report(
    path: Path,
    loaded: LoadedModel,
    writer: _PlanarWriter | _VolumeWriter,
    rows: list[dict[str, Any]],
    summary: dict[str, Any] | None,
) -> None:
    """``report.html`` (:mod:`.report`): the metrics.json records, the thumbnails, the card
    and the release's training-history plot."""
    volumes = isinstance(writer, _VolumeWriter)
    cases = list(writer.dataset.volume_cases) if volumes else [c.name for c in writer.dataset.cases]
    write_report(
        path,
        cases=cases,
        rows=rows,
        summary=summary,
        figures=writer.figures or [],
        classes=loaded.classes,
        model=str(loaded.path) if loaded.path is not None else "checkpoint",
        model_card=loaded.metadata.get("release"),
        training_history=loaded.metadata.get("training_history"),
        uncertainty_kind=writer.uncertainty_kind,
        hd95_unit="mm" if volumes else "px",
    )


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


@dataclass
class _Evidence:
    """What the uncertainty figures of one image (or slice) need, at the input's resolution
    (``votes``: the members binarised, at the model's)."""

    probability: np.ndarray  # (M, H, W) fused foreground probability
    uncertainty: np.ndarray  # (M, H, W)
    votes: np.ndarray  # (K, M, S, S) bool


class _CaseEvidence:
    """One case's uncertainty figures, accumulated image by image (slice by slice)."""

    def __init__(self, classes: dict[str, list[int]]) -> None:
        self.classes = classes
        self.pixels = PixelReliability(len(classes))
        self.agreement = CaseAgreement(len(classes))

    def add(self, evidence: _Evidence, labels: np.ndarray, target: np.ndarray, source: str) -> None:
        predicted = labels_to_channels(labels, self.classes, source="prediction") > 0.5
        truth = labels_to_channels(target, self.classes, source=source) > 0.5
        self.pixels.add(evidence.probability, evidence.uncertainty, predicted, truth)
        self.agreement.add(evidence.votes)

    def finish(self) -> CaseReliability:
        return CaseReliability(self.agreement.score(), self.pixels.auroc(), self.pixels.ece())


class _Scores:
    """The scored cases of one writer: metrics, names and uncertainty figures, in order."""

    def __init__(self, classes: dict[str, list[int]]) -> None:
        self.scores: list[CaseMetrics] = []
        self.scored: list[str] = []
        self.reliability: list[CaseReliability] = []
        self.pooled = PixelReliability(len(classes))
        self.uncertainty_kind = "entropy"  # what the uncertainty maps hold (their colour bar)
        self.figures: list[CaseFigure] | None = None  # a list: thumbnails for the report

    def keep(self, name: str, metrics: CaseMetrics, evidence: _CaseEvidence) -> None:
        self.scores.append(metrics)
        self.scored.append(name)
        self.reliability.append(evidence.finish())
        self.pooled.merge(evidence.pixels)


class _PlanarWriter(_Scores):
    """PNG mask, uncertainty and overlay per image (none with ``outputs=None``); metrics where
    the image has a mask."""

    _KINDS = ("masks", "uncertainty", "overlays")

    def __init__(
        self, dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
    ) -> None:
        super().__init__(classes)
        self.dataset, self.classes, self.outputs = dataset, classes, outputs
        self.cases = 0
        self.provenance: Provenance | None = None  # no 2-D output names the model yet

    def _paths(self, name: str) -> list[Path]:
        if self.outputs is None:
            return []
        return [self.outputs.out_dir / kind / f"{name}.png" for kind in self._KINDS]

    def planned(self) -> list[Path]:
        """Every file this writer will write."""
        return [path for case in self.dataset.cases for path in self._paths(case.name)]

    def has_target(self, index: int) -> bool:
        """Whether item ``index`` has a mask to score against."""
        return self.dataset.cases[index].mask_path is not None

    def add(
        self,
        index: int,
        labels: np.ndarray,
        uncertainty: np.ndarray | None,
        evidence: _Evidence | None,
    ) -> None:
        case = self.dataset.cases[index]
        if self.outputs is not None:
            paths = map(self.outputs.claim, self._paths(case.name))
            mask_path, uncertainty_path, overlay_path = paths
            write_label_map(mask_path, labels)
            write_uncertainty(uncertainty_path, uncertainty, kind=self.uncertainty_kind)
            # uint8 as on disk: the overlay needs no float copy of the image.
            shown = read_display_image(case.image_path)
            write_overlay(overlay_path, shown, labels, classes=self.classes)
        target = self.dataset.target_labels(index)
        if self.figures is not None and uncertainty is not None:
            figure = case_figure(
                case.name, shown, labels, uncertainty, target, kind=self.uncertainty_kind
            )
            self.figures.append(figure)
        if target is not None:
            source = str(case.mask_path)
            case_evidence = _CaseEvidence(self.classes)
            if evidence is not None:
                case_evidence.add(evidence, labels, target, source)
            self.keep(case.name, _score(labels, target, self.classes, source), case_evidence)
        self.cases += 1

    def close(self) -> None:
        pass


class _VolumeWriter(_Scores):
    """Collects a case's slices; writes its volumes (and scores it in 3-D) when the case ends.

    Items of a :class:`~.data.layouts.SliceDataset` come case by case, so one case is held in
    memory at a time. With ``outputs=None`` it only scores."""

    def __init__(
        self, dataset: Any, classes: dict[str, list[int]], outputs: OutputFolder | None
    ) -> None:
        super().__init__(classes)
        self.dataset, self.classes, self.outputs = dataset, classes, outputs
        self.cases = 0
        self._case: Any = None
        self._labels: dict[int, np.ndarray] = {}
        self._uncertainty: dict[int, np.ndarray] = {}
        self._target: np.ndarray | None = None  # the held case's label volume, if it has one
        self._evidence = _CaseEvidence(classes)
        self.provenance: Provenance | None = None  # set: DICOM series also get a DICOM-SEG

    def _paths(self, case: str) -> list[Path]:
        if self.outputs is None:
            return []
        name = self.dataset.output_name(case)
        out_dir = self.outputs.out_dir
        paths = [out_dir / kind / name for kind in ("masks", "uncertainty")]
        if self.provenance is not None and self.dataset.is_dicom(case):
            paths.append(dicom_seg_path(out_dir, case))
        return paths

    def planned(self) -> list[Path]:
        """Every file this writer will write."""
        return [path for case in self.dataset.volume_cases for path in self._paths(case)]

    def has_target(self, index: int) -> bool:
        """Whether item ``index`` has a mask to score against."""
        return self.dataset.cases[index].mask_path is not None

    def add(
        self,
        index: int,
        labels: np.ndarray,
        uncertainty: np.ndarray | None,
        evidence: _Evidence | None,
    ) -> None:
        case = self.dataset.cases[index]
        if self._case is not None and case.name != self._case.name:
            self.close()
        if self._case is None and case.mask_path is not None:
            # On the image's grid: a mask stored with flipped axes is reoriented as in training.
            reference = self.dataset.reference(case.name)
            self._target = read_label_volume(case.mask_path, reference=reference).data
        self._case = case
        _, k = self.dataset.locate(index)
        self._labels[k] = labels.astype(np.uint8)
        if uncertainty is not None:
            self._uncertainty[k] = uncertainty.astype(np.float32)
        if evidence is not None and self._target is not None:
            axis = self.dataset.volume_cases[case.name].axis
            target = np.take(self._target, k, axis=axis)
            self._evidence.add(evidence, labels, target, str(case.mask_path))

    def close(self) -> None:
        case = self._case
        if case is None:
            return
        if self.outputs is not None:
            for path in self._paths(case.name):
                self.outputs.claim(path)
            out_dir = self.outputs.out_dir
            self.dataset.write_prediction(
                out_dir, case.name, self._labels, self._uncertainty, self.provenance
            )
            if self.figures is not None:
                self.figures.append(self._figure(case))
        if self._target is not None:
            reference = self.dataset.reference(case.name)
            labels = self.dataset.assemble(case.name, self._labels)
            spacing = tuple(float(v) for v in reference.spacing)
            source = str(case.mask_path)
            metrics = _score(labels, self._target, self.classes, source, spacing)
            self.keep(case.name, metrics, self._evidence)
        self.cases += 1
        self._case, self._labels, self._uncertainty = None, {}, {}
        self._target, self._evidence = None, _CaseEvidence(self.classes)

    def _figure(self, case: Any) -> CaseFigure:
        """The report's thumbnails of the held case: the slice with the most predicted
        foreground (the middle one where nothing is predicted), first modality, windowed to its
        0.5-99.5 percentiles, turned a quarter (rows = the second in-plane axis, upwards)."""
        from .data.layouts import load_volume_case

        slices = sorted(self._labels)
        counts = [np.count_nonzero(self._labels[k]) for k in slices]
        k = slices[int(np.argmax(counts))] if max(counts) else slices[len(slices) // 2]
        axis = self.dataset.volume_cases[case.name].axis
        volumes, _ = load_volume_case(case, self.classes)
        data = volumes[0].data if volumes[0].data.ndim == 3 else volumes[0].data[..., 0]
        plane = np.take(data, k, axis=axis).astype(np.float32)
        low, high = np.percentile(plane, [0.5, 99.5])
        shown = np.clip((plane - low) / max(float(high - low), 1e-6), 0.0, 1.0)
        target = None if self._target is None else np.take(self._target, k, axis=axis)
        return case_figure(
            case.name,
            np.rot90(shown)[None],
            np.rot90(self._labels[k]),
            np.rot90(self._uncertainty.get(k, np.zeros_like(plane))),
            None if target is None else np.rot90(target),
            kind=self.uncertainty_kind,
            note=f"slice {k} of {data.shape[axis]} along axis {axis} (most predicted foreground)",
        )
