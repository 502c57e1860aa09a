"""emanet.bench.report: the tables name the size actually run and the targets come from the rows."""

from __future__ import annotations

from pathlib import Path

from emanet.bench.report import format_report
from emanet.cli.main import main


def _result(size: int, predictor_ratio: float) -> dict:
    rows = []
    for backbone in ("resnet50", "resnet101"):
        for precision in ("fp32", "bf16"):
            for variant, ratio in (("eager forward", 1.0), ("Predictor default (prepared)", predictor_ratio)):
                rows.append(
                    {
                        "backbone": backbone,
                        "size": size,
                        "precision": precision,
                        "variant": variant,
                        "median_s": 2.0 * ratio,
                        "ratio_to_eager_forward": ratio,
                        "gmacs": 100.0,
                        "rel_err_vs_eager_fp32": None,
                        "label_agreement_vs_eager_fp32": 1.0,
                    }
                )
    return {
        "machine": {
            "cpu": "x",
            "logical_cores": 2,
            "torch_threads": 2,
            "amx_bf16": True,
            "torch": "t",
            "python": "p",
            "date": "d",
        },
        "matmul_gflops": {"float32": 100.0, "bfloat16": 400.0},
        "matmul_gflops_after": {"float32": 100.0},
        "load_before": {"loadavg_1m": 3.5, "loadavg_5m": 2.0, "loadavg_15m": 1.0},
        "model": rows,
    }


def test_quick_run_heading_names_the_size_it_ran():
    md = format_report(_result(129, 0.8))
    assert "one 129x129 image" in md and "513x513" not in md
    assert "3.50/2.00/1.00" in md  # the machine load is in the report


def test_predictor_target_is_judged_from_the_rows():
    assert "resnet50 fp32: default Predictor / eager forward 0.80 -> met" in format_report(_result(513, 0.8))
    assert "resnet101 fp32: default Predictor / eager forward 0.90 -> MISSED" in format_report(_result(513, 0.9))


def test_emanet_bench_report_re_renders_the_committed_table_from_its_json(tmp_path, capsys):
    committed = Path(__file__).resolve().parents[2] / "benchmarks"
    (tmp_path / "results.json").write_text((committed / "results.json").read_text())
    assert main(["bench", "--report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
    assert capsys.readouterr().out == f"written: {tmp_path / 'results.md'}\n"
