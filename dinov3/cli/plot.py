"""dinov3-plot: figures of a dinov3-train run, from its metrics.jsonl, config.yaml and probes/.

Writes into RUN_DIR/plots (or --output):
  losses.png      every loss term over iterations (DINO global/local, iBOT, KoLeo, Gram, total), the start of the
                  Gram phase marked, log K drawn on the DINO terms
  health.png      DINO and iBOT target/student entropies against log K, CLS-CLS and CLS-patch cosines, feature rank
  schedules.png   learning rate, teacher temperature, teacher momentum, Gram loss weight
  probes.png      the probe maps (PCA and patch similarity of the fixed probe images) over iterations
  index.html      the figures and the probe maps (PCA and patch similarity of the fixed probe images) as a
                  strip over iterations
It reads a run while it trains too (a line being written is skipped).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ._common import CLIError, check_output_dir, positive_int, run_cli

PROG = "dinov3-plot"

LOSS_PANELS = (("dino_global_crops_loss", "DINO, global crops"), ("dino_local_crops_loss", "DINO, local crops"),
               ("ibot_loss", "iBOT (masked patches)"), ("koleo_loss", "KoLeo"), ("gram_loss", "Gram anchoring"),
               ("total_loss", "total (weighted)"))
HEALTH_PANELS = (
    ("DINO head entropy (nats)", ("dino_target_entropy", "dino_student_entropy"), "log_k"),
    ("iBOT head entropy (nats)", ("ibot_target_entropy", "ibot_student_entropy"), None),
    ("teacher CLS cosine", ("cls_pairwise_cos", "cls_patch_cos"), "cos_threshold"),
    ("effective rank of the CLS features", ("feature_rank",), None),
)
SCHEDULE_PANELS = (("lr", "learning rate"), ("teacher_temp", "teacher temperature"), ("momentum", "teacher momentum"),
                   ("gram_loss_weight", "Gram loss weight"))
MAX_STRIP_COLUMNS = 12


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --output folder of a dinov3-train run")
    p.add_argument("--output", default=None, help="where to write the figures and index.html (default RUN_DIR/plots)")
    p.add_argument("--title", default=None, help="figure titles start with this (default: RUN_DIR's name)")
    p.add_argument("--smooth", type=int, default=None,
                   help="moving-average window in logged rows drawn over the raw curves (default: about 1/50 of the "
                        "rows; 1 = none)")
    p.add_argument("--strip-columns", type=positive_int, default=MAX_STRIP_COLUMNS,
                   help=f"probe events shown in the HTML strip, evenly spaced, first and last kept "
                        f"(default {MAX_STRIP_COLUMNS})")
    return p


# ------------------------------------------------------------------------------------------------ the run's files
def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def gram_start(rows: list[dict], cfg: dict) -> int | None:
    """The first iteration of the Gram phase: where the config puts it (rows are logged every few iterations), else
    the first row that has it on; None for a run without one, or whose rows have not reached it yet (a mark past
    the last row would only stretch the iteration axis)."""
    g = cfg.get("gram") or {}
    if isinstance(g.get("use_loss"), bool):
        start = int(g["start_iter"]) if g["use_loss"] and isinstance(g.get("start_iter"), int) else None
        last = max((int(r["iteration"]) for r in rows), default=-1)
        return start if start is not None and start <= last else None
    return next((int(r["iteration"]) for r in rows if r.get("gram_active")), None)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ------------------------------------------------------------------------------------------------ figures
def _panel(ax, rows, keys, *, smooth, labels=None, colors=None):
    drawn = False
    for i, key in enumerate(keys):
        xs, ys = series(rows, key)
        if not xs:
            continue
        color = (colors or [None] * len(keys))[i] or f"C{i}"
        label = (labels or keys)[i]
        if smooth > 1 and len(ys) > smooth:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, moving_average(ys, smooth), color=color, linewidth=1.6, label=label)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.4, label=label, marker="." if len(xs) < 30 else None)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes, color="0.5")
    return drawn


def _mark_gram(ax, start):
    if start is not None:
        ax.axvline(start, color="crimson", linestyle=":", linewidth=1.2, label="Gram phase starts")


@dataclass
class Panel:
    title: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    lines: tuple[tuple[float, str], ...] = ()  # horizontal reference lines (value, legend label)


def draw_panels(plt, rows, panels: list[Panel], *, shape: tuple[int, int], figsize, start, smooth: int,
                legend: bool, path: Path, title: str) -> None:
    """One figure of panels over iterations sharing the x axis, the Gram phase start marked on each."""
    fig, axes = plt.subplots(*shape, figsize=figsize, sharex=True, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        _panel(ax, rows, p.keys, smooth=smooth, labels=p.labels)
        for y, label in p.lines:
            ax.axhline(y, color="0.4", linestyle="--", linewidth=1, label=label)
        _mark_gram(ax, start)
        ax.set_title(p.title, fontsize=10)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _last(rows, key):
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def plot_losses(plt, rows, cfg, start, smooth, path: Path, title: str) -> None:
    log_k = _last(rows, "dino_log_k")
    panels = [Panel(name, (key,), (name,), ((log_k, f"log K = {log_k:.3f}"),)
                    if key.startswith("dino_") and log_k is not None else ()) for key, name in LOSS_PANELS]
    draw_panels(plt, rows, panels, shape=(2, 3), figsize=(13, 6.5), start=start, smooth=smooth, legend=True,
                path=path, title=f"{title}: loss terms")


def plot_health(plt, rows, cfg, start, smooth, path: Path, title: str) -> None:
    log_k = _last(rows, "dino_log_k")
    threshold = (cfg.get("health") or {}).get("cls_cos_threshold")
    lines = {"log_k": ((log_k, f"log K = {log_k:.3f} (uniform)"),) if log_k is not None else (),
             "cos_threshold": ((threshold, f"alarm above {threshold:g}"),) if threshold is not None else (), None: ()}
    panels = [Panel(name, keys, tuple(k.replace("_", " ") for k in keys), lines[extra])
              for name, keys, extra in HEALTH_PANELS]
    draw_panels(plt, rows, panels, shape=(2, 2), figsize=(11, 6.5), start=start, smooth=smooth, legend=True,
                path=path, title=f"{title}: health")


def plot_schedules(plt, rows, cfg, start, path: Path, title: str) -> None:
    panels = [Panel(name, (key,), (name,)) for key, name in SCHEDULE_PANELS]
    draw_panels(plt, rows, panels, shape=(1, 4), figsize=(14, 3.2), start=start, smooth=1, legend=False, path=path,
                title=f"{title}: schedules")


# ------------------------------------------------------------------------------------------------ HTML
def probe_layout(run_dir: Path, columns: int) -> tuple[Path, list[int], int, list[str]]:
    """(probes folder, the events to show (at most ``columns``, evenly spaced, first and last kept), number of probe
    images, map kinds ("pca" first, then "sim_rR_cC"))."""
    from dinov3.train.probes import PROBE_DIR, event_name, list_events

    probe_dir = run_dir / PROBE_DIR
    events = list_events(str(probe_dir))
    if len(events) > columns:
        step = (len(events) - 1) / (columns - 1) if columns > 1 else 0
        events = sorted({events[round(i * step)] for i in range(columns)} | {events[-1]})
    if not events:
        return probe_dir, [], 0, []
    first = probe_dir / event_name(events[0])
    n_images = len({f.name.split("_", 1)[0] for f in first.glob("probe*_*.png")})
    kinds = sorted({f.name.split("_", 1)[1][:-4] for f in first.glob("probe0_*.png")}, key=lambda k: (k != "pca", k))
    return probe_dir, events, n_images, kinds


def kind_label(kind: str) -> str:
    found = re.fullmatch(r"sim_r(\d+)_c(\d+)", kind)
    return f"similarity to patch ({found[1]}, {found[2]})" if found else "PCA (3 components)"


def plot_probe_strip(plt, run_dir: Path, columns: int, path: Path, title: str) -> bool:
    """probes.png: for each probe image, its input and a row per map kind, one column per probe event."""
    from PIL import Image

    from dinov3.train.probes import event_name

    probe_dir, events, n_images, kinds = probe_layout(run_dir, columns)
    if not events:
        return False
    n_rows, n_cols = n_images * len(kinds), len(events) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols + 1.6, 1.1 * n_rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i in range(n_images):
        for k, kind in enumerate(kinds):
            r = i * len(kinds) + k
            if k == 0 and (probe_dir / "images" / f"probe{i}.png").is_file():
                axes[r, 0].imshow(Image.open(probe_dir / "images" / f"probe{i}.png"), interpolation="nearest")
            short = "PCA" if kind == "pca" else "sim " + kind_label(kind).removeprefix("similarity to patch ")
            axes[r, 0].set_ylabel(short, fontsize=8)
            for c, e in enumerate(events, start=1):
                f = probe_dir / event_name(e) / f"probe{i}_{kind}.png"
                if f.is_file():
                    axes[r, c].imshow(Image.open(f), interpolation="nearest")
                if r == 0:
                    axes[r, c].set_title(f"it {e}", fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle(f"{title}: EMA teacher's probe maps over iterations", fontsize=11)
    fig.tight_layout(h_pad=0.2, w_pad=0.2, rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def probe_strip(run_dir: Path, out_dir: Path, columns: int) -> str:
    """HTML tables, one per probe image: rows input / PCA / similarity maps, columns probe events."""
    from dinov3.train.probes import SET_FILE, event_name

    probe_dir, events, n_images, kinds = probe_layout(run_dir, columns)
    if not events:
        return "<p>No probe maps in this run (<code>train.probe_every=0</code>, or none written yet).</p>"
    try:
        meta = json.loads((probe_dir / SET_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    rel = lambda p: html.escape(os.path.relpath(p, out_dir))  # noqa: E731
    sources = [e.get("source", "") for e in meta.get("images", [])]
    parts = []
    header = "".join(f"<th>iteration {e}</th>" for e in events)
    for i in range(n_images):
        source = sources[i] if i < len(sources) else ""
        parts.append(f"<h3>probe image {i}</h3><p class='src'>{html.escape(source)}</p>"
                     f"<table><tr><th></th><th>input</th>{header}</tr>")
        inputs = probe_dir / "images" / f"probe{i}.png"
        for row, kind in enumerate(kinds):
            label = kind_label(kind)
            image = f"<img src='{rel(inputs)}'>" if inputs.is_file() else ""
            first = f"<td rowspan='{len(kinds)}'>{image}</td>" if row == 0 else ""
            cells = "".join(
                f"<td><img src='{rel(probe_dir / event_name(e) / f'probe{i}_{kind}.png')}'></td>" for e in events)
            parts.append(f"<tr><th>{html.escape(label)}</th>{first}{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def write_html(run_dir: Path, out_dir: Path, rows: list[dict], figures: list[str], columns: int) -> Path:
    last = rows[-1]
    keys = ["total_loss", "dino_global_crops_loss", "ibot_loss", "dino_student_entropy", "dino_log_k",
            "cls_pairwise_cos", "cls_patch_cos", "feature_rank"]
    summary = "".join(f"<tr><td>{k}</td><td>{last[k]:.4f}</td></tr>" for k in keys
                      if isinstance(last.get(k), (int, float)))
    imgs = "\n".join(f"<p><img class='fig' src='{html.escape(f)}'></p>" for f in figures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(str(run_dir))}: dinov3-train run</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
img.fig {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ padding: 2px 4px; font-size: 12px; text-align: center; }}
td img {{ width: 96px; image-rendering: pixelated; }}
p.src {{ font-size: 11px; color: #666; margin: 0; }}
</style></head><body>
<h1>{html.escape(str(run_dir))}</h1>
<p>{len(rows)} logged iterations, the last one {last['iteration']}. Last row:</p>
<table>{summary}</table>
<h2>Losses, health, schedules</h2>
{imgs}
<h2>Probe maps over iterations (EMA teacher)</h2>
<p>PCA: the first three principal components of each image's patch features as RGB, fitted per map. Similarity:
cosine to the reference patch (red), from -1 (dark blue) to 1 (yellow).</p>
{probe_strip(run_dir, out_dir, columns)}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path


# ------------------------------------------------------------------------------------------------ command
def make_plots(run_dir: Path, out_dir: Path, *, smooth: int | None = None, strip_columns: int = MAX_STRIP_COLUMNS,
               title: str | None = None) -> list[Path]:
    """Write the figures and index.html of the run in ``run_dir`` into ``out_dir``; returns the written paths."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise CLIError(f"{run_dir}: no such folder")
    if not metrics.is_file():
        raise CLIError(f"{run_dir} has no metrics.jsonl: give the --output folder of a dinov3-train run")
    from dinov3.train.rundir import read_metrics

    rows = read_metrics(str(metrics))
    if not rows:
        raise CLIError(f"{metrics} holds no metrics row yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("matplotlib is needed: pip install matplotlib (or the viz extra)") from None
    cfg = read_config(run_dir)
    start = gram_start(rows, cfg)
    if smooth is None:
        smooth = max(1, len(rows) // 50)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or run_dir.resolve().name
    plot_losses(plt, rows, cfg, start, smooth, out_dir / "losses.png", title)
    plot_health(plt, rows, cfg, start, smooth, out_dir / "health.png", title)
    plot_schedules(plt, rows, cfg, start, out_dir / "schedules.png", title)
    figures = ["losses.png", "health.png", "schedules.png"]
    strip = ["probes.png"] if plot_probe_strip(plt, run_dir, strip_columns, out_dir / "probes.png", title) else []
    page = write_html(run_dir, out_dir, rows, figures, strip_columns)  # its probe strip is a table of the maps
    return [out_dir / f for f in figures + strip] + [page]


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, PROG)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        raise CLIError("--smooth must be >= 1")
    run_dir = Path(args.run_dir)
    out_dir = Path(args.output) if args.output else run_dir / "plots"
    check_output_dir(out_dir, "--output")
    for path in make_plots(run_dir, out_dir, smooth=args.smooth, strip_columns=args.strip_columns, title=args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
