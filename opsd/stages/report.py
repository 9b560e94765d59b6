"""`opsd report DIR`: one self-contained HTML page (plus its PNGs) of what each stage bought, read
from the folders alone.

DIR is a pipeline folder (`opsd pipeline`, `opsd demo`'s runs/demo/pipeline or seed_N), a demo
folder (its pipeline, or every seed's), or a single run folder (`opsd distill/rlvr/sft`). The page holds:
the stage table (summary.md); accuracy against mean response tokens with the Pareto front (the
stages no other stage beats on both); the training curves of every stage (divergence, rollout
accuracy, response length, student entropy, gradient norm, from metrics.jsonl); compression per
difficulty level; reflective-marker density per stage; and three sampled responses to one held-out
problem before and after each last stage of a branch, side by side (eval/<stage>/responses.jsonl). Figures are
drawn with matplotlib (the `report` extra) and embedded in the page, which needs no network.

    opsd report runs/demo/pipeline          # → runs/demo/pipeline/report/report.html and its PNGs

The page and its PNGs go into DIR/report/, a folder opsd marks as its own and replaces on the next
report (a `report` folder opsd did not write is refused, never deleted).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

from opsd.core.errors import UserError
from opsd.runtime.folders import REPORT, mark, remove_own

CURVES = (("loss/divergence", "divergence (nats/token)"), ("rollout/accuracy", "rollout accuracy"),
          ("rollout/response_tokens_mean", "response tokens"), ("loss/student_entropy", "student entropy"),
          ("optim/grad_norm", "gradient norm"))


# --- pure functions -----------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (tokens, accuracy) points that no other point dominates (fewer or equal tokens
    and higher or equal accuracy, one of them strictly), ordered by tokens."""
    front = []
    for i, (tokens, accuracy) in enumerate(points):
        dominated = any(t <= tokens and a >= accuracy and (t, a) != (tokens, accuracy) for t, a in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; a line that does not parse (a row cut short by a crash) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- what the folders hold ----------------------------------------------------------------------


def pipeline_folders(folder: Path) -> list[Path]:
    """The pipeline folders under DIR: DIR itself, a demo's pipeline, or each seed of a demo."""
    if "rows" in _read_summary(folder) and (folder / "eval").is_dir():
        return [folder]
    seeds = [p.parent for p in folder.glob("seed_*/summary.json")
             if re.fullmatch(r"seed_\d+", p.parent.name) and "rows" in _read_summary(p.parent)]
    if seeds:
        return sorted(seeds, key=lambda p: int(p.name.split("_")[1]))
    if "rows" in _read_summary(folder / "pipeline"):
        return [folder / "pipeline"]
    return []


def _read_summary(folder: Path) -> dict:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def across_seed_rows(rows: list[dict]) -> list[dict]:
    """A demo's across-seed rows (opsd/demo/demo.py `across_seeds`) in the shape of a pipeline's stage rows:
    the mean across seeds, with the standard error across seeds as the error bar."""
    return [{"stage": row["stage"], "start": row["start"], "benchmarks": [{
        "response_tokens_mean": row["response_tokens_mean"]["mean"], "mean_at_k": row["mean_at_k"]["mean"],
        "mean_at_k_stderr": row["mean_at_k"]["stderr"], "markers_per_1k_tokens": row["markers_per_1k_tokens"]["mean"]}]}
        for row in rows]


def stage_rows(pipeline: Path) -> list[dict]:
    return _read_summary(pipeline)["rows"]


# --- figures ------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("opsd report draws with matplotlib: pip install 'opsd[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour(index: int) -> str:
    """The stage's colour, the same in every figure (matplotlib's tab10/tab20 cycles)."""
    palette = ("tab:blue tab:orange tab:green tab:red tab:purple tab:brown tab:pink tab:gray tab:olive tab:cyan "
               "navy gold teal crimson indigo sienna orchid slategray yellowgreen turquoise").split()
    return palette[index % len(palette)]


def accuracy_tokens_figure(plt, rows: list[dict], title: str):
    points = [(b["response_tokens_mean"], 100 * b["mean_at_k"]) for row in rows for b in row["benchmarks"][:1]]
    errors = [100 * (b["mean_at_k_stderr"] or 0) for row in rows for b in row["benchmarks"][:1]]
    sizes = [b.get("parameters") for row in rows for b in row["benchmarks"][:1]]
    figure, axes = plt.subplots(figsize=(7.4, 4.2))
    for index, ((tokens, accuracy), error, row, size) in enumerate(zip(points, errors, rows, sizes)):
        # models of several sizes (big → small): each label says its size
        label = row["stage"] + (f" ({size / 1e6:.2f}M)" if size and len(set(sizes)) > 1 else "")
        axes.errorbar(tokens, accuracy, yerr=error, fmt="o", capsize=3, color=colour(index), label=label)
    front = pareto_front(points)  # ringed, so that a front of one point shows too
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", marker="o", markersize=12,
              markerfacecolor="none", linewidth=1, label="Pareto front")
    axes.set(xlabel="mean response tokens", ylabel="accuracy, mean@k ± s.e. (%)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def curves_figure(plt, runs: dict[str, list[dict]], stages: list[str]):
    figure, axes_list = plt.subplots(1, len(CURVES), figsize=(3.2 * len(CURVES), 3.0))
    for axes, (key, label) in zip(axes_list, CURVES):
        for stage, metrics in runs.items():
            steps = [m["step"] for m in metrics if m.get(key) is not None]
            if steps:
                axes.plot(steps, [m[key] for m in metrics if m.get(key) is not None], label=stage, linewidth=1,
                          color=colour(stages.index(stage)))
        axes.set(xlabel="step", title=label)
        axes.grid(alpha=0.3)
    handles = {line.get_label(): line for axes in axes_list for line in axes.get_lines()}
    figure.legend(handles.values(), handles.keys(), fontsize=7, loc="upper center", ncol=min(len(handles), 8),
                  bbox_to_anchor=(0.5, 0.0))
    figure.tight_layout()
    return figure


def along_training_figure(plt, curves: dict[str, list[dict]], stages: list[str]):
    """eval.every's curves: accuracy and tokens against the step, and the path each stage takes in
    the accuracy-tokens plane."""
    figure, (by_step, tokens_by_step, plane) = plt.subplots(1, 3, figsize=(15, 3.6))
    for stage, points in curves.items():
        steps = [p["step"] for p in points]
        accuracy = [100 * p["mean_at_k"] for p in points]
        tokens = [p["response_tokens_mean"] for p in points]
        style = {"color": colour(stages.index(stage)), "label": stage, "marker": "o", "markersize": 3}
        by_step.plot(steps, accuracy, **style)
        tokens_by_step.plot(steps, tokens, **style)
        plane.plot(tokens, accuracy, **style)
        plane.annotate(f"step {steps[-1]}", (tokens[-1], accuracy[-1]), fontsize=7, xytext=(4, 4),
                       textcoords="offset points")
    by_step.set(xlabel="step", ylabel="accuracy, mean@k (%)", title="accuracy along training")
    tokens_by_step.set(xlabel="step", ylabel="mean response tokens", title="length along training")
    plane.set(xlabel="mean response tokens", ylabel="accuracy, mean@k (%)", title="path in the accuracy-length plane")
    for axes in (by_step, tokens_by_step, plane):
        axes.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    figure.tight_layout()
    return figure


def budgets_figure(plt, rows: list[dict]):
    """Accuracy against the thinking budget (eval.budgets), one line per stage, first benchmark."""
    figure, axes = plt.subplots(figsize=(7.4, 4.2))
    for index, row in enumerate(rows):
        points = row["benchmarks"][0].get("budgets", [])
        axes.errorbar([p["budget"] for p in points], [100 * p["mean_at_k"] for p in points],
                      yerr=[100 * (p["mean_at_k_stderr"] or 0) for p in points], marker="o", capsize=3,
                      color=colour(index), label=row["stage"])
    axes.set_xscale("log", base=2)
    axes.set(xlabel="thinking budget (tokens)", ylabel="accuracy, mean@k ± s.e. (%)",
             title="accuracy against the thinking budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def level_compression(rows: list[dict]) -> dict[str, list[tuple[str, float]]]:
    """Per stage with a start: [(level, 1 − its mean tokens / the start stage's at that level)]."""
    by_stage = {row["stage"]: row for row in rows}
    result = {}
    for row in rows:
        start = by_stage.get(row["start"])
        if start is None:
            continue
        before = {lv["level"]: lv["response_tokens_mean"] for lv in start["benchmarks"][0].get("levels") or []}
        pairs = [(lv["level"], 1.0 - lv["response_tokens_mean"] / before[lv["level"]])
                 for lv in row["benchmarks"][0].get("levels") or [] if before.get(lv["level"])]
        if pairs:
            result[f"{row['stage']} (vs {row['start']})"] = pairs
    return result


def levels_figure(plt, rows: list[dict]):
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    stages = [row["stage"] for row in rows]
    for label, pairs in level_compression(rows).items():
        axes.plot([level for level, _ in pairs], [100 * c for _, c in pairs], "o-", label=label,
                  color=colour(stages.index(label.split(" (vs ")[0])))
    axes.axhline(0, color="k", linewidth=0.8)
    axes.set(xlabel="difficulty level", ylabel="compression (%)",
             title="compression per difficulty level: 1 − tokens / tokens of the stage it started from")
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def markers_figure(plt, rows: list[dict]):
    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    values = [row["benchmarks"][0].get("markers_per_1k_tokens") or 0.0 for row in rows]
    axes.bar([row["stage"] for row in rows], values, color=[colour(i) for i in range(len(rows))])
    axes.set(ylabel="per 1,000 tokens", title="reflective markers (wait, hmm, ...)")
    axes.tick_params(axis="x", rotation=30, labelsize=8)
    figure.tight_layout()
    return figure


# --- the page -----------------------------------------------------------------------------------


def before_after(pipeline: Path, rows: list[dict], samples: int = 3, most: int = 12) -> str:
    """Three responses to the first held-out problem before and after each stage no other stage
    started from (the ends of the pipeline's branches: the demo's `opsd` and `small-opsd`), at most `most`."""
    starts = {row["start"] for row in rows}
    ends = [row for row in rows if row["start"] and row["stage"] not in starts]  # trained stages no other starts from
    return "".join(_before_after(pipeline, row, samples) for row in ends[:most])


def _before_after(pipeline: Path, row: dict, samples: int) -> str:
    before = read_jsonl(pipeline / "eval" / row["start"] / "responses.jsonl") if row["start"] else []
    after = read_jsonl(pipeline / "eval" / row["stage"] / "responses.jsonl")
    if not before or not after:
        return ""
    problem = after[0]["id"]
    columns = []
    for name, responses in ((row["start"], before), (row["stage"], after)):
        cells = "".join(f"<pre class='{'ok' if r['correct'] else 'bad'}'>{html.escape(r['response'])}</pre>"
                        for r in [r for r in responses if r["id"] == problem][:samples])
        columns.append(f"<div class='col'><h4>{html.escape(name)}</h4>{cells}</div>")
    return (f"<h3>One problem before and after '{html.escape(row['stage'])}'</h3><p>Problem <code>"
            f"{html.escape(problem)}</code>; green: graded correct, red: wrong.</p><div "
            f"class='row'>{''.join(columns)}</div>")


def markdown_table_html(markdown: str) -> str:
    """Each markdown table of `markdown` (blocks of `|` lines) as an HTML table; other text is left out."""
    tables = []
    for block in markdown.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if len(lines) < 2:
            continue
        cells = [[html.escape(cell.strip()) for cell in line.strip("|").split("|")] for line in lines]
        head = "".join(f"<th>{c}</th>" for c in cells[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
        tables.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "<br>".join(tables)


STYLE = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
img{max-width:100%;margin:0.5em 0}.row{display:flex;gap:1em}.col{flex:1;min-width:0}
pre{font-size:12px;white-space:pre-wrap;padding:6px;border-left:4px solid}pre.ok{border-color:#2a2}
pre.bad{border-color:#c33}"""


def write_report(folder: Path) -> Path:
    """Write report/report.html and its PNGs into `folder`; return the page's path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"opsd report: {folder} is not a folder")
    pipelines = pipeline_folders(folder)
    single_run = not pipelines and (folder / "metrics.jsonl").is_file()
    if not pipelines and not single_run:
        raise UserError(f"opsd report: {folder} holds no pipeline summary (summary.json) and no run (metrics.jsonl)")
    plt = _pyplot()
    out = folder / REPORT
    remove_own(out, "opsd report", kind="listed")
    out.mkdir()
    written = ["report.html"]
    mark(out, "listed", written)  # first, so that an interrupted report is still recognised as ours
    sections = []

    def image(figure, caption: str) -> str:
        path = out / f"{len(written):02d}-{caption.replace(' ', '-')}.png"
        written.append(path.name)
        mark(out, "listed", written)
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'></figure>"

    if single_run:
        sections.append(f"<h2>Training curves of {html.escape(folder.name)}</h2>"
                        + image(curves_figure(plt, {folder.name: read_jsonl(folder / "metrics.jsonl")}, [folder.name]),
                              "training curves"))
    seeds = _read_summary(folder).get("seeds")
    if seeds and len(pipelines) > 1:  # a demo over several seeds: its across-seed table first
        rows = across_seed_rows(_read_summary(folder)["rows"])
        sections.append(f"<h2>Across seeds {', '.join(map(str, seeds))}</h2>"
                        + markdown_table_html((folder / "summary.md").read_text()))
        sections.append(image(accuracy_tokens_figure(plt, rows, "accuracy against length, mean ± s.e. across seeds"),
                              "accuracy-tokens across seeds"))
    for pipeline in pipelines:
        rows = stage_rows(pipeline)
        title = pipeline.name if len(pipelines) > 1 else "stages"
        runs = {row["stage"]: read_jsonl(pipeline / row["stage"] / "metrics.jsonl") for row in rows}
        runs = {stage: metrics for stage, metrics in runs.items() if metrics}
        sections.append(f"<h2>{html.escape(title)}</h2>" + markdown_table_html((pipeline / "summary.md").read_text()))
        sections.append(image(accuracy_tokens_figure(plt, rows, f"accuracy against length · {title}"),
                              "accuracy-tokens"))
        if any(row["benchmarks"][0].get("budgets") for row in rows):
            sections.append("<h3>At fixed thinking budgets (eval.budgets)</h3>"
                            + image(budgets_figure(plt, rows), "accuracy against budget"))
        curves = _read_summary(pipeline).get("curves")
        if curves:
            sections.append("<h3>Along training (eval.every)</h3>" + image(
                along_training_figure(plt, curves, [row["stage"] for row in rows]), "along training"))
        if runs:
            sections.append("<h3>Training curves</h3>" + image(curves_figure(plt, runs, [row["stage"] for row in rows]),
                                                                  "training curves"))
        if level_compression(rows):
            sections.append(image(levels_figure(plt, rows), "compression per level"))
        sections.append(image(markers_figure(plt, rows), "reflective markers"))
        sections.append(before_after(pipeline, rows))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>opsd report · {html.escape(folder.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>opsd report · {html.escape(str(folder))}</h1>"
            + "".join(sections) + "</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
