"""`emanet bench int8` (emanet/bench/quant.py) on its dry run: every variant timed and judged against its
precision's peak, the machine's ISA flags, both reports."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


from emanet.bench.quant import FLAGS, PEAK_OF, VARIANTS, cpu_flags, int8_accuracy, run_int8_benchmark  # noqa: E402
from emanet.config import Config  # noqa: E402
from emanet.errors import ConfigError  # noqa: E402
from emanet.pretrained import load_model, save_pretrained  # noqa: E402
from tests.conftest import calibrated, run_cli, tiny_model  # noqa: E402


def test_dry_run_measures_every_variant_against_its_peak(tmp_path):
    stem, data = run_int8_benchmark(tmp_path, threads=1, dry_run=True)
    assert stem == tmp_path / "int8_results_dry_run"
    assert json.loads(stem.with_suffix(".json").read_text())["cases"][0]["case"] == "tiny"
    (case,) = data["cases"]
    assert tuple(case["median_ms"]) == VARIANTS and set(PEAK_OF) == set(VARIANTS)
    assert set(data["peak"]["rates"]) == set(PEAK_OF.values()) and all(v > 0 for v in data["peak"]["rates"].values())
    for k in VARIANTS:
        assert case["of_peak"][k] == pytest.approx(1e9 * case["gmacs_per_s"][k] / data["peak"]["rates"][PEAK_OF[k]])
        assert case["gmacs_per_s"][k] == pytest.approx(case["macs_G"] / case["median_ms"][k] * 1e3)
    assert case["speedup_vs_prepared_fp32"]["prepared fp32"] == 1.0
    assert case["same_argmax_vs_eager"]["onnxruntime fp32"] > 0.99  # the same network as eager
    assert case["int8_MiB"] < case["fp32_MiB"]
    md = stem.with_suffix(".md").read_text()
    assert "| tiny (0 G MACs) | onnxruntime int8 |" in md and "ISA flags:" in md and "load average" in md


def test_cpu_flags_reads_proc_cpuinfo():
    flags = cpu_flags()
    assert tuple(flags) == FLAGS and all(isinstance(v, bool) for v in flags.values())
    assert flags["avx2"] or not flags["avx512f"]  # every AVX-512 CPU has AVX2


@pytest.mark.slow
def test_cli_dry_run(tmp_path):
    proc = run_cli("bench", "int8", "--dry-run", "--threads", "1", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| tiny (0 G MACs) | prepared bf16 |" in proc.stdout and "written:" in proc.stdout
    assert (tmp_path / "int8_results_dry_run.json").is_file()


def test_accuracy_compares_int8_with_float32_on_held_out_images(tmp_path):
    model = calibrated(tiny_model(num_classes=5))
    cfg = Config()
    cfg.model = tiny_model(num_classes=5)  # the synthetic set's classes
    cfg.data.dataset = "synthetic"
    scene = {"image_size": 48, "max_objects": 4, "min_objects": 2, "min_size": 4, "max_size": 8}
    cfg.data.options = {"length": 2, "val_length": 10, **scene}
    loaded = load_model(save_pretrained(model, cfg, tmp_path / "model"))
    result = int8_accuracy(loaded, calibration_images=4, threads=1)
    assert result["calibration_images"] == 4 and result["eval_images"] == 6
    assert 0.9 < result["label_agreement"] <= 1 and 0 <= result["mIoU_int8"] <= 1
    assert abs(result["mIoU_int8"] - result["mIoU_fp32"]) < 0.1  # a random model: low mIoU, but the same
    with pytest.raises(ConfigError, match="the validation split has 10 images; calibrating on 10 leaves none"):
        int8_accuracy(loaded, calibration_images=10, threads=1)
