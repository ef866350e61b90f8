"""Figure builders every page shares: plain functions returning plotly figures or arrays.

No Streamlit here, so each builder can be unit-tested without a browser. Inputs are
counts and small arrays computed by qcore (never raw weights of a whole model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import plotly.graph_objects as go

FLOAT_COLOR = "#636efa"
COMPRESSED_COLOR = "#ef553b"
LEVEL_COLOR = "rgba(90, 90, 90, 0.45)"
CLIP_COLOR = "#d62728"
MAX_LEVEL_LINES = 64  # with more quantization levels than this, their lines are thinner


class HistogramLike(Protocol):
    """What :func:`weight_histogram_figure` reads (``qcore.Histogram`` has it)."""

    edges: np.ndarray
    before: np.ndarray
    after: np.ndarray
    levels: np.ndarray | None
    clip: tuple[float, float] | None
    zeros_after: int


def weight_histogram_figure(
    hist: HistogramLike, *, log_y: bool = False, title: str | None = None
) -> go.Figure:
    """Float and compressed weight counts overlaid on the same bins, with levels and clip."""
    edges = np.asarray(hist.edges, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2
    widths = np.diff(edges)
    before = np.asarray(hist.before)
    after = np.asarray(hist.after)
    fig = go.Figure()
    for counts, name, color in (
        (before, "float weights", FLOAT_COLOR),
        (after, "compressed weights", COMPRESSED_COLOR),
    ):
        fig.add_trace(
            go.Bar(
                x=centers,
                y=counts,
                width=widths,
                name=name,
                marker_color=color,
                opacity=0.55,
                hovertemplate="%{x:.4g}: %{y:,} weights<extra>" + name + "</extra>",
            )
        )

    levels = None if hist.levels is None else np.asarray(hist.levels, dtype=float)
    if levels is not None and levels.size:
        # one trace of vertical segments on a hidden [0, 1] axis: fast for 255 levels, and
        # independent of the count axis (linear or log)
        xs = np.repeat(levels, 3)
        xs[2::3] = np.nan
        ys = np.tile([0.0, 1.0, np.nan], levels.size)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                yaxis="y2",
                mode="lines",
                name=f"{levels.size} quantization levels",
                line={
                    "color": LEVEL_COLOR,
                    "width": 0.5 if levels.size > MAX_LEVEL_LINES else 1,
                    "dash": "dot",
                },
                hoverinfo="skip",
            )
        )
    if hist.clip is not None:
        lo, hi = hist.clip
        for v, label in ((lo, "clip low"), (hi, "clip high")):
            fig.add_shape(
                type="line",
                x0=v,
                x1=v,
                y0=0,
                y1=1,
                yref="paper",
                line={"color": CLIP_COLOR, "width": 2, "dash": "dash"},
            )
            fig.add_annotation(
                x=v,
                y=1,
                yref="paper",
                text=f"{label} {v:.3g}",
                showarrow=False,
                yanchor="bottom",
                font={"color": CLIP_COLOR},
            )
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                name="clip bounds",
                line={"color": CLIP_COLOR, "dash": "dash"},
            )
        )
    total = int(after.sum())
    zero_share = hist.zeros_after / total if total else 0.0
    fig.add_annotation(
        x=1,
        y=1,
        xref="paper",
        yref="paper",
        xanchor="right",
        yanchor="top",
        showarrow=False,
        text=f"{hist.zeros_after:,} weights exactly zero after ({zero_share:.1%})",
        bgcolor="rgba(255,255,255,0.7)",
    )
    fig.update_layout(
        title=title,
        barmode="overlay",
        bargap=0,
        xaxis_title="weight value",
        yaxis_title="weights per bin" + (" (log)" if log_y else ""),
        yaxis_type="log" if log_y else "linear",
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=380,
    )
    return fig


def confusion_figure(
    matrix: np.ndarray,
    classes: Sequence[str],
    *,
    reference: np.ndarray | None = None,
    title: str | None = None,
) -> go.Figure:
    """Confusion matrix heatmap (row = true class, column = predicted).

    With ``reference`` (the float model's matrix) it shows the change, red for fewer.
    """
    m = np.asarray(matrix)
    labels = [str(c) for c in classes]
    if reference is None:
        z, scale, mid, hover = m, "Blues", None, "true %{y}, predicted %{x}: %{z:,}"
    else:
        z = m - np.asarray(reference)
        scale, mid = "RdBu", 0
        hover = "true %{y}, predicted %{x}: %{z:+,} vs float"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            colorscale=scale,
            zmid=mid,
            texttemplate="%{z}",
            hovertemplate=hover + "<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="predicted class",
        yaxis_title="true class",
        yaxis_autorange="reversed",
        xaxis={"type": "category"},
        yaxis={"type": "category"},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=460,
    )
    return fig


def display_images(
    x: np.ndarray, mean: Sequence[float], std: Sequence[float], *, min_size: int = 84
) -> list[np.ndarray]:
    """Normalised images (K, C, H, W) back to pixels in [0, 1], enlarged for display.

    Grey images become (H', W'), colour ones (H', W', C); each side is repeated (nearest
    neighbour) by a whole factor so that it is at least ``min_size`` pixels, when it is smaller.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"Images must be (K, C, H, W); got shape {x.shape}.")
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    pix = np.clip(x * s + m, 0.0, 1.0)
    factor = max(1, -(-min_size // max(x.shape[2], 1)))
    if factor > 1:
        pix = pix.repeat(factor, axis=2).repeat(factor, axis=3)
    out = pix[:, 0] if pix.shape[1] == 1 else pix.transpose(0, 2, 3, 1)
    return list(out)
