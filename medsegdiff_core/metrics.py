"""Per-case, per-class segmentation metrics: Dice, IoU and HD95, with a summary and a text table.

Dice and IoU come from ``monai.metrics.compute_dice`` / ``compute_iou``, HD95 from
``monai.metrics.compute_hausdorff_distance(percentile=95)``. The empty-mask conventions matter
clinically (a missed small lesion, a hallucinated one), so they are fixed here rather than left to
MONAI's defaults:

* prediction and target both empty: Dice 1, IoU 1, HD95 0 - correctly finding nothing is perfect.
* exactly one of them empty: Dice 0, IoU 0, HD95 NaN - a distance to nothing is undefined. The
  summary leaves these cases out of the HD95 mean but reports how many there were
  (``hd95_undefined``), so a model cannot look better by missing structures; Dice and IoU still
  count them as 0.

HD95 as MONAI defines it: the boundary of a mask is its foreground pixels that have a background
4-neighbour (6-neighbour in 3-D); for each boundary pixel of one mask, the Euclidean distance to
the nearest boundary pixel of the other is taken; HD95 is the larger of the two directed 95th
percentiles (linear interpolation). Some tools (e.g. medpy) instead take the 95th percentile of
both directions pooled, which can give a slightly different value. Distances are in pixels, or in
physical units (usually mm) when ``spacing`` is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from torch import Tensor

from medsegdiff_core.errors import ConfigError, DataError, MedSegDiffError

_METRICS = ("dice", "iou", "hd95")


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of B cases (images or volumes) and M classes.

    Attributes:
        dice: (B, M) float32 Dice coefficient, on the CPU.
        iou: (B, M) float32 intersection over union, on the CPU.
        hd95: (B, M) float32 95th-percentile Hausdorff distance in pixels or physical units, NaN
            where exactly one of prediction and target is empty; on the CPU.
        class_names: the M class names, in channel order.
    """

    dice: Tensor
    iou: Tensor
    hd95: Tensor
    class_names: tuple[str, ...]

    @property
    def num_cases(self) -> int:
        """Number of cases B."""
        return int(self.dice.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[CaseMetrics]) -> CaseMetrics:
        """Join the metrics of several batches (with the same classes) along the case axis."""
        if not parts:
            raise DataError("no metrics to concatenate")
        names = parts[0].class_names
        for part in parts[1:]:
            if part.class_names != names:
                raise DataError(f"metrics for classes {part.class_names} cannot join {names}")
        return cls(*(torch.cat([getattr(p, key) for p in parts]) for key in _METRICS), names)


def segmentation_metrics(
    pred: Tensor,
    target: Tensor,
    *,
    spacing: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> CaseMetrics:
    """Dice, IoU and HD95 of every case and class, following the module's empty-mask conventions.

    Args:
        pred: predicted masks, bool or {0, 1}, shape (B, M, H, W) or (B, M, D, H, W).
        target: reference masks of the same shape.
        spacing: pixel size per spatial axis, in tensor axis order (H, W) or (D, H, W); note that
            SimpleITK's ``GetSpacing()`` is in the reverse (x, y, z) order. None: 1 per pixel.
        class_names: M names; default ``class0``, ``class1``, ...

    Returns:
        :class:`CaseMetrics` with (B, M) ``dice``, ``iou`` and ``hd95``.
    """
    if pred.shape != target.shape:
        raise MedSegDiffError(
            f"prediction shape {tuple(pred.shape)} does not match target shape "
            f"{tuple(target.shape)}"
        )
    if pred.ndim not in (4, 5):
        raise DataError(
            f"masks must have shape (B, M, H, W) or (B, M, D, H, W), got {tuple(pred.shape)}"
        )
    p = _as_binary(pred, "prediction")
    t = _as_binary(target, "target")
    names = _class_names(class_names, p.shape[1])
    spatial_dims = p.ndim - 2
    if spacing is not None and len(spacing) != spatial_dims:
        raise DataError(f"spacing {tuple(spacing)} must give one value per spatial axis")

    # ignore_empty=False makes MONAI score empty-vs-empty as 1 and one-empty as 0, as documented.
    dice = compute_dice(p.float(), t.float(), include_background=True, ignore_empty=False)
    iou = compute_iou(p.float(), t.float(), include_background=True, ignore_empty=False)
    return CaseMetrics(
        dice=dice.float().cpu(),
        iou=iou.float().cpu(),
        hd95=_hd95(p, t, spacing),
        class_names=names,
    )


def summarize(metrics: CaseMetrics | Sequence[CaseMetrics]) -> dict[str, Any]:
    """Mean metrics per class and over classes, JSON-serialisable (None where undefined).

    Values are rounded to 6 decimals.

    HD95 means skip the undefined (NaN) cases; ``hd95_undefined`` counts them. The overall
    ``mean`` averages the per-class means (each class weighs the same, however large), with the
    HD95 mean taken over the classes that have one, and ``hd95_undefined`` summed over classes.

    Returns:
        ``{"num_cases": B, "per_class": {name: {"dice", "iou", "hd95", "hd95_undefined"}},
        "mean": {"dice", "iou", "hd95", "hd95_undefined"}}``.
    """
    m = metrics if isinstance(metrics, CaseMetrics) else CaseMetrics.concat(metrics)
    per_class: dict[str, dict[str, float | int | None]] = {}
    for j, name in enumerate(m.class_names):
        hd95 = m.hd95[:, j]
        per_class[name] = {
            "dice": _mean(m.dice[:, j]),
            "iou": _mean(m.iou[:, j]),
            "hd95": _mean(hd95[~hd95.isnan()]),
            "hd95_undefined": int(hd95.isnan().sum()),
        }
    overall: dict[str, float | int | None] = {
        key: _mean_of([c[key] for c in per_class.values()]) for key in _METRICS
    }
    overall["hd95_undefined"] = sum(int(c["hd95_undefined"] or 0) for c in per_class.values())
    return {"num_cases": m.num_cases, "per_class": per_class, "mean": overall}


def case_rows(
    metrics: CaseMetrics, case_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One JSON-serialisable row per case for :func:`format_table` or a results file.

    Returns:
        ``[{"case": name, "per_class": {class: {"dice", "iou", "hd95"}}}, ...]`` with ``hd95``
        None where undefined. Default case names are ``case0``, ``case1``, ...
    """
    names = (
        [f"case{i}" for i in range(metrics.num_cases)] if case_names is None else list(case_names)
    )
    if len(names) != metrics.num_cases:
        raise DataError(f"{len(names)} case names given for {metrics.num_cases} cases")
    return [
        {
            "case": case,
            "per_class": {
                cls: {key: _float(getattr(metrics, key)[i, j]) for key in _METRICS}
                for j, cls in enumerate(metrics.class_names)
            },
        }
        for i, case in enumerate(names)
    ]


def format_table(per_case_rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Plain-text table: one line per case, then the per-class means and undefined-HD95 notes.

    Args:
        per_case_rows: rows from :func:`case_rows`.
        summary: the matching output of :func:`summarize`.
    """
    classes = list(summary["per_class"])
    header = ["case"] + [f"{cls} {key}" for cls in classes for key in _METRICS]
    lines = [[row["case"]] + _cells(row["per_class"], classes) for row in per_case_rows]
    mean_line = ["mean"] + _cells(summary["per_class"], classes)
    uncertainty = summary.get("uncertainty")
    if uncertainty:  # the case uncertainty score beside the metrics (see reliability.py)
        header += [f"{cls} unc" for cls in classes]
        for line, row in zip(lines, per_case_rows, strict=True):
            line += [_fmt(row["uncertainty"][cls]["uncertainty_score"], 3) for cls in classes]
        mean_line += [_fmt(uncertainty[cls]["score_mean"], 3) for cls in classes]

    widths = [max(len(r[i]) for r in [header, *lines, mean_line]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    rule = "-" * len(render(header))
    out = [render(header), rule, *(render(r) for r in lines), rule, render(mean_line)]
    overall = summary["mean"]
    out.append(
        f"overall (mean of classes): dice {_fmt(overall['dice'], 4)}  "
        f"iou {_fmt(overall['iou'], 4)}  hd95 {_fmt(overall['hd95'], 2)}"
    )
    for cls in classes if uncertainty else ():
        u = uncertainty[cls]
        out.append(
            f"{cls} uncertainty: spearman(case score, dice) {_fmt(u['spearman_score_dice'], 3)} "
            f"(p {_fmt(u['spearman_p'], 3)})  pixel AUROC for errors {_fmt(u['pixel_auroc'], 3)}  "
            f"ECE {_fmt(u['ece'], 4)}"
        )
    for cls in classes:
        undefined = summary["per_class"][cls]["hd95_undefined"]
        if undefined:
            out.append(
                f"{cls}: hd95 undefined in {undefined} of {summary['num_cases']} cases "
                "(exactly one of prediction/target empty; left out of the hd95 mean)"
            )
    return "\n".join(out)


def _hd95(p: Tensor, t: Tensor, spacing: Sequence[float] | None) -> Tensor:
    """(B, M) HD95 on the CPU with the module's empty-mask conventions."""
    p_any = p.flatten(2).any(dim=-1)
    t_any = t.flatten(2).any(dim=-1)
    hd95 = torch.full(p_any.shape, math.nan, dtype=torch.float32)
    hd95[(~p_any & ~t_any).cpu()] = 0.0
    both = p_any & t_any
    if bool(both.any()):
        # Only pairs with two non-empty masks go to MONAI: it would warn and return inf or 0 for
        # the others, whose values are already fixed above. One call for all pairs keeps it short.
        pairs = both.nonzero(as_tuple=True)
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated get_mask_edges argument; the warning is noise.
            warnings.filterwarnings(
                "ignore", message=".*always_return_as_numpy", category=FutureWarning
            )
            distances = compute_hausdorff_distance(
                p[pairs].unsqueeze(1),
                t[pairs].unsqueeze(1),
                include_background=True,
                percentile=95,
                spacing=None if spacing is None else [float(s) for s in spacing],
            )
        hd95[tuple(i.cpu() for i in pairs)] = distances[:, 0].float().cpu()
    return hd95


def _class_names(class_names: Sequence[str] | None, m: int) -> tuple[str, ...]:
    if class_names is None:
        return tuple(f"class{j}" for j in range(m))
    if len(class_names) != m:
        raise ConfigError(f"{len(class_names)} class names given for {m} mask channels")
    return tuple(class_names)


def _as_binary(x: Tensor, name: str) -> Tensor:
    """``x`` as bool; other values are a user error (a forgotten threshold), not rounded."""
    if x.dtype == torch.bool:
        return x
    if not bool(((x == 0) | (x == 1)).all()):
        raise DataError(f"{name} masks must be binary (bool or 0/1), got other values")
    return x.bool()


def _cells(per_class: dict[str, dict[str, Any]], classes: list[str]) -> list[str]:
    return [
        _fmt(per_class[cls][key], 2 if key == "hd95" else 4) for cls in classes for key in _METRICS
    ]


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# Reported values are rounded: the float32 metrics carry noise past the 6th decimal
# (0.7 is stored as 0.69999999), which would only clutter JSON files.
_DECIMALS = 6


def _float(x: Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else round(value, _DECIMALS)


def _mean(x: Tensor) -> float | None:
    return None if x.numel() == 0 else round(float(x.double().mean()), _DECIMALS)


def _mean_of(values: list[Any]) -> float | None:
    defined = [v for v in values if v is not None]
    return round(sum(defined) / len(defined), _DECIMALS) if defined else None
