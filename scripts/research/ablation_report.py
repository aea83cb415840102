"""docs/results.md and docs/recovery.png from the results of scripts/research/ablation.py."""

from __future__ import annotations

from pathlib import Path

VARIANT_NOTES = {
    "mean": "`--recipe mean`: the GQA paper's rule, the mean of each group's heads",
    "first": "`--recipe first`: each group's first head (the paper's ablation)",
    "random": "`--recipe random`: fresh heads drawn like the model's init (the paper's ablation)",
    "aligned (old)": "`--recipe closed-form`: the closed-form merge before the aligned recipe: complex per-pair K, "
    "plain-moment V, no o_proj solve, not sequential, not refined",
    "aligned": "`--recipe aligned`: frequency-aware K chosen per layer, V fitted to each query head's attended "
    "moment (alternating solve), joint o_proj solve (its ridge chosen per layer on held-out batches), sequential "
    "calibration, no refinement",
    "aligned, head-averaged V": "`--recipe aligned-averaged-v`: the same, V fitted to the head-averaged attended "
    "moment in one closed form",
    "aligned, not sequential": "`--recipe aligned-not-sequential`: the same, each layer calibrated on the source's "
    "own inputs",
    "aligned, mixed calibration": "`--recipe aligned` calibrated on the calibration text plus as many tokens of "
    "another domain's text (two `--calib-data`)",
    "aligned + refine": "`--recipe aligned-refined`: the same, then 100 Adam steps per layer toward the decoder "
    "block's output",
    "aligned + attention refine": "`--recipe aligned-refined-attention`: the refinement toward the attention's output",
    "aligned + similarity": "`--recipe aligned-similarity`: the same, with the most alike kv heads grouped per layer",
}


SETUP_NOTES = {
    "B": "SmolLM2's MHA-9 expansion with the heads shuffled -> GQA-3, with `--recipe aligned-similarity`",
    "C": "SmolLM2's MHA-9 expansion with the heads shuffled -> MQA",
}
CONVERT_NOTE = (
    "Convert seconds are wall-clock on a CPU shared with other jobs: they vary with the load and compare "
    "only roughly, even within one run."
)


def _ratio(value: float, original: float) -> str:
    return f"{value:,.2f} ({value / original:,.2f}x)"


def _init_table(results: dict, ood_names: list[str]) -> list[str]:
    original = results["original"]
    header = "| setup | variant | grouping | held-out | " + " | ".join(ood_names) + " | convert s |"
    lines = [header, "|" + "---|" * (5 + len(ood_names))]
    for row in results["init"]:
        target = "MQA" if row["kv_heads"] == 1 else "GQA-{}".format(row["kv_heads"])
        cells = [_ratio(row["heldout"], original["heldout"])]
        cells += [_ratio(row[name], original[name]) for name in ood_names]
        lines.append(
            f"| {row['source']} -> {target} | {row['variant']} | {row['grouping']} | "
            + " | ".join(cells)
            + f" | {row['convert_s']:,.0f} |"
        )
    return lines


def _verdict(value: float, target: float, goal: float) -> str:
    if value <= goal:
        return "**met** (goal met too)"
    return "**met** (goal not met)" if value <= target else "**not met**"


def _goals(results: dict, ood_names: list[str]) -> list[str]:
    original = results["original"]
    by = {(r["setup"], r["variant"]): r for r in results["init"]}
    lines = ["## Against the project's goals", ""]
    row = by.get(("A", "aligned"))
    if row:
        ratio = row["heldout"] / original["heldout"]
        lines.append(
            f"- GQA-3 -> MQA, `aligned`, no training, held-out: {ratio:.2f}x the original (target <= 2.0x, goal 1.5x): {_verdict(ratio, 2.0, 1.5)}."
        )
        for name in ood_names:
            ratio = row[name] / original[name]
            lines.append(
                f"- The same on `{name[4:]}` (another domain), calibrated on the calibration text only: {ratio:.2f}x (target <= 6x, goal 1.5x): {_verdict(ratio, 6.0, 1.5)}."
            )
    mixed = by.get(("A", "aligned, mixed calibration"))
    if mixed:
        for name in ood_names:
            ratio = mixed[name] / original[name]
            lines.append(
                f"- The same on `{name[4:]}`, calibration mixed with another domain's text (not this one): {ratio:.2f}x (target <= 6x, goal 1.5x): {_verdict(ratio, 6.0, 1.5)}; held-out {mixed['heldout'] / original['heldout']:.2f}x."
            )
    for run in results["uptrain"]:
        if run["variant"] in ("aligned", "aligned + refine"):
            ratio = run["curve"][-1][1] / original["heldout"]
            lines.append(
                f"- `{run['variant']}` init after {run['curve'][-1][0]:,} distilled tokens: {ratio:.2f}x (target <= 1.6x): {'**met**' if ratio <= 1.6 else '**not met**'}."
            )
    gpu = (results.get("gpu_refine") or {}).get("rows", {})
    if "block:100" in gpu:  # the default on a GPU
        row, base = gpu["block:100"], gpu["original"]
        ratio, other = row["heldout"] / base["heldout"], row["other_domain"] / base["other_domain"]
        lines.append(
            f"- The same with the GPU's default block refinement (100 steps; section below): held-out {ratio:.2f}x "
            f"(target <= 2.0x, goal 1.5x): {_verdict(ratio, 2.0, 1.5)}; technical.txt {other:.2f}x (target <= 6x, "
            f"goal 1.5x): {_verdict(other, 6.0, 1.5)}."
        )
    similar = by.get(("B", "aligned + similarity"))
    if similar:
        ratio = similar["heldout"] / results["mha9"]
        verdict = "**met**" if abs(ratio - 1) <= 0.01 else "**not met**"
        lines.append(
            f"- Similarity grouping on shuffled heads: {ratio:.4f}x the MHA-9 expansion (exact expected, within 1%): {verdict}."
        )
    return lines


def _gpu_refine(results: dict) -> list[str]:
    gpu = results.get("gpu_refine")
    if not gpu:
        return []
    rows = gpu["rows"]
    original = rows["original"]
    lines = [
        "## Refinement, on a GPU (setup A)",
        "",
        f"Command: `{gpu['command']}`" + (f" ({gpu['versions']})." if gpu["versions"] else "."),
        "The same calibration text and held-out windows as above; the other domain is `technical.txt`. "
        "`none`: `--recipe aligned`; `block:100`: `--recipe aligned-refined`; `attention:100`: `--recipe "
        "aligned-refined-attention`; `block:N[:lr]` / `attention:N[:lr]`: recipe aligned with `refine: {steps: N, "
        "target: block|attention, lr: LR}` (lr 3e-4 unless given; scripts/gpu_check.py writes that recipe file). "
        "Refine error: the mean over layers of the held-out error of the fit before -> after.",
        "",
        "| variant | held-out | technical.txt | convert s | refine error |",
        "|---|---|---|---|---|",
        f"| original | {original['heldout']:.2f} | {original['other_domain']:.2f} | | |",
    ]
    for name, row in rows.items():
        if name == "original":
            continue
        fit = row.get("refine_error_mean_before_after")
        cells = [_ratio(row["heldout"], original["heldout"]), _ratio(row["other_domain"], original["other_domain"])]
        fit_cell = f"{fit[0]:.4f} -> {fit[1]:.4f}" if fit else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['convert_s']:,.0f} | {fit_cell} |")
    return lines


def _diagnostic(results: dict, ood_names: list[str]) -> list[str]:
    if not results["diagnostic"]:
        return []
    original = results["original"]
    lines = [
        "## Where the loss is: K only, V only (setup A)",
        "",
        "The same recipe with one side merged (to one head, repeated to every kv head) and the other kept "
        "as in the source (`scripts/research/merge_diagnostic.py --recipe RECIPE`).",
        "",
        "| variant | merged | held-out | " + " | ".join(ood_names) + " |",
        "|" + "---|" * (3 + len(ood_names)),
    ]
    for row in results["diagnostic"]:
        cells = [_ratio(row["heldout"], original["heldout"])] + [_ratio(row[n], original[n]) for n in ood_names]
        lines.append(f"| {row['variant']} | {row['side']} | " + " | ".join(cells) + " |")
    return lines


def _uptraining(results: dict) -> list[str]:
    if not results["uptrain"]:
        return []
    settings = results["settings"]
    lines = [
        f"## After distillation (setup A, {settings['uptrain_tokens']:,} tokens of the calibration text, "
        f"attention parameters, lr {settings['lr']}, batches of {settings.get('micro_batch', 4)} x 512, "
        "KL to the GQA-3 teacher)",
        "",
        "| init | held-out perplexity at tokens trained | seconds |",
        "|---|---|---|",
    ]
    for run in results["uptrain"]:
        curve = ", ".join(f"{tokens:,}: {value:,.1f}" for tokens, value in run["curve"])
        lines.append(f"| {run['variant']} | {curve} | {run['seconds']:,} |")
    return lines + ["", "![held-out perplexity against distillation tokens](recovery.png)"]


def write_markdown(results: dict, path: Path) -> None:
    original, settings = results["original"], results["settings"]
    ood_names = [name for name in original if name.startswith("ood:")]
    lines = [
        "# Merge ablation on SmolLM2-135M",
        "",
        *[
            f"Command: `{run['command']}` ({run['minutes']} min on {run['machine']}, {run['date']})."
            for run in results.get("runs") or [results]
        ],
        f"Held-out: the last 30% of `{Path(settings['text']).name}`, first {settings['eval_tokens']} tokens, windows of "
        f"512. Other domains: " + ", ".join(f"`{n[4:]}`" for n in ood_names) + f" (first {settings['eval_tokens']} "
        f"tokens, windows of 512; never calibrated on). Calibration: the first {settings['calib_tokens']} tokens of "
        "the first 70%, windows of 512. Perplexity, and in brackets its ratio to the original's.",
        "",
        "Original SmolLM2-135M-Instruct (GQA-3, Q4_1 GGUF dequantized): "
        + ", ".join(f"{name}: **{value:.2f}**" for name, value in original.items())
        + (
            f". Its MHA-9 expansion with shuffled heads: {results['mha9']:.2f} (the same function)."
            if "mha9" in results
            else "."
        ),
        "",
        "## At init (no training)",
        "",
        *_init_table(results, ood_names),
        "",
        *[
            f"- `{name}`: {note}."
            for name, note in VARIANT_NOTES.items()
            if any(r["variant"] == name for r in results["init"])
        ],
        "",
        *_goals(results, ood_names),
        "",
        *_gpu_refine(results),
        "",
        *_diagnostic(results, ood_names),
        "",
        *_uptraining(results),
    ]
    if settings.get("calib_extra"):
        lines += [
            "",
            f"Mixed calibration text: `{Path(settings['calib_extra']).name}`, made by "
            f"`python scripts/research/make_ood_text.py --kind readme --out {settings['calib_extra']}` (the long descriptions "
            "of the installed Python packages: its content depends on what is installed).",
        ]
    skipped = [setup for setup in ("A", "B", "C") if setup not in settings["setups"].split(",")]
    if skipped:
        notes = "; ".join(f"{setup}: {SETUP_NOTES[setup]}" for setup in skipped)
        lines += ["", f"Not run here (`--setups {settings['setups']}`): {notes}."]
    lines += ["", CONVERT_NOTE]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    if not results["uptrain"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in results["uptrain"]:
        tokens, values = zip(*run["curve"])
        axis.plot(tokens, values, marker="o", label=f"{run['variant']} init")
    axis.axhline(results["original"]["heldout"], color="gray", linestyle="--", label="original GQA-3")
    axis.set_yscale("log")
    axis.set_xlabel("distillation tokens")
    axis.set_ylabel("held-out perplexity (log)")
    axis.set_title("SmolLM2-135M GQA-3 -> MQA: recovery by init")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
