"""Figures and a Markdown/HTML report for `emanet demo`: curves, sample predictions, EM responsibilities.

Takes plain numpy arrays, dicts and paths; knows nothing of models, engines or datasets.
matplotlib is the optional extra `report` (`errors.install_hint("report")`) and is imported only when a figure is drawn.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from emanet.checkpoint import atomic_path, write_text_atomic
from emanet.errors import MissingExtra, install_hint


def _figure(width: float, height: float):
    """A pyplot-free Agg figure, so no global state or display is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingExtra(f"drawing the report needs matplotlib: {install_hint('report')}") from e
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    """The figure as a PNG at ``path``, written whole or not at all (a failed write keeps the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _legend_patches(palette, class_names):
    from matplotlib.patches import Patch

    return [Patch(color=np.asarray(c) / 255, label=n) for c, n in zip(palette, class_names)]


def read_metrics(path) -> list[dict]:
    """One dict per non-empty line of a metrics.jsonl file."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
    return records


def _running_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` points (fewer at the start), same length as x."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(runs: dict[str, list[dict]], path, *, smooth: int = 10) -> Path:
    """Training loss (raw faintly, running mean solid) and validation mIoU (%), per run.

    The mIoU panel is a curve against iteration when some run was evaluated more than once; with one
    evaluation per run (the demo evaluates once, at the end) it is one labelled bar per run, since a lone
    point per run on an iteration axis reads as an empty plot.
    """
    fig = _figure(11, 4)
    ax_loss, ax_miou = fig.subplots(1, 2)
    vals = {name: [r for r in records if r.get("kind") == "val"] for name, records in runs.items()}
    as_curves = any(len(v) > 1 for v in vals.values())
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [r for r in records if r.get("kind") == "train"]
        if train:
            it = np.array([r["iter"] for r in train])
            loss = np.array([r["loss"] for r in train], dtype=float)
            ax_loss.plot(it, loss, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(it, _running_mean(loss, smooth), color=color, label=name)
        if vals[name] and as_curves:
            it = [r["iter"] for r in vals[name]]
            ax_miou.plot(it, [100 * r["mIoU"] for r in vals[name]], color=color, marker="o", label=name)
        elif vals[name]:
            last = vals[name][-1]
            bar = ax_miou.bar(i, 100 * last["mIoU"], color=color, width=0.6)
            ax_miou.bar_label(bar, labels=[f"{100 * last['mIoU']:.2f}"], padding=2)
    ax_loss.set(title="Training loss", xlabel="iteration", ylabel="loss")
    if as_curves:
        ax_miou.set(title="Validation mIoU", xlabel="iteration", ylabel="mIoU (%)")
    else:
        shown = [name for name in runs if vals[name]]
        ax_miou.set_xticks([i for i, name in enumerate(runs) if vals[name]], labels=shown)
        iters = sorted({vals[name][-1].get("iter") for name in shown} - {None})
        when = f" at iteration {', '.join(map(str, iters))}" if iters else ""
        ax_miou.set(title=f"Validation mIoU (one evaluation{when})", ylabel="mIoU (%)", ylim=(0, 100))
        if not shown:
            ax_miou.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_miou.transAxes)
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, path)


def colorize(label: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ignore_index is white."""
    label = np.asarray(label)
    lut = np.full((256, 3), 255, dtype=np.uint8)  # anything outside the palette (ignore included) is white
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[ignore_index] = 255
    return lut[label.astype(np.uint8)]


def plot_samples(
    images,
    ground_truth,
    predictions: dict[str, list],
    palette,
    class_names,
    path,
    *,
    row_labels: list[str] | None = None,
    scores: dict[str, list[float]] | None = None,
) -> Path:
    """Grid with one row per sample: image | ground truth | one prediction column per model.

    ``row_labels`` (one per row) are written beside each row (why the row was chosen); ``scores`` (model ->
    one mIoU fraction per row) go into each prediction's caption.
    """
    n = len(images)
    if len(ground_truth) != n or any(len(p) != n for p in predictions.values()):
        raise ValueError(f"need {n} ground truths and {n} predictions per model to match the {n} images")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"{len(row_labels)} row labels for {n} rows")
    if scores is not None and (set(scores) != set(predictions) or any(len(v) != n for v in scores.values())):
        raise ValueError(f"scores need one value per row for each of {list(predictions)}")
    titles = ["image", "ground truth", *predictions]
    row_h = 2.4 * images[0].shape[0] / images[0].shape[1] + 0.4  # panel height from the image aspect + title
    fig = _figure(2.4 * len(titles), row_h * n + 0.6)
    axes = np.asarray(fig.subplots(n, len(titles), squeeze=False))  # (rows, cols)
    for row in range(n):
        panels = [images[row], colorize(ground_truth[row], palette)]
        panels += [colorize(p[row], palette) for p in predictions.values()]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            title = titles[col] if row == 0 else ""
            if col >= 2 and scores is not None:
                title = f"{titles[col]}: {100 * scores[titles[col]][row]:.1f} mIoU"
            if title:
                ax.set_title(title, fontsize=9)
        if row_labels is not None:
            axes[row, 0].text(
                -0.06,
                0.5,
                row_labels[row],
                rotation=90,
                ha="right",
                va="center",
                fontsize=9,
                transform=axes[row, 0].transAxes,
            )
    handles = _legend_patches(palette, class_names)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
    return _save(fig, path)


def _upsample(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float map -> (height, width), bilinear via PIL."""
    img = Image.fromarray(np.asarray(heat, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def plot_responsibilities(image, label, responsibilities: np.ndarray, path, *, top: int = 6, palette=None):
    """The paper's figure: the `top` bases carrying most responsibility mass as heat maps over the image, on one
    0..1 colour scale with its colour bar (a pixel's responsibilities sum to 1 over the K bases).

    Returns (path, chosen base indices, heaviest first).
    """
    resp = np.asarray(responsibilities, dtype=np.float64)  # (K, h, w)
    if resp.ndim != 3:
        raise ValueError(f"responsibilities must be (K, h, w), got shape {resp.shape}")
    mass = resp.reshape(len(resp), -1).sum(axis=1)  # (K,)
    share = mass / max(mass.sum(), 1e-12)
    chosen = [int(k) for k in np.argsort(-mass, kind="stable")[: min(top, len(resp))]]

    height, width = np.asarray(image).shape[:2]
    cols = min(4, 2 + len(chosen))
    rows = -(-(2 + len(chosen)) // cols)  # ceil
    fig = _figure(3 * cols, (3 * height / width + 0.4) * rows)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    axes[0].imshow(image)
    axes[0].set_title("image")
    if palette is not None:
        axes[1].imshow(colorize(label, palette), interpolation="nearest")
    else:
        axes[1].imshow(np.ma.masked_equal(np.asarray(label), 255), cmap="tab20", interpolation="nearest")
    axes[1].set_title("ground truth")
    heat = None
    for ax, k in zip(axes[2:], chosen):
        ax.imshow(image)
        heat = ax.imshow(_upsample(resp[k], height, width), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(f"base {k}: {100 * share[k]:.1f}% of mass")
    for ax in axes:
        ax.set_axis_off()
    if heat is not None:
        heat_axes = list(axes[2 : 2 + len(chosen)])
        fig.colorbar(heat, ax=heat_axes, shrink=0.8, label="responsibility (sums to 1 over the bases)")
    return _save(fig, path), chosen


def _escape_cell(cell) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table: header row, `---` separator, one line per row; `|` in cells is escaped."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, the header has {len(header)}")
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(_escape_cell(c) for c in line) + " |" for line in lines)


_IMAGE = re.compile(r"^!\[(.*?)\]\((.+?)\)$")
_SEPARATOR = re.compile(r"^:?-{3,}:?$")


def _inline(text: str) -> str:
    """Escape HTML, then render `code` and **bold**."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _table_html(lines: list[str]) -> str:
    rows = [_cells(line) for line in lines if not all(_SEPARATOR.match(c) for c in _cells(line))]
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>\n" for r in rows[1:])
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def markdown_to_html(markdown: str) -> str:
    """The subset this module emits: headings, pipe tables, image lines, `- ` bullets, paragraphs."""
    out, block, kind = [], [], None

    def flush():
        if kind == "table":
            out.append(_table_html(block))
        elif kind == "list":
            out.append("<ul>\n" + "".join(f"<li>{_inline(b)}</li>\n" for b in block) + "</ul>")
        elif kind == "p":
            out.append(f"<p>{_inline(' '.join(block))}</p>")
        block.clear()

    for line in markdown.splitlines():
        s = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", s)
        image = _IMAGE.match(s)
        new = "table" if s.startswith("|") else "list" if s.startswith("- ") else "p"
        if not s or heading or image or new != kind:
            flush()
            kind = None
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            alt, src = (html.escape(g, quote=True) for g in image.groups())
            out.append(f'<p><img src="{src}" alt="{alt}"></p>')
        elif s:
            kind = new
            block.append(s[2:] if new == "list" else s)
    flush()
    return "\n".join(out)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.5}"
    "img{max-width:100%}table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 10px}"
    "code{background:#f3f3f3;padding:0 3px}"
)


def write_report(folder, *, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write folder/report.md and a self-contained folder/report.html with the same content (each whole or
    not at all); return the .md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"]
    parts += [f"## {heading}\n\n{body.strip()}\n" for heading, body in sections]
    markdown = "\n".join(parts)
    md_path = folder / "report.md"
    write_text_atomic(md_path, markdown)
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{markdown_to_html(markdown)}\n</body>\n</html>\n"
    )
    write_text_atomic(folder / "report.html", page)
    return md_path
