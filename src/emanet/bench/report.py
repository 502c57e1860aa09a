"""The markdown report of a benchmark run (benchmarks/results.md) rendered from its results dict: the
machine and its load, tables (a) EM attention, (b) whole model, (c) torch.compile, and the targets judged from
the rows."""

from __future__ import annotations


def _f32_rate(r: dict) -> float:
    """The conservative (higher) of the float32 matmul rates measured before and after: shares of it are
    lower bounds of efficiency on this shared machine."""
    return max(r["matmul_gflops"]["float32"], r["matmul_gflops_after"]["float32"])


MODEL_NOTE = [
    "Eager forward: `model(x)` on the normalised (1, 3, H, W) tensor, nothing else. Prepared forward: the same",
    "after `prepare_for_inference` (BN folded, ReLU and residual add fused into the convs, channels_last).",
    "Predictor: the whole call on a uint8 image (preprocessing, forward, argmax, crop; labels only, so no",
    "softmax); default = prepared. Ratios are to the eager forward in the",
    "same precision, same run. Labels: share of pixels whose class equals the eager float32 forward's (a random",
    "network: bf16 rounding flips many near-ties).",
    "",
]


def _load_line(r: dict) -> str:
    before, after = r.get("load_before") or {}, r.get("load_after") or {}
    if not before:
        return "Machine load: not recorded."
    text = (
        f"Machine load (1/5/15-min load averages on {r['machine']['logical_cores']} cores): before "
        f"{before['loadavg_1m']:.2f}/{before['loadavg_5m']:.2f}/{before['loadavg_15m']:.2f}"
    )
    if after:
        text += f", after {after['loadavg_1m']:.2f}/{after['loadavg_5m']:.2f}/{after['loadavg_15m']:.2f}"
    if "minutes" in r:
        text += f"; the run took {r['minutes']:.1f} min"
    return text + ". Loads above ~2 mean other tenants were running: absolute times are then inflated."


def format_report(r: dict) -> str:
    """benchmarks/results.md for a results dict: the machine, the tables of the parts it holds, the targets."""
    lines = _header_lines(r)
    if "em" in r:
        lines += _em_lines(r)
    if "model" in r:
        lines += _model_lines(r)
    if "compile" in r:
        lines += _compile_lines(r)
    lines += ["", "## Targets (computed from the tables above)", ""] + _targets(r)
    return "\n".join(lines) + "\n"


def _header_lines(r: dict) -> list[str]:
    m = r["machine"]
    f32, bf16 = _f32_rate(r), r["matmul_gflops"]["bfloat16"]
    return [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, AMX-BF16: {m['amx_bf16']}, {m['date']}. Shared machine: medians of interleaved runs.",
        "",
        _load_line(r),
        "",
        f"Matmul 2048^3 in this run: float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
        f"(float32 again at the end: {r['matmul_gflops_after']['float32']:.1f}). Percentages and bounds use the "
        f"higher float32 figure ({f32:.1f}).",
    ]


def _em_lines(r: dict) -> list[str]:
    """Table (a), one row per case, and the same-run ratios per size."""
    f32 = _f32_rate(r)
    lines = [
        "",
        "## (a) EM attention, C=512, K=64, T=3, B=1",
        "",
        "| size | variant | mode | median ms | GFLOP | GFLOP/s | % fp32 matmul | peak MB | ns/pixel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["em"]:
        peak = f"{row['peak_mb']:.1f}" if "peak_mb" in row else "-"
        lines.append(
            f"| {row['size']}^2 | {row['variant']} | {row['mode']} | {row['median_ms']:.2f} | {row['gflop']:.2f} | "
            f"{row['gflops_per_s']:.1f} | {100 * row['gflops_per_s'] / f32:.0f}% | {peak} | "
            f"{1e6 * row['median_ms'] / row['pixels']:.1f} |"
        )
    lines += ["", "Ratios (same run):", ""]
    by = {(row["size"], row["variant"], row["mode"]): row for row in r["em"]}
    for size in sorted({row["size"] for row in r["em"]}):
        ours, plain = by[(size, "em_attention", "inference")], by[(size, "plain_reference", "inference")]
        ema, nl = by[(size, "ema_unit", "inference")], by[(size, "nonlocal", "inference")]
        ema_t, nl_t = by[(size, "ema_unit", "train_step")], by[(size, "nonlocal", "train_step")]
        lines.append(
            f"- {size}^2: plain/em_attention {plain['median_ms'] / ours['median_ms']:.2f}x; "
            f"non-local/em_attention {nl['median_ms'] / ours['median_ms']:.1f}x; "
            f"non-local/EMAUnit inference {nl['median_ms'] / ema['median_ms']:.1f}x, "
            f"train step {nl_t['median_ms'] / ema_t['median_ms']:.1f}x"
            + (
                f"; em_attention NCHW/channels_last input {ours['median_ms'] / nhwc['median_ms']:.2f}x"
                if (nhwc := by.get((size, "em_attention_nhwc", "inference")))
                else ""
            )
        )
    return lines


def _model_lines(r: dict) -> list[str]:
    """Table (b), each median against the bound its multiply-adds imply at the measured matmul rate."""
    f32, bf16 = _f32_rate(r), r["matmul_gflops"]["bfloat16"]
    size = r["model"][0]["size"]
    lines = ["", f"## (b) EMANet OS8 inference, one {size}x{size} image", ""] + MODEL_NOTE
    lines += [
        "| backbone | precision | variant | median s | x eager forward | GMACs | bound s | x bound | labels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["model"]:
        rate = bf16 if row["precision"] == "bf16" else f32
        bound = 2 * row["gmacs"] / rate
        lines.append(
            f"| {row['backbone']} | {row['precision']} | {row['variant']} | {row['median_s']:.3f} | "
            f"{row['ratio_to_eager_forward']:.2f} | {row['gmacs']:.1f} | {bound:.3f} | "
            f"{row['median_s'] / bound:.2f}x | {row['label_agreement_vs_eager_fp32']:.4f} |"
        )
    return lines


def _compile_lines(r: dict) -> list[str]:
    """Table (c)."""
    lines = [
        "",
        "## (c) torch.compile (opt-in `--compile`), Inductor on this CPU",
        "",
        "| case | precision | eager s | compiled s | compiled / eager | first call (compile) s | rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["compile"]:
        diff = f"{row['rel_diff']:.1e}" if row["rel_diff"] is not None else "-"
        lines.append(
            f"| {row['case']} | {row['precision']} | {row['eager_s']:.3f} | {row['compiled_s']:.3f} | "
            f"{row['compiled_s'] / row['eager_s']:.2f} | {row['cold_first_call_s']:.1f} | {diff} |"
        )
    return lines


def _targets(r: dict) -> list[str]:
    f32, out = _f32_rate(r), []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if "em" in r:
        by = {(row["size"], row["variant"], row["mode"]): row for row in r["em"]}
        sizes = sorted({row["size"] for row in r["em"]})
        for size in (65, 97):
            for variant, what in (("em_attention", "NCHW input"), ("em_attention_nhwc", "channels_last input")):
                if (size, variant, "inference") in by:
                    share = by[(size, variant, "inference")]["gflops_per_s"] / f32
                    out.append(
                        f"- em_attention ({what}) >= 60% of fp32 matmul at {size}^2: {100 * share:.0f}% -> "
                        f"{verdict(share >= 0.6)}"
                    )
        ratios = [
            by[(s, "plain_reference", "inference")]["median_ms"] / by[(s, "em_attention", "inference")]["median_ms"]
            for s in sizes
        ]
        out.append(
            f"- never slower than the plain loop: plain/ours {', '.join(f'{x:.2f}' for x in ratios)} "
            f"-> {verdict(min(ratios) >= 1.0)}"
        )
        for variant in ("em_attention", "ema_unit"):
            per_px = [by[(s, variant, "inference")]["median_ms"] * 1e6 / s**2 for s in sizes]
            out.append(
                f"- {variant} cost per pixel (constant if linear in H*W): ns/pixel "
                f"{', '.join(f'{x:.0f}' for x in per_px)} (max/min {max(per_px) / min(per_px):.2f})"
            )
        if (97, "nonlocal", "inference") in by:
            nl = by[(97, "nonlocal", "inference")]
            em, unit = by[(97, "em_attention", "inference")], by[(97, "ema_unit", "inference")]
            x_em, x_unit = nl["median_ms"] / em["median_ms"], nl["median_ms"] / unit["median_ms"]
            out.append(
                f"- >= 30x cheaper than non-local at 97^2: non-local block / em_attention {x_em:.1f}x "
                f"({nl['gflop'] / em['gflop']:.1f}x in FLOPs) -> {verdict(x_em >= 30)}; "
                f"non-local block / EMA unit {x_unit:.1f}x ({nl['gflop'] / unit['gflop']:.1f}x in FLOPs)"
            )
    if "model" in r:
        by = {(row["backbone"], row["precision"], row["variant"]): row for row in r["model"]}
        for backbone in sorted({row["backbone"] for row in r["model"]}):
            for p in ("fp32", "bf16"):
                row = by.get((backbone, p, "Predictor default (prepared)"))
                if row is None:
                    continue
                ratio = row["ratio_to_eager_forward"]
                target = f" -> {verdict(ratio <= 0.85)} (target <= 0.85)" if p == "fp32" else ""
                out.append(f"- {backbone} {p}: default Predictor / eager forward {ratio:.2f}{target}")
        fp32 = [row for row in r["model"] if row["precision"] == "fp32" and "forward" in row["variant"]]
        best = min(fp32, key=lambda row: row["median_s"] / row["gmacs"])
        ratio = best["median_s"] / (2 * best["gmacs"] / f32)
        out.append(
            f"- float32 inference within 1.5x of its matmul bound: best ({best['backbone']} "
            f"{best['variant']}) {ratio:.2f}x -> {verdict(ratio <= 1.5)}"
        )
    return out
