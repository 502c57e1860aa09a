import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

import emanet.experiments.report  # noqa: E402
from emanet.experiments.report import (  # noqa: E402
    colorize,
    markdown_table,
    plot_curves,
    plot_responsibilities,
    plot_samples,
    read_metrics,
    write_report,
)

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 128, 0)]
NAMES = ["background", "warm", "cool"]


def _metrics(n_train=30, every=10, offset=0.0):
    records = [
        {"kind": "train", "iter": i, "loss": 2.0 / (i + 1) + offset, "lr": 0.01, "images_per_s": 50.0}
        for i in range(n_train)
    ]
    records += [{"kind": "val", "iter": i, "mIoU": 0.3 + 0.01 * i, "aAcc": 0.8} for i in range(every, n_train, every)]
    return records


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_read_metrics_round_trip(tmp_path):
    records = _metrics()
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_metrics(path) == records


def test_read_metrics_names_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train"}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_plot_curves_writes_png(tmp_path):
    out = plot_curves({"EMANet": _metrics(), "FCN": _metrics(offset=0.2)}, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    width, height = _png_size(out)
    assert 400 < width < 3000 and 200 < height < 2000
    assert width > height  # two panels side by side


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, by file name (the PNG is still written)."""
    saved, real_save = {}, emanet.experiments.report._save

    def save(fig, path):
        saved[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(emanet.experiments.report, "_save", save)
    return saved


def _texts(fig) -> list[str]:
    """Every title and free text of every axes of a figure."""
    return [t for ax in fig.axes for t in (ax.get_title(), *(x.get_text() for x in ax.texts)) if t]


def test_plot_curves_draws_periodic_evaluations_as_curves(tmp_path, figures):
    plot_curves({"EMANet": _metrics(), "FCN": _metrics(offset=0.2)}, tmp_path / "curves.png")
    ax = figures["curves.png"].axes[1]
    assert ax.get_xlabel() == "iteration" and not ax.patches
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [2, 2]  # evaluations at 10 and 20


def test_plot_curves_draws_one_evaluation_per_model_as_labelled_bars(tmp_path, figures):
    one = {
        name: [*_metrics(every=100), {"kind": "val", "iter": 30, "mIoU": m}] for name, m in [("A", 0.79), ("B", 0.6)]
    }
    plot_curves(one, tmp_path / "curves.png")
    ax = figures["curves.png"].axes[1]
    assert not ax.get_lines()  # no lone point per model on an iteration axis
    assert [round(bar.get_height(), 2) for bar in ax.patches] == [79.0, 60.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    assert {t.get_text() for t in ax.texts} >= {"79.00", "60.00"} and "iteration 30" in ax.get_title()


def test_plot_samples_captions_rows_and_scores(tmp_path, figures):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 10, 3), dtype=np.uint8) for _ in range(2)]
    labels = [np.zeros((8, 10), np.uint8)] * 2
    preds = {"EMANet": labels, "FCN": labels}
    plot_samples(
        images,
        labels,
        preds,
        PALETTE,
        NAMES,
        tmp_path / "s.png",
        row_labels=["typical (median) EMANet", "worst FCN"],
        scores={"EMANet": [0.912, 0.5], "FCN": [0.25, 0.031]},
    )
    texts = _texts(figures["s.png"])
    assert {"typical (median) EMANet", "worst FCN", "EMANet: 91.2 mIoU", "FCN: 3.1 mIoU"} <= set(texts)
    with pytest.raises(ValueError, match="row labels"):
        plot_samples(images, labels, preds, PALETTE, NAMES, tmp_path / "x.png", row_labels=["one"])


def test_colorize_pixel_by_pixel():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    rgb = colorize(label, PALETTE)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    expected = {(0, 0): PALETTE[0], (0, 1): PALETTE[1], (1, 0): PALETTE[2], (1, 1): (255, 255, 255)}
    for (y, x), colour in expected.items():
        assert tuple(rgb[y, x]) == colour


def test_plot_samples_two_by_two(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (33, 41, 3), dtype=np.uint8) for _ in range(2)]
    gts = [rng.integers(0, 3, (33, 41), dtype=np.uint8) for _ in range(2)]
    preds = {"EMANet": gts, "FCN": [np.zeros((33, 41), np.uint8)] * 2}
    out = plot_samples(images, gts, preds, PALETTE, NAMES, tmp_path / "samples.png")
    width, height = _png_size(out)
    assert width > 300 and height > 200


def test_plot_samples_rejects_mismatched_lengths(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="predictions"):
        plot_samples([img, img], [lab, lab], {"FCN": [lab]}, PALETTE, NAMES, tmp_path / "s.png")


def _responsibilities(k=8, h=5, w=7):
    """Each pixel's weights sum to 1; base k gets a mass that rises with a known permutation."""
    weights = np.array([3.0, 9.0, 1.0, 7.0, 5.0, 2.0, 8.0, 4.0])[:k]  # order: 1, 6, 3, 4, 7, 0, 5, 2
    rng = np.random.default_rng(1)
    logits = np.log(weights)[:, None, None] + 0.05 * rng.standard_normal((k, h, w))
    resp = np.exp(logits)
    return resp / resp.sum(axis=0, keepdims=True)


def test_plot_responsibilities_picks_heaviest_bases(tmp_path):
    resp = _responsibilities()
    np.testing.assert_allclose(resp.sum(axis=0), 1.0)
    image = np.full((20, 28, 3), 128, np.uint8)
    label = np.zeros((20, 28), np.uint8)
    out, chosen = plot_responsibilities(image, label, resp, tmp_path / "resp.png", top=4, palette=PALETTE)
    assert chosen == [1, 6, 3, 4]
    assert _png_size(out)[0] > 300


def test_plot_responsibilities_has_one_colour_bar_from_0_to_1(tmp_path, figures):
    image = np.full((20, 28, 3), 128, np.uint8)
    plot_responsibilities(image, np.zeros((20, 28), np.uint8), _responsibilities(), tmp_path / "r.png", top=4)
    fig = figures["r.png"]
    bars = [ax for ax in fig.axes if "responsibility" in ax.get_ylabel()]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)
    assert len(fig.axes) == 2 * 4 + 1  # image, ground truth, 4 bases, 2 unused panels (2 rows of 4), the bar


def test_plot_responsibilities_clips_top_to_k(tmp_path):
    resp = _responsibilities(k=3)
    image = np.zeros((10, 14, 3), np.uint8)
    out, chosen = plot_responsibilities(image, np.zeros((10, 14), np.uint8), resp, tmp_path / "r.png", top=10)
    assert chosen == [1, 0, 2]
    assert out.exists()


def test_markdown_table_exact():
    table = markdown_table(["model", "mIoU"], [["EMANet", "71.2"], ["a|b", "3"]])
    assert table == "| model | mIoU |\n| --- | --- |\n| EMANet | 71.2 |\n| a\\|b | 3 |"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b", "c"], [["1", "2"]])


def test_write_report_markdown_and_html(tmp_path):
    table = markdown_table(["model", "mIoU <%>"], [["EMANet", "71.2"], ["a|b", "3"]])
    sections = [
        ("Curves", "Loss & mIoU of <both> runs.\n\n![training curves](curves.png)"),
        ("Results", table),
        ("Notes", "- first <point>\n- second"),
    ]
    md_path = write_report(tmp_path / "run", title="Demo <report>", sections=sections)
    md = md_path.read_text()
    assert md_path == tmp_path / "run" / "report.md"
    assert md.startswith("# Demo <report>\n")
    positions = [md.index(f"## {h}\n") for h, _ in sections]
    assert positions == sorted(positions)
    assert table in md

    page = (tmp_path / "run" / "report.html").read_text()
    assert '<img src="curves.png" alt="training curves">' in page
    assert "<table>" in page and "<th>mIoU &lt;%&gt;</th>" in page and "<td>a|b</td>" in page
    assert "Loss &amp; mIoU of &lt;both&gt; runs." in page
    assert "<h1>Demo &lt;report&gt;</h1>" in page and "<h2>Notes</h2>" in page
    assert "<li>first &lt;point&gt;</li>" in page
    assert "<both>" not in page and "<point>" not in page
