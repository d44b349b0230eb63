"""The training-history plot of a federated run: ``training-history.png``.

One PNG, drawn from the run's history (:class:`~medsegdiff_core.records.RoundRecord`) with
matplotlib's Agg canvas (no display, no pyplot state), in panels stacked over the rounds:

1. train loss per round: each site's (``site_train``) and the global value, the average
   weighted by the sites' examples (``train``);
2. validation Dice per round: each site's federated evaluation (``site_evaluate``) and the
   weighted global Dice (``evaluate``);
3. only when some site trained under DP: the epsilon each site had spent after each round
   (``privacy[site].epsilon``), with each site's budget (``target_epsilon``) dotted.

A site keeps its colour in every panel; failed rounds (the model kept) are shaded grey. A value
that was not measured (a failed round, a round without evaluation) or is not finite is left
out, so a diverged site leaves a gap rather than breaking the plot. The server writes the plot
into the run folder after every committed round and signs it into the release; ``report.html``
shows the release's copy.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes
from .records import RoundRecord

_WIDTH_IN = 9.0
_PANEL_HEIGHT_IN = 3.0
_DPI = 100
_GLOBAL = "global (weighted)"


def _finite(value: float | int | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sites(history: Sequence[RoundRecord]) -> list[str]:
    names: set[str] = set()
    for record in history:
        names.update(record.site_train)
        names.update(record.site_evaluate or {})
        names.update(record.privacy)
    return sorted(names)


def _epsilon_sites(history: Sequence[RoundRecord]) -> list[str]:
    return sorted(
        {
            site
            for record in history
            for site, privacy in record.privacy.items()
            if privacy.enabled and _finite(privacy.epsilon) is not None
        }
    )


def _site_dice(record: RoundRecord, site: str) -> float | None:
    metrics = (record.site_evaluate or {}).get(site)
    return None if metrics is None else metrics.dice


def training_history_png(history: Sequence[RoundRecord]) -> bytes:
    """The plot of ``history`` as PNG bytes (see the module docstring for what it shows).

    Raises whatever matplotlib raises on values it cannot lay out (e.g. losses of ±1e308):
    the caller decides whether that matters (the server logs it and trains on).
    """
    with np.errstate(all="ignore"):  # such values fail as one error, not a warning storm first
        return _render(history)


def _render(history: Sequence[RoundRecord]) -> bytes:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history = sorted(history, key=lambda r: r.round)
    sites = _sites(history)
    dp_sites = _epsilon_sites(history)
    panels = 3 if dp_sites else 2
    figure = Figure(figsize=(_WIDTH_IN, _PANEL_HEIGHT_IN * panels), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    cycle = colormaps["tab10"]
    colour = {site: cycle(i % 10) for i, site in enumerate(sites)}
    rounds = [r.round for r in history]

    def series(ax, label: str, value: Callable[[RoundRecord], float | int | None], **style) -> None:
        points = [(r.round, v) for r in history if (v := _finite(value(r))) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, label=label, **style)

    loss_ax, dice_ax = axes[0], axes[1]
    for site in sites:
        series(
            loss_ax,
            site,
            lambda r, s=site: r.site_train[s].train_loss if s in r.site_train else None,
            color=colour[site],
            linewidth=1.2,
        )
        series(
            dice_ax,
            site,
            lambda r, s=site: _site_dice(r, s),
            color=colour[site],
            linewidth=1.2,
        )
    global_style = {"color": "black", "linewidth": 2.4}
    series(loss_ax, _GLOBAL, lambda r: r.train.train_loss, **global_style)
    series(dice_ax, _GLOBAL, lambda r: r.evaluate.dice, **global_style)
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("Train loss per round")
    dice_ax.set_ylabel("validation Dice")
    dice_ax.set_title("Validation Dice per round (federated evaluation)")

    if dp_sites:
        eps_ax = axes[2]
        for site in dp_sites:
            series(
                eps_ax,
                site,
                lambda r, s=site: (
                    r.privacy[s].epsilon if s in r.privacy and r.privacy[s].enabled else None
                ),
                color=colour[site],
                linewidth=1.2,
            )
            budgets = [
                b
                for r in history
                if site in r.privacy and (b := _finite(r.privacy[site].target_epsilon))
            ]
            if budgets:
                eps_ax.axhline(
                    budgets[-1],
                    color=colour[site],
                    linestyle=":",
                    linewidth=1.2,
                    label=f"{site} budget",
                )
        eps_ax.set_ylabel("epsilon spent")
        eps_ax.set_title("Epsilon spent per site (DP-SGD, cumulative)")

    failed = [r.round for r in history if r.failed]
    for ax in axes:
        for n in failed:
            ax.axvspan(n - 0.5, n + 0.5, color="0.85", zorder=0)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.has_data() and ax.get_legend_handles_labels()[0]:
            if failed and ax is axes[0]:
                ax.axvspan(0, 0, color="0.85", label="failed round")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        else:
            ax.text(
                0.5,
                0.5,
                "nothing measured yet",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.4",
            )
    axes[-1].set_xlabel("round")
    if rounds:
        axes[-1].set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def training_history_plot(history: Sequence[RoundRecord], path: Path) -> Path:
    """Write :func:`training_history_png` of ``history`` to ``path`` (atomically); returns it."""
    path = Path(path)
    atomic_write_bytes(path, training_history_png(history))
    return path
