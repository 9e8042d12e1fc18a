"""Tables and plots of evaluations: one run's rank curve (eval) and several methods side by side (compare)."""
import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from .files import save_figure, write_json, write_text  # noqa: E402
from .rundir import EVAL_JSON, EVAL_MD, RANK_CURVE  # noqa: E402


def pct(x) -> str:
    """A fraction as a percentage with one decimal; '' for None."""
    return "" if x is None else f"{100 * x:.1f}"


def markdown_table(result: dict) -> str:
    """The paper's Table 1/2 layout (PT, one column per rank, AURAC) and a per-rank detail table."""
    ranks = result["ranks"]
    head = ["Adapter", "PT"] + [str(k) for k in ranks] + ["AURAC", "log-AURAC"]
    row = [f"{result['method']} (R={result['max_rank']})", pct(result["pretrained"])]
    row += [pct(r["value"]) for r in result["per_rank"]] + [pct(result["aurac"]), pct(result.get("log_aurac"))]
    shots = "task-default" if result["shots"] is None else result["shots"]
    lines = [f"# {result['task']}: {result['metric']} (%) per rank", "",
             f"{shots}-shot, {result['per_rank'][0]['n']} examples; PT = the base model without adapter.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    names = sorted(result["pretrained_metrics"])
    lines += ["| rank | " + " | ".join(names) + " | n | seconds |", "|" + "---|" * (len(names) + 3)]
    entries = [("PT", result["pretrained_metrics"], result["per_rank"][0]["n"], result["pretrained_seconds"])]
    entries += [(str(r["rank"]), r["metrics"], r["n"], r["seconds"]) for r in result["per_rank"]]
    for name, metrics, n, seconds in entries:
        cells = [f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else "" for m in names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {n} | {seconds} |")
    return "\n".join(lines) + "\n"


def plot_rank_curves(curves: dict, ranks, pretrained: float, metric: str, title: str, path: str) -> None:
    """One line per label in ``curves`` ({label: values per rank}) on a log2 rank axis, the base model as a
    dashed line; written atomically to ``path``. Labels "METHOD (variant)" share METHOD's colour and differ in
    line style, so a plot of many runs stays readable."""
    many = len(curves) > 6
    fig, ax = plt.subplots(figsize=(8.5 if many else 6, 4), dpi=120)
    colours, styles = plt.get_cmap("tab10").colors, ["o-", "s--", "^:", "d-."]
    methods, variants = list(dict.fromkeys(label.split(" (")[0] for label in curves)), {}
    for label, values in curves.items():
        m = label.split(" (")[0]
        variants[m] = variants.get(m, -1) + 1
        ax.plot(ranks, values, styles[variants[m] % len(styles)], color=colours[methods.index(m) % len(colours)],
                label=label)
    ax.axhline(pretrained, color="gray", linestyle="--", label="pretrained")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    if many:  # beside the axes, where it hides no curve
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_curve(result: dict, path: str) -> None:
    """The run's value vs rank."""
    label = f"{result['method']} (R={result['max_rank']})"
    plot_rank_curves({label: [r["value"] for r in result["per_rank"]]}, result["ranks"], result["pretrained"],
                     result["metric"], f"{result['task']}  AURAC {result['aurac']:.3f}", path)


def write_eval_outputs(result: dict, output_dir: str) -> None:
    """eval.json, eval.md and rank_curve.png of one evaluation."""
    write_json(os.path.join(output_dir, EVAL_JSON), result, indent=1)
    write_text(os.path.join(output_dir, EVAL_MD), markdown_table(result))
    plot_curve(result, os.path.join(output_dir, RANK_CURVE))


def compare_markdown(summary: dict) -> str:
    """One row per method (mean over seeds), one column per rank, then AURAC and log-AURAC; best AURAC in bold."""
    ranks = summary["ranks"]
    head = ["method"] + [f"r={k}" for k in ranks] + ["AURAC", "log-AURAC"]
    best = max(e["aurac"] for e in summary["methods"].values())
    lines = [f"{summary['task']}: {summary['metric']} (%), mean over seeds {summary['seeds']}; "
             f"pretrained (no adapter): {pct(summary['pretrained'])}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, e in summary["methods"].items():
        a = pct(e["aurac"])
        if len(summary["methods"]) > 1 and e["aurac"] == best:
            a = f"**{a}**"
        cells = [m] + [pct(v) for v in e["per_rank"]] + [a, pct(e.get("log_aurac"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(summary: dict, path: str) -> None:
    """Every method's mean curve vs rank on a log2 axis, the pretrained level as a dashed line."""
    curves = {f"{m} (AURAC {100 * e['aurac']:.1f})": e["per_rank"] for m, e in summary["methods"].items()}
    title = f"{summary['task']}: mean over seeds {', '.join(map(str, summary['seeds']))}"
    plot_rank_curves(curves, summary["ranks"], summary["pretrained"], summary["metric"], title, path)


def write_compare_outputs(summary: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "compare.json"), "md": os.path.join(output_dir, "compare.md"),
             "png": os.path.join(output_dir, "compare.png")}
    write_json(paths["json"], summary)
    write_text(paths["md"], compare_markdown(summary))
    compare_plot(summary, paths["png"])
    return paths


def plot_profiles(summary: dict, path: str) -> None:
    """A metric vs adapter parameters (``summary["metric"]``, default answer-token accuracy): the uniform ranks
    and the allocated profiles on one log axis, each entry's value in its ``eval`` dict."""
    metric = summary.get("metric", "token_acc")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, style in (("uniform", "uniform rank", "o-"), ("profiles", "allocated profile", "s--")):
        points = sorted((e["params"], e["eval"][metric]) for e in summary[key] if "eval" in e)
        if points:
            ax.plot(*zip(*points), style, label=label)
    for e in summary["uniform"]:
        if "eval" in e:
            ax.annotate(f"r{e['rank']}", (e["params"], e["eval"][metric]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    if "base" in summary:
        ax.axhline(summary["base"][metric], color="gray", linestyle="--", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("answer-token accuracy" if metric == "token_acc" else metric)
    ax.set_title(f"{summary['eval_data']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
