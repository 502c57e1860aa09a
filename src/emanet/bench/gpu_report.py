"""The GPU benchmark's markdown report (gpu_results.md): a header, then one table per part."""

from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _model_name(backbone: str) -> str:
    return f"EMANet-{backbone.replace('resnet', 'R')}-D8"


def format_report(r: dict) -> str:
    m = r["machine"]
    where = (
        f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, sm {m.get('sm')}), driver {m.get('driver')}, "
        f"CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}"
        if "gpu" in m
        else f"CPU {m.get('cpu')}"
    )
    rates = r["matmul_tflops"]
    lines = ["# GPU benchmark (emanet bench gpu)", ""]
    if r["dry_run"]:
        lines += ["**DRY RUN on the CPU with tiny shapes: checks the script, these are not GPU figures.**", ""]
    lines += [
        f"Machine: {where}; torch {m['torch']}, Python {m['python']}, {m['date']}. Measured in {r['seconds']:.0f} s "
        f"(budget {r['budget_s']:.0f} s). Matmul: float32 (TF32 off) {rates['fp32']:.3g} TFLOP/s, bfloat16 "
        f"{rates['bf16']:.3g} TFLOP/s. Medians of timed calls after warm-up, the device synchronised around each.",
    ]
    return "\n".join(lines + _train_table(r) + _inference_table(r) + _em_table(r)) + "\n"


def _train_table(r: dict) -> list[str]:
    lines = [
        "",
        f"## (a) Training, {r['shapes']['crop'][0]}x{r['shapes']['crop'][1]} crops, 19 classes",
        "",
        "| model | batch | precision | channels_last | compiled | images/s | step s | first step s | peak GiB | "
        "host syncs/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["train"]:
        name = _model_name(row["backbone"])
        head = f"| {name} | {row['batch']} | {row['precision']} | {row['channels_last']} | {row['compiled']} |"
        if "skipped" in row:
            lines.append(f"{head} skipped ({row['skipped']}) | | | | |")
            continue
        lines.append(
            f"{head} {row['images_per_s']:.2f} | {row['step_s']:.3f} | {row['first_step_s']:.1f} | "
            f"{_fmt(row['peak_gib'], '.1f')} | {_fmt(row['host_syncs_per_step'], 'd')} |"
        )
    return lines


def _inference_table(r: dict) -> list[str]:
    h, w = r["shapes"]["image"]
    lines = [
        "",
        f"## (b) Inference, one {h}x{w} image (whole), 19 classes",
        "",
        "mmsegmentation's figures: their EMANet Cityscapes table, V100, fp32 (another GPU; context only).",
        "",
        "| model | variant | precision | ms | peak GiB | mmseg V100 ms (512x1024 cfg) | (769x769 cfg) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["inference"]:
        name = _model_name(row["backbone"])
        if "skipped" in row:
            lines.append(f"| {name} | {row['variant']} | {row['precision']} | skipped ({row['skipped']}) | | | |")
            continue
        lines.append(
            f"| {name} | {row['variant']} | {row['precision']} | {row['ms']:.1f} | "
            f"{_fmt(row['peak_gib'], '.2f')} | {_fmt(row['mmseg_v100_ms_512x1024'], '.0f')} | "
            f"{_fmt(row['mmseg_v100_ms_769x769'], '.0f')} |"
        )
    return lines


def _em_table(r: dict) -> list[str]:
    lines = [
        "",
        f"## (c) EM attention vs einsum vs non-local (C={r['shapes']['channels']}, K={r['shapes']['num_bases']}, T=3)",
        "",
        "| size | batch | variant | precision | ms | GFLOP | TFLOP/s | % of matmul (same precision) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["em"]:
        head = f"| {row['size']}^2 | {row['batch']} | {row['variant']} | {row['precision']} |"
        if "skipped" in row:
            lines.append(f"{head} skipped ({row['skipped']}) | | | |")
            continue
        lines.append(
            f"{head} {row['ms']:.3f} | {row['gflop']:.2f} | {row['tflops']:.2f} | {row['pct_of_matmul']:.0f}% |"
        )
    return lines
