"""Figure builders every page shares: plain functions returning plotly figures or arrays.

No Streamlit here, so each builder can be unit-tested without a browser. Inputs are
counts and small arrays computed by qcore (never raw weights of a whole model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from pages.tables import format_bytes

FLOAT_COLOR = "#636efa"
COMPRESSED_COLOR = "#ef553b"
LEVEL_COLOR = "rgba(90, 90, 90, 0.45)"
CLIP_COLOR = "#d62728"
REQUESTED_COLOR = "rgba(148, 103, 189, 0.8)"  # the clip range asked for, when the grid differs
MAX_LEVEL_LINES = 64  # with more quantization levels than this, their lines are thinner


class HistogramLike(Protocol):
    """What :func:`weight_histogram_figure` reads (``qcore.Histogram`` has it)."""

    edges: np.ndarray
    before: np.ndarray
    after: np.ndarray
    levels: np.ndarray | None
    clip: tuple[float, float] | None  # the grid's effective range (its end levels)
    zeros_after: int
    requested: tuple[float, float] | None  # the clip range asked for
    shared: int | None  # a k-means layer: how many levels are shared values


GRID_RANGE_LABEL = "grid range (what the codes reach)"


def level_label(n: int, shared: int | None = None) -> str:
    """The legend of ``n`` quantization levels; 3 levels (-a, 0, +a) are ternary; a k-means
    layer's levels are its ``shared`` values, and 0 where pruned if there is one more.

    >>> level_label(3), level_label(2), level_label(255)
    ('3 quantization levels (ternary)', '2 quantization levels (binary)', '255 quantization levels')
    >>> level_label(8, shared=8), level_label(9, shared=8)
    ('8 shared values (k-means)', '8 shared values (k-means) and 0 (pruned)')
    """
    if shared is not None:
        return f"{shared} shared values (k-means)" + (" and 0 (pruned)" if n > shared else "")
    kind = {2: " (binary)", 3: " (ternary)"}.get(n, "")
    return f"{n} quantization levels{kind}"


def _vline(fig: go.Figure, x: float, color: str, width: float, dash: str) -> None:
    """A vertical line at ``x`` across the whole plot height."""
    fig.add_shape(type="line", x0=x, x1=x, y0=0, y1=1, yref="paper",
                  line={"color": color, "width": width, "dash": dash})


def weight_histogram_figure(
    hist: HistogramLike,
    *,
    log_y: bool = False,
    title: str | None = None,
    noun: str = "weights",
    names: tuple[str, str] = ("float weights", "compressed weights"),
    requested_label: str = "clip range asked for",
) -> go.Figure:
    """Float and compressed weight counts overlaid on the same bins, with levels and clip.

    The same figure draws an activation edge (``qcore.activation_histogram``): ``noun``
    names what is counted, ``names`` the two bar series and ``requested_label`` the range
    asked for (the calibrated range there)."""
    edges = np.asarray(hist.edges, dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2
    widths = np.diff(edges)
    before = np.asarray(hist.before)
    after = np.asarray(hist.after)
    fig = go.Figure()
    for counts, name, color in (
        (before, names[0], FLOAT_COLOR),
        (after, names[1], COMPRESSED_COLOR),
    ):
        fig.add_trace(
            go.Bar(
                x=centers,
                y=counts,
                width=widths,
                name=name,
                marker_color=color,
                opacity=0.55,
                hovertemplate="%{x:.4g}: %{y:,} " + noun + "<extra>" + name + "</extra>",
            )
        )

    _draw_levels(fig, hist)
    if hist.clip is not None:
        _draw_grid_range(fig, hist.clip)
    asked = hist.requested
    if asked is not None and not np.allclose(asked, hist.clip or (np.nan, np.nan), rtol=1e-6):
        _draw_requested(fig, asked, requested_label)
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
        text=f"{hist.zeros_after:,} {noun} exactly zero after ({zero_share:.1%})",
        bgcolor="rgba(255,255,255,0.7)",
    )
    fig.update_layout(
        title=title,
        barmode="overlay",
        bargap=0,
        xaxis_title=f"{noun.removesuffix('s')} value",
        yaxis_title=f"{noun} per bin" + (" (log)" if log_y else ""),
        yaxis_type="log" if log_y else "linear",
        yaxis_dtick=1 if log_y else None,  # a log axis labels decades only: 1, 10, 100
        # the bins' own span, with several labels (an activation edge's range is narrow)
        xaxis={"range": [float(edges[0]), float(edges[-1])], "nticks": 9},
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        # below the tick labels and the axis title: at -0.2 its row covered the labels
        # (the Activations tab showed one label of its x axis)
        legend={"orientation": "h", "y": -0.4, "yanchor": "top"},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=380,
    )
    return fig


def _draw_levels(fig: go.Figure, hist: HistogramLike) -> None:
    """The quantization levels (or k-means shared values) as dotted vertical lines."""
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
                name=level_label(levels.size, hist.shared),
                line={
                    "color": LEVEL_COLOR,
                    "width": 0.5 if levels.size > MAX_LEVEL_LINES else 1,
                    "dash": "dot",
                },
                hoverinfo="skip",
            )
        )


def _legend_line(fig: go.Figure, name: str, color: str, dash: str) -> None:
    """A legend entry for lines drawn as shapes (shapes have none): an empty line trace."""
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name,
                             line={"color": color, "dash": dash}))  # fmt: skip


def _draw_grid_range(fig: go.Figure, clip: tuple[float, float]) -> None:
    """The grid's effective range: dashed lines at its ends, labelled, and a legend entry."""
    # qcore.layer_histogram gives the grid's effective range here: the values the codes
    # reach (the clip range after rounding the scale and zero point)
    lo, hi = clip
    for v, label in ((lo, "grid low"), (hi, "grid high")):
        _vline(fig, v, CLIP_COLOR, 2, "dash")
        fig.add_annotation(
            x=v,
            y=1,
            yref="paper",
            text=f"{label} {v:.3g}",
            showarrow=False,
            yanchor="bottom",
            font={"color": CLIP_COLOR},
        )
    _legend_line(fig, GRID_RANGE_LABEL, CLIP_COLOR, "dash")


def _draw_requested(fig: go.Figure, asked: tuple[float, float], label: str) -> None:
    """The clip range asked for, where rounding (asymmetric zero point) or 1 bit (the grid
    is +-alpha inside it) makes the grid differ from it."""
    for v in asked:
        _vline(fig, v, REQUESTED_COLOR, 1.5, "dot")
    _legend_line(fig, f"{label} [{asked[0]:.3g}, {asked[1]:.3g}]", REQUESTED_COLOR, "dot")


def row_percent(matrix: np.ndarray) -> np.ndarray:
    """Each row as percentages of its sum (a true class's test images); 0 for an empty row.

    >>> row_percent(np.array([[3, 1], [0, 0]])).tolist()
    [[75.0, 25.0], [0.0, 0.0]]
    """
    m = np.asarray(matrix, dtype=float)
    return 100 * m / np.maximum(m.sum(axis=1, keepdims=True), 1)


CONFUSION_SCALE_TITLE = "% of the true class's images (each row sums to 100)"


def confusion_figure(
    matrix: np.ndarray,
    classes: Sequence[str],
    *,
    reference: np.ndarray | None = None,
    title: str | None = None,
) -> go.Figure:
    """Confusion matrix heatmap (row = true class, column = predicted), in row percentages:
    each cell is the share of that true class's test images predicted as the column's
    class, so classes of different sizes compare; the counts are in the hover.

    With ``reference`` (the float model's matrix) it shows the change in percentage points,
    red for fewer.
    """
    m = np.asarray(matrix)
    labels = [str(c) for c in classes]
    pct = row_percent(m)
    if reference is None:
        z, scale, mid, counts = pct, "Blues", None, m
        hover = "true %{y}, predicted %{x}: %{z:.1f} % of the row (%{customdata:,} images)"
        bar = CONFUSION_SCALE_TITLE
    else:
        ref = np.asarray(reference)
        z, counts = pct - row_percent(ref), m - ref
        scale, mid = "RdBu", 0
        hover = ("true %{y}, predicted %{x}: %{z:+.1f} pts of the row vs float "
                 "(%{customdata:+,} images)")  # fmt: skip
        bar = "change in % of the true class's images (pts)"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            colorscale=scale,
            zmid=mid,
            customdata=counts,
            texttemplate="%{z:.0f}" if reference is None else "%{z:+.0f}",
            hovertemplate=hover + "<extra></extra>",
            colorbar={"title": {"text": bar, "side": "right"}},
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="predicted class",
        yaxis_title="true class (each row: % of its images)",
        yaxis_autorange="reversed",
        xaxis={"type": "category"},
        yaxis={"type": "category"},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=460,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Trade-offs, layer sensitivity and mixed precision.

CURRENT_COLOR = "#111111"
FRONT_COLOR = "rgba(40, 40, 40, 0.7)"
EXTRA_SYMBOLS = ("diamond", "square", "triangle-up", "cross")


def config_label(row: Mapping[str, Any]) -> str:
    """One sweep row as a short line, e.g. ``4 bits · clip 1 · prune 0.5 · symmetric``."""
    bits = row.get("bits")
    if bits is None or (isinstance(bits, float) and math.isnan(bits)) or bits is pd.NA:
        parts = ["float32"]
    else:
        parts = [f"{int(bits)} bits"]
        clip, mode = row.get("clip"), row.get("clip_mode") or "ratio"
        if clip is not None and not (isinstance(clip, float) and math.isnan(clip)):
            parts.append(f"clip {clip:g}" + ("" if mode == "ratio" else f" ({mode})"))
        parts += [str(row.get("scheme", "")), str(row.get("granularity", ""))]
        if row.get("rounding") == "adaround":
            parts.append("AdaRound")
        if row.get("equalize") is True:
            parts.append("equalized")
    if row.get("bias_correction") is True:
        parts.append("bias corrected")
    parts.append(f"prune {float(row.get('prune', 0.0)):g}")
    abits = row.get("act_bits")
    if abits is not None and abits is not pd.NA and not (isinstance(abits, float)
                                                         and math.isnan(abits)):  # fmt: skip
        parts.append(f"activations {int(abits)} bits")
    return " · ".join(p for p in parts if p)


def _hover(row: Mapping[str, Any]) -> str:
    ratio = row.get("ratio")
    tail = f" · {ratio:.1f}x smaller" if ratio is not None and math.isfinite(ratio) else ""
    return (
        f"{config_label(row)}<br>accuracy {row['accuracy']:.2%} (simulated) · "
        f"{format_bytes(row['size_bytes'])} packed{tail}"
    )


def _group_label(row: Mapping[str, Any], color_by: str) -> str:
    if color_by == "prune":
        return f"prune {float(row['prune']):g}"
    if row.get("scheme") == "float":
        return "float32"
    return f"{row.get('scheme')}, {row.get('granularity')}"


def tradeoff_figure(
    df: pd.DataFrame,
    front: pd.DataFrame | None = None,
    current: Mapping[str, Any] | None = None,
    extra: Sequence[Mapping[str, Any]] | None = None,
    *,
    color_by: str | None = None,
    float_accuracy: float | None = None,
    budget_bytes: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Accuracy against packed size (kB, log axis): one marker per sweep row.

    ``df`` has the columns of ``qcore.sweep`` (``size_bytes``, ``accuracy``, ``bits``,
    ``prune``, ``scheme``, ...). Points are coloured by pruning rate (``color_by="prune"``,
    the default when the rates differ) or by scheme and granularity (``"scheme"``).
    ``front`` (rows of ``df``, sorted by size) is drawn as a line; ``current`` (a mapping
    with ``size_bytes``, ``accuracy`` and ``label``) as a star; each of ``extra`` (the same,
    plus ``name``) as a marker of its own; ``budget_bytes`` as a vertical line.
    """
    if color_by is None:
        color_by = "prune" if df["prune"].nunique() > 1 else "scheme"
    if color_by not in ("prune", "scheme"):
        raise ValueError(f"color_by must be 'prune' or 'scheme'; got {color_by!r}.")
    rows = df.to_dict("records")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_label(row, color_by), []).append(row)
    fig = go.Figure()
    for name, members in groups.items():
        fig.add_trace(
            go.Scatter(
                x=[r["size_bytes"] / 1e3 for r in members],
                y=[r["accuracy"] for r in members],
                mode="markers",
                name=name,
                marker={"size": 10, "opacity": 0.85, "line": {"width": 0.5, "color": "white"}},
                text=[_hover(r) for r in members],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    if front is not None and len(front):
        fig.add_trace(
            go.Scatter(
                x=(front["size_bytes"] / 1e3).tolist(),
                y=front["accuracy"].tolist(),
                mode="lines",
                name="Pareto front",
                line={"color": FRONT_COLOR, "width": 2, "dash": "dot"},
                hoverinfo="skip",
            )
        )
    for i, point in enumerate(extra or ()):
        fig.add_trace(
            go.Scatter(
                x=[point["size_bytes"] / 1e3],
                y=[point["accuracy"]],
                mode="markers",
                name=str(point.get("name", "extra")),
                marker={
                    "size": 16,
                    "symbol": point.get("symbol", EXTRA_SYMBOLS[i % len(EXTRA_SYMBOLS)]),
                    "color": point.get("color", COMPRESSED_COLOR),
                    "line": {"width": 1, "color": "black"},
                },
                text=[f"{point.get('label', '')}<br>accuracy {point['accuracy']:.2%} · "
                      f"{format_bytes(point['size_bytes'])} packed"],
                hovertemplate="%{text}<extra>" + str(point.get("name", "")) + "</extra>",
            )
        )  # fmt: skip
    if current is not None:
        fig.add_trace(
            go.Scatter(
                x=[current["size_bytes"] / 1e3],
                y=[current["accuracy"]],
                mode="markers",
                name="Playground setting",
                # an open star: the sweep points it sits on stay visible inside it
                marker={"size": 22, "symbol": "star-open", "color": CURRENT_COLOR,
                        "line": {"width": 2.5, "color": CURRENT_COLOR}},
                text=[f"Playground: {current.get('label', '')}<br>accuracy "
                      f"{current['accuracy']:.2%} · {format_bytes(current['size_bytes'])} packed"],
                hovertemplate="%{text}<extra></extra>",
            )
        )  # fmt: skip
    if float_accuracy is not None and math.isfinite(float_accuracy):
        fig.add_hline(
            y=float_accuracy,
            line={"color": FLOAT_COLOR, "dash": "dash", "width": 1},
            annotation_text=f"float32 {float_accuracy:.1%}",
            annotation_position="bottom right",
        )
    if budget_bytes is not None:
        # a line trace, not a shape: it sits in data units on the log axis, like the points
        fig.add_trace(
            go.Scatter(
                x=[budget_bytes / 1e3] * 2,
                y=[0, 1],
                mode="lines",
                name=f"budget {format_bytes(budget_bytes)}",
                line={"color": CLIP_COLOR, "dash": "dash", "width": 1},
                hovertemplate=f"budget {format_bytes(budget_bytes)}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        # labels at 1, 2 and 5 of each decade, not every digit ("2 3 4 … 10 2 3 …")
        xaxis={"title": "packed size (kB, log scale)", "type": "log", "dtick": "D2"},
        yaxis={"title": "accuracy (simulated, test split)", "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=480,
    )
    return fig


def latency_figure(
    df: pd.DataFrame, latency: pd.DataFrame, *, title: str | None = None
) -> go.Figure:
    """Accuracy against measured latency: only the sweep rows (``df``) that ran in a real
    runtime (``latency``, from ``qcore.onnx.sweep_latency``, row by row); the others are
    left out, never drawn at a latency they did not have. A dotted line marks the float
    model in ONNX Runtime (``latency.attrs["float_ms"]``)."""
    timed = latency["runtime"].notna().to_numpy()
    rows = df[timed].to_dict("records")
    lat = latency[timed].to_dict("records")
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["latency_ms"] for r in lat],
            y=[r["accuracy"] for r in rows],
            mode="markers",
            name="int8 ONNX Runtime (measured)",
            marker={"size": 11, "color": COMPRESSED_COLOR, "line": {"width": 0.5,
                                                                      "color": "white"}},
            text=[f"{config_label(r)}<br>accuracy {r['accuracy']:.2%} "
                  f"(simulated) · {t['latency_ms']:.2f} ms (p90 {t['latency_p90_ms']:.2f})"
                  for r, t in zip(rows, lat, strict=True)],
            hovertemplate="%{text}<extra></extra>",
        )
    )  # fmt: skip
    float_ms = latency.attrs.get("float_ms")
    if float_ms is not None:
        fig.add_vline(x=float_ms, line={"color": FLOAT_COLOR, "dash": "dot", "width": 1},
                      annotation_text=f"float32 in ONNX Runtime {float_ms:.2f} ms",
                      annotation_position="top right")  # fmt: skip
    batch = latency.attrs.get("batch_size", 1)
    fig.update_layout(
        title=title,
        xaxis={"title": f"latency, ms per forward pass at batch {batch} (median, measured)"},
        yaxis={"title": "accuracy (simulated, test split)", "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=420,
    )
    return fig


def sensitivity_heatmap(matrix: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Layers (rows, model order) x bit widths of the accuracy drop, in percentage points.

    ``matrix`` is ``qcore.sensitivity_matrix(table, "quant", "drop")`` (drops as fractions).
    """
    z = np.asarray(matrix.to_numpy(dtype=float)) * 100
    x = [f"{float(s):g} bits" for s in matrix.columns]
    y = [str(n) for n in matrix.index]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            colorscale="Reds",
            zmin=0,
            texttemplate="%{z:.1f}",
            colorbar={"title": "drop (pts)"},
            hovertemplate="%{y} alone at %{x}: accuracy drop %{z:.1f} pts<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "bit width of that layer (the others stay float)", "type": "category"},
        yaxis={"title": "layer", "type": "category", "autorange": "reversed"},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=max(260, 60 + 48 * len(y)),
    )
    return fig


def sqnr_bars(df: pd.DataFrame, bits: int, *, title: str | None = None) -> go.Figure:
    """Per-layer SQNR (dB) at one bit width, from a ``qcore.layer_sensitivity`` table."""
    part = df[(df["kind"] == "quant") & (df["setting"] == float(bits))].sort_values("index")
    sqnr = part["sqnr_db"].to_numpy(dtype=float)
    shown = np.where(np.isfinite(sqnr), sqnr, np.nan)  # inf = unchanged: no bar
    fig = go.Figure(
        go.Bar(
            x=part["layer"].astype(str).tolist(),
            y=shown,
            marker_color=COMPRESSED_COLOR,
            text=[f"{v:.1f}" if np.isfinite(v) else "∞" for v in sqnr],
            textposition="outside",
            customdata=part["params"].to_numpy(),
            hovertemplate="%{x}: %{y:.1f} dB (%{customdata:,} params)<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "layer", "type": "category"},
        yaxis={"title": f"SQNR at {bits} bits (dB)"},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=360,
    )
    return fig


def prune_curves(
    df: pd.DataFrame, *, float_accuracy: float | None = None, title: str | None = None
) -> go.Figure:
    """Accuracy against the pruning rate of one layer (the others untouched), a line each.

    With ``float_accuracy`` every curve starts at rate 0 from the float model's accuracy.
    """
    part = df[df["kind"] == "prune"].sort_values(["index", "setting"])
    fig = go.Figure()
    for layer, rows in part.groupby("layer", sort=False):
        x, y = rows["setting"].tolist(), rows["accuracy"].tolist()
        if float_accuracy is not None:
            x, y = [0.0, *x], [float_accuracy, *y]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=str(layer),
                hovertemplate=f"{layer} pruned %{{x:.0%}}: accuracy %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis={"title": "pruning rate of that layer", "tickformat": ".0%"},
        yaxis={"title": "accuracy (simulated, test split)", "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=380,
    )
    return fig


def bits_colors(bits: Sequence[int], lo: int = 1, hi: int = 8) -> list[str]:
    """One Viridis colour per bit width (``lo`` dark purple to ``hi`` yellow), as CSS strings.

    >>> bits_colors([1, 8])
    ['rgb(68, 1, 84)', 'rgb(253, 231, 37)']
    """
    at = [min(max((b - lo) / (hi - lo), 0.0), 1.0) for b in bits]
    return list(sample_colorscale("Viridis", at)) if at else []


def bits_bars(
    layer_bits: Mapping[str, int], params: Mapping[str, int], *, title: str | None = None
) -> go.Figure:
    """The bit width chosen for each layer (model order), with the layer's parameter count."""
    names = list(layer_bits)
    bits = [int(layer_bits[n]) for n in names]
    counts = [int(params.get(n, 0)) for n in names]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=bits,
            # colours as strings: plotly.js reads a bar's numbers-as-colours for its text too
            # and logs "Invalid color specifier" for each (the browser console filled up)
            marker={"color": bits_colors(bits)},
            text=[f"{b} bits" for b in bits],
            textposition="outside",
            customdata=counts,
            hovertemplate="%{x}: %{y} bits, %{customdata:,} params<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={
            "title": "layer",
            "type": "category",
            "tickvals": names,
            "ticktext": [f"{n}<br>{c:,} params" for n, c in zip(names, counts, strict=True)],
        },
        yaxis={"title": "bits per weight", "dtick": 1, "range": [0, max(bits, default=8) + 1.5]},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=340,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Teaching: where a layer's squared error comes from.

CLIP_ERROR_COLOR = "rgba(214, 39, 40, 0.45)"  # the part of the error clipping makes
ROUNDING_ERROR_COLOR = "rgba(99, 110, 250, 0.45)"  # the part rounding makes
OPTIMUM_COLOR = "#2ca02c"


class ErrorCurveLike(Protocol):
    """What :func:`clip_error_figure` reads (``qcore.teach.ErrorCurve`` has it)."""

    table: pd.DataFrame  # columns c, clip_error, rounding_error, total; one row per threshold
    current: tuple[float, float]  # (c, total) of the current setting
    optimum: tuple[float, float]  # (c, total) with the least total error
    max_abs: float  # max|w|: no clipping from there on (drawn when the curve has it)


def clip_error_figure(
    curve: ErrorCurveLike,
    *,
    x_title: str = "clip threshold c",
    log_y: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Total squared error against the clip threshold, stacked from its clipping part (weights
    beyond the range, cut to it) and its rounding part (weights inside, rounded to a level),
    with the current threshold and the least-error one marked."""
    t = curve.table.sort_values("c")
    c = t["c"].to_numpy(dtype=float)
    fig = go.Figure()
    for col, name, color in (
        ("clip_error", "clipping error (weights cut to the range)", CLIP_ERROR_COLOR),
        ("rounding_error", "rounding error (weights inside, rounded)", ROUNDING_ERROR_COLOR),
    ):
        fig.add_trace(
            go.Scatter(
                x=c,
                y=t[col].to_numpy(dtype=float),
                name=name,
                mode="lines",
                stackgroup="error",
                line={"width": 0.5, "color": color},
                fillcolor=color,
                hovertemplate="c = %{x:.4g}: %{y:.4g}<extra>" + name.split(" (")[0] + "</extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=c,
            y=t["total"].to_numpy(dtype=float),
            name="total squared error",
            mode="lines",
            line={"width": 2, "color": CURRENT_COLOR},
            hovertemplate="c = %{x:.4g}: total %{y:.4g}<extra></extra>",
        )
    )
    left = min(curve.current[0], curve.optimum[0])
    same = math.isclose(curve.current[0], curve.optimum[0], rel_tol=1e-6)
    for (x, y), name, color, symbol in (
        (curve.current, "now", CLIP_COLOR, "circle"),
        (curve.optimum, "least error (mse)", OPTIMUM_COLOR, "star"),
    ):
        label = f"{name}: c = {x:.3g}"
        # the left one's label left of its line, the other's right: apart when close
        side = "left" if x == left and not same else "right"
        if not (same and symbol == "star"):  # one line, one label when they coincide
            fig.add_vline(
                x=x,
                line={"color": color, "dash": "dash", "width": 1.5},
                annotation_text=f"now = least error: c = {x:.3g}" if same else label,
                annotation_position=f"top {side}",
                annotation_font_color=color,
                annotation_bgcolor="rgba(255, 255, 255, 0.8)",
            )
        fig.add_trace(
            go.Scatter(
                x=[x],
                y=[y],
                mode="markers",
                name=label,
                marker={"size": 14 if symbol == "star" else 11, "color": color,
                        "symbol": symbol, "line": {"width": 1, "color": "white"}},
                hovertemplate=f"{label}<br>total squared error %{{y:.4g}}<extra></extra>",
            )
        )  # fmt: skip
    max_abs = getattr(curve, "max_abs", None)
    if max_abs is not None:  # beyond it nothing is clipped: the clipping part is 0
        fig.add_vline(
            x=max_abs,
            line={"color": LEVEL_COLOR, "dash": "dot", "width": 1},
            annotation_text="max|w|",
            annotation_position="top",
        )
    total = t["total"].to_numpy(dtype=float)
    near = total[c >= curve.optimum[0] / 2]  # from half the best c on: the valley and after
    top = 1.25 * max([*near, curve.current[1], curve.optimum[1]])
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title="squared error, summed over the layer" + (" (log)" if log_y else ""),
        yaxis_type="log" if log_y else "linear",
        yaxis_dtick=1 if log_y else None,  # decades only
        # linear: the valley fills the plot (tiny c clips so much it would squash it; a
        # double click shows everything)
        yaxis_range=None if log_y or not math.isfinite(top) or top <= 0 else [0, top],
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=420,
        hovermode="x unified",
    )
    return fig


# --- the Fine-tune page: training curves ------------------------------------------------------
LOSS_COLOR = "#636efa"
TRAIN_ACC_COLOR = "#ef553b"
CALIB_ACC_COLOR = "#00a36c"


def training_curves(
    history: pd.DataFrame, *, total_steps: int | None = None, title: str | None = None
) -> go.Figure:
    """Loss (left) and accuracy (right) against the training step, from a
    ``qcore.finetune`` history (or the rows streamed so far): the training batches' loss and
    accuracy each logged step, and the calibration split's accuracy at each epoch's end.
    ``total_steps`` fixes the x range, so live curves grow into the frame.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss (training batches)", "Accuracy"),
                        horizontal_spacing=0.1)  # fmt: skip
    h = history if len(history) else pd.DataFrame(columns=["step", "loss", "train_accuracy"])
    step = h["step"].to_numpy(dtype=float)
    fig.add_trace(go.Scatter(x=step, y=h["loss"].to_numpy(dtype=float), mode="lines",
                             name="loss", line={"color": LOSS_COLOR},
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"),
                  row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(x=step, y=100 * h["train_accuracy"].to_numpy(dtype=float),
                             mode="lines", name="training batches",
                             line={"color": TRAIN_ACC_COLOR},
                             hovertemplate="step %{x}<br>%{y:.1f} %<extra>training batches"
                                           "</extra>"),
                  row=1, col=2)  # fmt: skip
    if "calib_accuracy" in h:
        ends = h[h["calib_accuracy"].notna()]
        fig.add_trace(go.Scatter(x=ends["step"].to_numpy(dtype=float),
                                 y=100 * ends["calib_accuracy"].to_numpy(dtype=float),
                                 mode="lines+markers", name="calibration split (epoch end)",
                                 line={"color": CALIB_ACC_COLOR, "dash": "dot"},
                                 marker={"size": 9, "symbol": "diamond"},
                                 hovertemplate="step %{x}<br>%{y:.1f} %<extra>calibration "
                                               "split</extra>"),
                      row=1, col=2)  # fmt: skip
    x_range = None if not total_steps else [0, max(int(total_steps), 1)]
    fig.update_xaxes(title_text="step (batches)", range=x_range)
    # with distillation the loss mixes the KL term with cross-entropy: "training loss"
    fig.update_yaxes(title_text="training loss", row=1, col=1, rangemode="tozero")
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=2)
    fig.update_layout(
        title=title,
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 60 if title else 40, "b": 10, "l": 10, "r": 10},
        height=380,
    )
    return fig


# --- the Deep Compression page: bytes stage by stage ------------------------------------------
DEEP_BAR_COLOR = "#636efa"
DEEP_SAVED_COLOR = "#00a36c"
DEEP_ACC_COLOR = "#ef553b"


def deep_waterfall(stages: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The paper's picture: packed bytes from float through each stage, as a waterfall
    (each stage's bar is what it saved), with the accuracy after each stage on the right
    axis. ``stages`` is ``qcore.deep_compression(...).stages`` (stage, label, size_bytes,
    ratio, accuracy)."""
    sizes = stages["size_bytes"].to_numpy(dtype=float)
    acc = 100 * stages["accuracy"].to_numpy(dtype=float)
    labels = [str(s) for s in stages["label"]]
    ratios = stages["ratio"].to_numpy(dtype=float)
    x = [*labels, "final"]
    measure = ["absolute", *["relative"] * (len(sizes) - 1), "total"]
    y = [sizes[0], *np.diff(sizes), 0.0]
    text = [format_bytes(sizes[0])]
    text += [f"−{format_bytes(-d)}" if d < 0 else "±0 B" for d in np.diff(sizes)]
    text += [f"{format_bytes(sizes[-1])} ({ratios[-1]:.1f}x)"]
    fig = go.Figure()
    fig.add_trace(go.Waterfall(
        x=x, y=y, measure=measure, text=text, textposition="outside", name="packed bytes",
        increasing={"marker": {"color": DEEP_ACC_COLOR}},
        decreasing={"marker": {"color": DEEP_SAVED_COLOR}},
        totals={"marker": {"color": DEEP_BAR_COLOR}},
        connector={"line": {"color": "rgba(90, 90, 90, 0.5)", "dash": "dot"}},
        hovertemplate="%{x}<br>%{text}<extra></extra>",
    ))  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[*labels, "final"], y=[*acc, acc[-1]], mode="lines+markers", yaxis="y2",
        name="accuracy after the stage", line={"color": DEEP_ACC_COLOR},
        marker={"size": 9}, text=[f"{a:.1f} %" for a in [*acc, acc[-1]]],
        customdata=[format_bytes(s) for s in [*sizes, sizes[-1]]],
        hovertemplate="%{x}<br>accuracy %{y:.2f} %<br>%{customdata}<extra></extra>",
    ))  # fmt: skip
    # the accuracy labels dark on white, readable over any bar (text on the trace came out
    # grey on the bars' colours)
    for xi, a in zip([*labels, "final"], [*acc, acc[-1]], strict=True):
        fig.add_annotation(x=xi, y=a, yref="y2", text=f"{a:.1f} %", showarrow=False,
                           yshift=14, font={"color": "#111111", "size": 12},
                           bgcolor="rgba(255, 255, 255, 0.9)", borderpad=2)  # fmt: skip
    # every step's size change under its name, where no bar can hide it
    fig.update_xaxes(tickvals=x, ticktext=[f"{n}<br>{t}" for n, t in zip(x, text, strict=True)])
    lo = max(0.0, math.floor(min(acc) - 5))
    fig.update_layout(
        title=title,
        yaxis={"title": "packed bytes", "rangemode": "tozero"},
        yaxis2={"title": "accuracy (%)", "overlaying": "y", "side": "right",
                "range": [lo, 100.5], "showgrid": False, "dtick": 1 if lo >= 90 else None},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 60 if title else 30, "b": 10, "l": 10, "r": 10},
        height=440,
        showlegend=True,
    )  # fmt: skip
    return fig


# --- the Robustness page: accuracy against perturbation strength ------------------------------
ROBUST_COLORS = ("#636efa", "#ef553b", "#00a36c", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692")
ROBUST_TITLES = {
    "gaussian": "Gaussian input noise",
    "fgsm": "FGSM attack (white box)",
    "pgd": "PGD attack (white box)",
    "weight_noise": "Multiplicative weight noise",
    "bitflip": "Random bit flips in the stored weights",
}


ROBUST_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross")


def coinciding(curves: Mapping[str, pd.DataFrame]) -> list[list[str]]:
    """Groups of labels whose curves are the same (equal accuracy at every strength), so
    that one line hides the others; only groups of two or more.

    >>> a = pd.DataFrame({"strength": [0.0, 0.1], "accuracy": [0.9, 0.5]})
    >>> coinciding({"x": a, "y": a.copy(), "z": a.assign(accuracy=[0.9, 0.4])})
    [['x', 'y']]
    """
    groups: dict[tuple, list[str]] = {}
    for label, df in curves.items():
        rows = df.sort_values("strength")
        key = tuple(zip(rows["strength"].astype(float), rows["accuracy"].astype(float),
                        strict=True))  # fmt: skip
        groups.setdefault(key, []).append(label)
    return [g for g in groups.values() if len(g) > 1]


def robustness_curves(
    curves: Mapping[str, pd.DataFrame], perturbation: str, unit: str
) -> go.Figure:
    """Accuracy against strength, one line per model variant (label -> ``qcore.robustness``
    rows); the first (the float model) is a wide pale band. Weight perturbations show the
    spread over draws as error bars (min to max). Each variant has its own marker, and a
    note names the variants whose curves coincide. On the log axis of bit flips, strength 0
    cannot be drawn: its clean accuracy goes into the legend, and only the strengths above
    0 are points (a lone point without a line)."""
    fig = go.Figure()
    log_x = perturbation == "bitflip"
    shown_x: list[float] = []
    for i, (label, df) in enumerate(curves.items()):
        rows = df.sort_values("strength")
        name = label
        if log_x:  # 0 has no place on a log axis: say the clean accuracy instead
            clean = rows[rows["strength"] <= 0]
            if len(clean):
                name = f"{label} (clean {100 * float(clean['accuracy'].iloc[0]):.1f} %)"
            rows = rows[rows["strength"] > 0]
        x = rows["strength"].astype(float).tolist()
        shown_x += x
        y = [100 * a for a in rows["accuracy"].astype(float)]
        err = None
        if "draws" in rows and (rows["draws"] > 1).any():
            err = {
                "type": "data", "symmetric": False,
                "array": [100 * a - b for a, b in zip(rows["accuracy_max"], y, strict=True)],
                "arrayminus": [b - 100 * a for a, b in zip(rows["accuracy_min"], y, strict=True)],
            }  # fmt: skip
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers" if len(x) > 1 else "markers", name=name,
            error_y=err,
            # the first (float) as a wide pale band, so a curve on top of it stays visible
            line={"color": ROBUST_COLORS[i % len(ROBUST_COLORS)], "width": 8 if i == 0 else 2},
            # markers of decreasing size and their own shape: equal points stay visible
            marker={"symbol": ROBUST_SYMBOLS[i % len(ROBUST_SYMBOLS)],
                    "size": max(14 - 2 * i, 6)},
            opacity=0.45 if i == 0 else 1.0,
            customdata=[100 * a for a in rows["agreement"].astype(float)],
            hovertemplate=f"{label}<br>strength %{{x:g}}: accuracy %{{y:.1f}} %"
                          "<br>agreement with its clean prediction %{customdata:.1f} %"
                          "<extra></extra>",
        ))  # fmt: skip
    same = coinciding(curves)
    if same:
        fig.add_annotation(
            text="Same accuracy at every strength (one line hides the other): "
            + "; ".join(" and ".join(g) for g in same),
            xref="paper", yref="paper", x=0, y=1.02, showarrow=False, xanchor="left",
            yanchor="bottom", font={"size": 11},
        )
    xaxis: dict[str, Any] = {"title": unit + (" (log scale; 0 not shown)" if log_x else ""),
                             "type": "log" if log_x else "linear"}
    if log_x and shown_x:  # the axis spans the measured strengths, half a decade beyond
        lo, hi = math.log10(min(shown_x)), math.log10(max(shown_x))
        xaxis["range"] = [lo - 0.5, hi + 0.5]
        xaxis["dtick"] = 1  # decades only: 10^-4, 10^-3, ...
    fig.update_layout(
        title=ROBUST_TITLES.get(perturbation, perturbation),
        xaxis=xaxis,
        yaxis={"title": "accuracy (%, simulated, test split)", "range": [0, 101]},
        legend={"orientation": "h", "y": -0.3},
        margin={"t": 70 if same else 50, "b": 10, "l": 10, "r": 10},
        height=400,
    )  # fmt: skip
    return fig


# --- the Playground's teaching panels: the error of one layer, SQNR against bits -------------
ROUNDING_COLOR = "#636efa"
CLIPPING_COLOR = "#d62728"
RULE_COLOR = "rgba(90, 90, 90, 0.8)"


def error_histogram_figure(h: Any, *, log_y: bool = False, title: str | None = None) -> go.Figure:
    """w − q(w) of one layer (a ``qcore.teach.ErrorHistogram``): rounding error of the
    weights inside the grid, clipping error of those beyond it, stacked on the same bins,
    with lines at ±Δ/2 where rounding error ends."""
    edges = np.asarray(h.edges, dtype=float)
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure()
    for counts, name, color in (
        (h.rounding, "rounding error (inside the grid)", ROUNDING_COLOR),
        (h.clipping, f"clipping error ({h.clipped:,} weights beyond the grid)", CLIPPING_COLOR),
    ):
        fig.add_trace(go.Bar(
            x=centers, y=counts, width=widths, name=name, marker_color=color, opacity=0.75,
            hovertemplate="error %{x:.3g}: %{y:,} weights<extra></extra>",
        ))  # fmt: skip
    for v in (-h.half_step, h.half_step):
        _vline(fig, v, RULE_COLOR, 1.5, "dash")
    fig.add_annotation(x=h.half_step, y=1, yref="paper", yanchor="bottom", showarrow=False,
                       text=f"±Δ/2 = ±{h.half_step:.3g}", font={"color": "#111111"})  # fmt: skip
    fig.update_layout(
        title=title,
        barmode="stack",
        bargap=0,
        xaxis={"title": "error w − q(w) (weight units)", "nticks": 9},
        yaxis={"title": "weights per bin" + (" (log)" if log_y else ""),
               "type": "log" if log_y else "linear", "dtick": 1 if log_y else None},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=360,
    )  # fmt: skip
    return fig


def sqnr_bits_figure(df: pd.DataFrame, *, current: int | None = None,
                     title: str | None = None) -> go.Figure:  # fmt: skip
    """A layer's SQNR against bit width (``qcore.teach.sqnr_by_bits``) beside the rule of
    thumb, a line rising 6.02 dB per bit; ``current`` marks the layer's own width."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=df["bits"].tolist(), y=df["rule_db"].tolist(), mode="lines",
        name="6.02 dB per bit (rule of thumb)", line={"color": RULE_COLOR, "dash": "dash"},
        hovertemplate="%{x} bits: rule %{y:.1f} dB<extra></extra>",
    ))  # fmt: skip
    fig.add_trace(go.Scatter(
        x=df["bits"].tolist(), y=df["sqnr_db"].tolist(), mode="lines+markers",
        name="this layer (measured)", line={"color": COMPRESSED_COLOR, "width": 2},
        marker={"size": 8}, hovertemplate="%{x} bits: %{y:.1f} dB<extra></extra>",
    ))  # fmt: skip
    if current is not None and current in set(df["bits"]):
        y = float(df.loc[df["bits"] == current, "sqnr_db"].iloc[0])
        fig.add_trace(go.Scatter(
            x=[current], y=[y], mode="markers", name=f"now: {current} bits, {y:.1f} dB",
            marker={"size": 16, "symbol": "star-open", "color": CURRENT_COLOR,
                    "line": {"width": 2.5, "color": CURRENT_COLOR}},
            hovertemplate=f"now: {current} bits, %{{y:.1f}} dB<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis={"title": "bit width", "dtick": 1},
        yaxis={"title": "SQNR (dB)"},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50 if title else 30, "b": 10, "l": 10, "r": 10},
        height=360,
    )
    return fig


def channel_ranges_figure(ranges: Mapping[str, np.ndarray], layer: str) -> go.Figure:
    """AIMET's picture of cross-layer equalization: each output channel's weight range
    (a bar from its min to its max) before and after, side by side on one value axis.

    ``ranges`` holds numpy arrays (C,) under ``before min``, ``before max``, ``after min``
    and ``after max`` (``qcore.ptq.equalization_ranges``)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("before equalization", "after equalization"))
    for col, (when, color) in enumerate((("before", FLOAT_COLOR), ("after", COMPRESSED_COLOR)),
                                        start=1):  # fmt: skip
        lo = np.asarray(ranges[f"{when} min"], dtype=float)
        hi = np.asarray(ranges[f"{when} max"], dtype=float)
        fig.add_trace(go.Bar(
            x=np.arange(lo.size), y=hi - lo, base=lo, marker_color=color, name=when,
            customdata=np.stack([lo, hi], axis=1),
            hovertemplate="channel %{x}: %{customdata[0]:.4g} … %{customdata[1]:.4g}"
                          "<extra></extra>",
        ), row=1, col=col)  # fmt: skip
        fig.update_xaxes(title_text="output channel", row=1, col=col)
    fig.update_yaxes(title_text=f"{layer} weight", row=1, col=1)
    fig.update_layout(showlegend=False, bargap=0.15, height=340,
                      margin={"t": 40, "b": 10, "l": 10, "r": 10})  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------
# The Debug page (qcore.analyze) and comparing two settings.

DEBUG_SETTING_COLORS = {"float": FLOAT_COLOR, "weights only": "#ab63fa",
                        "activations only": "#00a36c", "both": COMPRESSED_COLOR}  # fmt: skip
LOCAL_COLOR = "#ef553b"  # the error a layer makes
CUMULATIVE_COLOR = "#636efa"  # the error that reaches it, piled up
# The graph's fixed SQNR scale: (upper bound in dB, fill colour, legend text), worst first
SQNR_BANDS: tuple[tuple[float, str, str], ...] = (
    (10.0, "#d73027", "below 10 dB"),
    (20.0, "#fc8d59", "10 to 20 dB"),
    (30.0, "#fee08b", "20 to 30 dB"),
    (40.0, "#d9ef8b", "30 to 40 dB"),
    (math.inf, "#66bd63", "40 dB or more"),
)
EXACT_COLOR = "#f0f0f0"  # a layer with no error (or not compressed)
ACT_EDGE_COLOR = "#8e44ad"  # an edge whose values are fake-quantized


def debug_summary_bars(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Accuracy of float, weights only, activations only and both (``Analysis.summary``)."""
    acc = 100 * summary["accuracy"].to_numpy(dtype=float)
    settings = summary["setting"].astype(str).tolist()
    fig = go.Figure(go.Bar(
        x=settings, y=acc,
        marker_color=[DEBUG_SETTING_COLORS.get(s, COMPRESSED_COLOR) for s in settings],
        text=[f"{a:.1f} %" for a in acc], textposition="outside",
        customdata=summary["loss"].to_numpy(dtype=float),
        hovertemplate="%{x}: %{y:.2f} % (loss %{customdata:.4f})<extra></extra>",
    ))  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis={"title": "what is quantized", "type": "category"},
        yaxis={"title": "accuracy (%, simulated, test split)", "range": [0, 105]},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=360,
    )
    return fig


def sqnr_lines(layers: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Each layer's output SQNR when only it is compressed (local: where error is made)
    and in the compressed model (cumulative: where it piles up), layers in model order."""
    fig = go.Figure()
    x = layers["layer"].astype(str).tolist()
    for col, name, color in (("sqnr_local_db", "local (only this layer compressed)", LOCAL_COLOR),
                             ("sqnr_cumulative_db", "cumulative (in the compressed model)",
                              CUMULATIVE_COLOR)):  # fmt: skip
        v = layers[col].to_numpy(dtype=float)
        fig.add_trace(go.Scatter(
            x=x, y=np.where(np.isfinite(v), v, np.nan), mode="lines+markers", name=name,
            line={"color": color}, connectgaps=False,
            hovertemplate=f"%{{x}}: %{{y:.1f}} dB ({name.split(' ')[0]})<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(
        title=title,
        xaxis={"type": "category", "tickangle": -40},  # layers in model order
        yaxis={"title": "output SQNR (dB, higher is better)"},
        # above the plot: the layer names below take a varying height
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
        margin={"t": 90 if title else 40, "b": 10, "l": 10, "r": 10},
        height=400,
    )
    return fig


def sqnr_color(db: float) -> str:
    """The fill of a layer on the graph's fixed SQNR scale (:data:`SQNR_BANDS`)."""
    if db is None or math.isnan(db) or db == math.inf:
        return EXACT_COLOR
    return next(color for top, color, _ in SQNR_BANDS if db < top)


def _dot_text(text: str) -> str:
    """Text inside a DOT string: backslashes and quotes escaped, line breaks as ``\\n``."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def model_graph_dot(
    outline: Sequence[Any],
    sqnr: Mapping[str, float],
    act_edges: Sequence[str] = (),
    *,
    act_label: str = "quantized",
    what: str = "SQNR",
) -> str:
    """The traced graph as Graphviz DOT text: each weight layer filled by its ``sqnr`` on
    a fixed scale (with a legend), residual additions as circles, and the edges whose
    values are fake-quantized (``act_edges``, point names) drawn thick and labelled.

    ``outline`` holds ``qcore.debug.GraphNode`` records (name, kind, label, inputs, layer).
    """
    acts = set(act_edges)
    kinds = {n.name: n for n in outline}
    lines = [
        "digraph model {",
        '  rankdir=TB; nodesep=0.25; ranksep=0.3; bgcolor="transparent";',
        '  node [fontname="Helvetica", fontsize=10, shape=box, style="rounded,filled", '
        'fillcolor="#ffffff", color="#888888"];',
        '  edge [color="#777777", arrowsize=0.6];',
    ]
    for n in outline:
        attrs: dict[str, str] = {}
        if n.kind == "layer":
            db = sqnr.get(n.layer, math.nan)
            value = "no error" if db == math.inf else (
                "not compressed" if db is None or math.isnan(db) else f"{db:.1f} dB")
            attrs = {"label": f"{n.layer}\n{n.label}\n{what} {value}",
                     "fillcolor": sqnr_color(db), "penwidth": "1.5"}  # fmt: skip
        elif n.kind == "add":
            attrs = {"label": "+", "shape": "circle", "fillcolor": "#ffffff", "width": "0.3",
                     "fixedsize": "true", "fontsize": "14"}  # fmt: skip
        elif n.kind in ("input", "output"):
            attrs = {"label": n.label, "shape": "ellipse", "fillcolor": "#e8eefc"}
        else:
            attrs = {"label": n.label, "fontsize": "8", "height": "0.2", "color": "#bbbbbb",
                     "fillcolor": "#fafafa"}  # fmt: skip
        body = ", ".join(f'{k}="{_dot_text(v)}"' for k, v in attrs.items())
        lines.append(f'  "{_dot_text(n.name)}" [{body}];')
    for n in outline:
        for src in n.inputs:
            s = kinds.get(src)
            # an edge an integer engine stores: the input, or a fused group's output (the
            # point sits on the group's last node, qcore.activations.placement)
            quantized = s is not None and (
                (s.kind == "input" and "input" in acts) or s.name in acts
            )
            style = (f' [color="{ACT_EDGE_COLOR}", penwidth=2.2, label=" {_dot_text(act_label)}",'
                     f' fontsize=8, fontcolor="{ACT_EDGE_COLOR}"]' if quantized else "")
            lines.append(f'  "{_dot_text(src)}" -> "{_dot_text(n.name)}"{style};')
    lines.append(f'  subgraph cluster_legend {{ label="{_dot_text(what)} of each weight layer"; '
                 'fontsize=10; color="#cccccc";')
    legend = [(color, text) for _, color, text in SQNR_BANDS] + [(EXACT_COLOR, "no error")]
    for i, (color, text) in enumerate(legend):
        lines.append(f'    "legend_{i}" [label="{_dot_text(text)}", fillcolor="{color}", '
                     'fontsize=9];')
    if acts:
        lines.append(f'    "legend_act" [label="thick purple edge: activations {act_label}", '
                     f'shape=plaintext, style="", fontsize=9, fontcolor="{ACT_EDGE_COLOR}"];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def compare_histograms(
    a: HistogramLike, b: HistogramLike, *, names: tuple[str, str] = ("A", "B"),
    title: str | None = None, log_y: bool = False,
) -> go.Figure:  # fmt: skip
    """Two settings' compressed weights of one layer overlaid (each on its own bins), with
    the float weights as a grey outline."""
    fig = go.Figure()
    edges = np.asarray(a.edges, dtype=float)
    fig.add_trace(go.Scatter(
        x=(edges[:-1] + edges[1:]) / 2, y=np.asarray(a.before), mode="lines",
        line={"color": "rgba(90, 90, 90, 0.7)", "shape": "hvh", "width": 1},
        name="float weights",
    ))  # fmt: skip
    for h, name, color in ((a, names[0], FLOAT_COLOR), (b, names[1], COMPRESSED_COLOR)):
        e = np.asarray(h.edges, dtype=float)
        fig.add_trace(go.Bar(
            x=(e[:-1] + e[1:]) / 2, y=np.asarray(h.after), width=np.diff(e), name=name,
            marker_color=color, opacity=0.55,
            hovertemplate=f"{name}: %{{y:,}} weights near %{{x:.4g}}<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(
        title=title, barmode="overlay",
        xaxis={"title": "weight value"},
        yaxis={"title": "weights (count)", "type": "log" if log_y else "linear"},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 50 if title else 20, "b": 10, "l": 10, "r": 10},
        height=380,
    )  # fmt: skip
    return fig
