"""The report of `tether bench quality`: JSON, Markdown tables, PNG plots and one self-contained HTML page.

    quality.json            everything: command, device, wall time, every run's evaluation, the aggregates
    quality.md              the papers' table shape: rows = policies / models, columns = metrics,
                            one block for 60 s and one for 240 s, then identity after re-entry per gap
                            and the effective context length
    quality_<block>_<metric>.png   the metric over time on the block's long episode, one line per row
    quality_reentry.png     identity retention after re-entry against the gap, one line per row
    quality.html            the tables, every plot and a frame strip per row, images inlined as
                            base64 data URIs (one file to mail or open anywhere)
"""

import base64
import html
import json
from pathlib import Path

from .quality import BLOCKS, METRICS, REENTRY_GAPS, RETENTION_THRESHOLD, SERIES_METRICS, _fmt

ARROWS = {"up": " ↑", "down": " ↓", None: ""}
TITLES = {
    "adherence": "prompt adherence (probe)",
    "identity_retention": "identity retention (probe)",
    "background_stability": "background stability (probe)",
    "subject_consistency": "subject consistency",
    "background_consistency": "background consistency",
    "consistency": "consistency (whole frame)",
    "temporal_flicker": "temporal flicker score",
}



def block_table(summary: dict, block: str) -> tuple:
    """(header cells, rows of cells) of one block, or None when no row ran an episode of it."""
    rows = [(label, a) for label, a in summary["aggregates"].items() if block in a["blocks"]]
    if not rows:
        return None
    header = ["policy / model"] + [title + ARROWS[better] for _, title, better in METRICS]
    if block == "60s":
        header.append("eff. context ↑")
    body = []
    for label, a in rows:
        values = a["blocks"][block]
        cells = [label]
        for key, _, _ in METRICS:
            cell = _fmt(values.get(key))
            if key == "chunks_to_follow" and values.get("switches"):
                cell += f" ({values['switches_followed']}/{values['switches']})"
            if key == "abrupt_resets":
                cell = _fmt(values.get(key), 1)
            cells.append(cell)
        if block == "60s":
            cells.append(a["effective_context"])
        body.append(cells)
    return header, body


def reentry_table(summary: dict):
    gaps = sorted({float(g) for a in summary["aggregates"].values() for g in a["reentry_identity"]})
    if not gaps:
        return None
    header = ["policy / model"] + [f"identity after {g:g} s away" for g in gaps] + ["eff. context"]
    body = [[label] + [_fmt(a["reentry_identity"].get(f"{g:g}")) for g in gaps] + [a["effective_context"]]
            for label, a in summary["aggregates"].items()]
    return header, body


def _markdown(header, body) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _block_caption(summary: dict, block: str) -> str:
    episodes = sorted({r["episode"] for r in summary["runs"] if r["block"] == block},
                      key=summary["episodes"].index)
    seeds = summary["seeds"]
    return (f"{block} block: episodes {', '.join(episodes)}; {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
            f"({', '.join(map(str, seeds))})")


def compute_line(summary: dict) -> str:
    """Wall time of this invocation, and the compute recorded in every run, cached ones included."""
    runs = summary.get("runs", [])
    generate = sum(r.get("generate_seconds", 0.0) for r in runs)
    evaluate = sum(r.get("eval_seconds", 0.0) for r in runs)
    return (f"wall time {summary['wall_seconds']:.0f} s ({summary['runs_generated']} runs generated, "
            f"{summary['runs_cached']} cached); all {len(runs)} runs took {generate:.0f} s to generate and "
            f"{evaluate:.0f} s to evaluate")


def markdown(summary: dict) -> str:
    lines = ["# tether bench quality", "",
             f"`{summary['command']}`", "",
             f"Device: {summary['device']}; {compute_line(summary)}; "
             f"features `{summary['features']}`; {summary['date_utc']}.", ""]
    lines += [f"- `{name}`: {description}" for name, description in summary["models"].items()]
    lines += ["", "Means over each block's runs (episodes × seeds). Adherence, identity, background stability, "
              "switch adherence, chunks to follow (followed / switches) and resets are read by the probe; "
              f"drift is the last {summary['window_seconds']:g} s window minus the first.", ""]
    for block in BLOCKS:
        table = block_table(summary, block)
        if table:
            lines += [f"## {_block_caption(summary, block)}", ""] + _markdown(*table) + [""]
    table = reentry_table(summary)
    if table:
        lines += ["## Re-entry and effective context length", "",
                  f"Identity retention after the subject was out of view for the gap: the share of its shape, "
                  f"colour, pattern and size readings in the return segment that match its first look "
                  f"(mean over seeds; a subject that never comes back scores 0). Effective context length: the longest gap at which it stays "
                  f"≥ {RETENTION_THRESHOLD:.0%} at every tested gap up to it.", ""] + _markdown(*table) + [""]
    return "\n".join(lines)


def plot_paths(summary: dict, out: Path) -> list:
    """Draw every plot; [(title, path)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for block in BLOCKS:
        rows = [(label, a["series"][block]) for label, a in summary["aggregates"].items() if block in a["series"]]
        if not rows:
            continue
        for metric in SERIES_METRICS:
            lines = [(label, s["t"], s[metric]) for label, s in rows if metric in s]
            if not lines:
                continue
            fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
            drawn = 0
            for label, t, values in lines:
                points = [(x, v) for x, v in zip(t, values) if v is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=label)
                    drawn += 1
            if not drawn:  # nothing scored (e.g. every attribute stated: no identity to retain)
                plt.close(fig)
                continue
            episode = rows[0][1]["episode"]
            ax.set_title(f"{TITLES[metric]} over time: {episode}")
            ax.set_xlabel(f"seconds (window start, {summary['window_seconds']:g} s windows)")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out / f"quality_{block}_{metric}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append((f"{TITLES[metric]} ({episode})", path))
    gaps = {label: a["reentry_identity"] for label, a in summary["aggregates"].items() if a["reentry_identity"]}
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        for label, retention in gaps.items():
            xs = sorted(retention, key=float)
            ax.plot([float(x) for x in xs], [retention[x] for x in xs], marker="o", label=label)
        ax.axhline(RETENTION_THRESHOLD, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(REENTRY_GAPS.values()))
        ax.set_xticklabels([f"{g:g}" for g in sorted(REENTRY_GAPS.values())])
        ax.set_title("identity retention after re-entry")
        ax.set_xlabel("seconds out of view")
        ax.set_ylabel("identity retention")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / "quality_reentry.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(("identity retention after re-entry", path))
    return written


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_table(header, body) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def strips(summary: dict, runs_dir: Path) -> list:
    """[(block, episode, [(row label, strip path)])]: the first seed's frames of each block's series episode."""
    out = []
    for block in BLOCKS:
        episodes = {a["series"][block]["episode"] for a in summary["aggregates"].values() if block in a["series"]}
        for episode in sorted(episodes):
            found = []
            for label in summary["aggregates"]:
                runs = [r for r in summary["runs"] if r["label"] == label and r["episode"] == episode]
                if runs:
                    path = runs_dir / f"{min(runs, key=lambda r: r['seed'])['key']}.png"
                    if path.exists():
                        found.append((label, path))
            if found:
                out.append((block, episode, found))
    return out


def html_page(summary: dict, plots: list, strip_rows: list) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tether bench quality</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img.strip{image-rendering:pixelated;height:96px}img.plot{max-width:100%}code{background:#f3f3f3}",
        "</style></head><body>",
        "<h1>tether bench quality</h1>",
        f"<p><code>{html.escape(summary['command'])}</code></p>",
        f"<p>Device: {html.escape(summary['device'])}; {html.escape(compute_line(summary))}; "
        f"features <code>{html.escape(summary['features'])}</code>; {html.escape(summary['date_utc'])}</p><ul>",
    ]
    parts += [f"<li><code>{html.escape(n)}</code>: {html.escape(str(d))}</li>" for n, d in summary["models"].items()]
    parts.append("</ul>")
    for block in BLOCKS:
        table = block_table(summary, block)
        if table:
            parts += [f"<h2>{html.escape(_block_caption(summary, block))}</h2>", _html_table(*table)]
    table = reentry_table(summary)
    if table:
        parts += ["<h2>Re-entry and effective context length</h2>", _html_table(*table)]
    if plots:
        parts.append("<h2>Metrics over time</h2>")
        parts += [f"<figure><img class='plot' alt='{html.escape(t)}' src='{_data_uri(p)}'>"
                  f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in plots]
    for block, episode, found in strip_rows:
        parts.append(f"<h2>Frames: {html.escape(episode)} (seed {summary['seeds'][0]}, evenly spaced)</h2><table>")
        parts += [f"<tr><td>{html.escape(label)}</td><td><img class='strip' alt='{html.escape(label)}' "
                  f"src='{_data_uri(path)}'></td></tr>" for label, path in found]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(summary: dict, out: Path) -> list:
    """Write every output into `out`; the list of paths written."""
    out = Path(out)
    json_path, md_path, html_path = out / "quality.json", out / "quality.md", out / "quality.html"
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    md_path.write_text(markdown(summary) + "\n")
    plots = plot_paths(summary, out)
    html_path.write_text(html_page(summary, plots, strips(summary, out / "quality_runs")))
    return [json_path, md_path, html_path] + [p for _, p in plots]
