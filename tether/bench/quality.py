"""`tether bench quality`: the papers' long-horizon tables, reproduced on the toy world.

Rows: every memory policy on the default model (training-free), plus every
trained student that is installed, with its own policy (STUDENTS). Each row
runs every scripted episode (tether.world.episodes) for every seed: the
episode's timeline is generated exactly as `tether generate` makes a video
(`tether.cli.write_video`, each policy with its own switch rule), then scored
by `tether.eval.evaluate`: the probe's exact toy metrics (adherence, identity
retention, background stability, switch following, abrupt resets), generic
metrics (flicker, ...), subject and background consistency
(tether.eval.regions) and every per-frame metric over time
(tether.eval.series).

Blocks, as in the papers' tables: "60s" holds every episode of at most 60 s
(re-entry, switches, scene cut, story, long-60s), "240s" the long-240s
episode. A row's block value is the mean over the block's runs (episodes x
seeds) that score the metric.

Effective context length (Context Forcing's "seconds of history that still
shape the output"), measured on the re-entry episodes: the longest gap G such
that identity retention after re-entry (how much the subject still shows its
first look's shape, colour, pattern and size when it comes back, prompted
only by its shape: reentry_identity; the mean over seeds) is at least
RETENTION_THRESHOLD at every tested gap up to G. 0 when the shortest gap
already fails (shown "<5 s"); shown "≥G s" when even the longest tested gap
passes. A subject that never comes back into view counts as not retained.

Restartable: each finished run is cached in OUT/quality_runs/ (its evaluation
JSON and a frame strip PNG) with a fingerprint of what produced it (model
weights, timeline, features, window); a rerun skips the runs whose cache
matches, so a killed benchmark keeps its finished work. The report
(quality.json, quality.md, plots, quality.html: tether.bench.quality_report)
is written from all cached runs at the end.
"""

import hashlib
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import TetherError

# Trained students and the policy each was trained with (the row runs only that one).
STUDENTS = {"context-forcing": "slow-fast", "grounded-forcing": "dual"}
REENTRY_GAPS = {"reentry-5s": 5.0, "reentry-10s": 10.0, "reentry-20s": 20.0, "reentry-40s": 40.0}
RETENTION_THRESHOLD = 0.9
BLOCKS = ("60s", "240s")
LONG_EPISODES = {"60s": "long-60s", "240s": "long-240s"}  # their metrics over time are the plots
QUICK = {"episodes": ("reentry-5s", "reentry-10s", "attribute-switch", "scene-cut", "long-60s"), "seeds": 1,
         "features": "pixels"}
FULL = {"seeds": 3, "features": "efficientnet-lite0"}
SERIES_SECONDS = 5.0
STRIP_FRAMES = 8

# (key, short header for tables, better is "up"/"down"/None)
METRICS = (
    ("adherence", "adherence", "up"),
    ("identity_retention", "identity", "up"),
    ("background_stability", "background", "up"),
    ("switch_adherence", "switch adh.", "up"),
    ("chunks_to_follow", "chunks to follow", "down"),
    ("abrupt_resets", "resets", "down"),
    ("subject_consistency", "subject cons.", "up"),
    ("background_consistency", "background cons.", "up"),
    ("temporal_flicker", "flicker", "up"),
    ("adherence_drift", "drift (adh.)", None),
    ("consistency_drift", "drift (cons.)", None),
)
SERIES_METRICS = ("adherence", "identity_retention", "background_stability", "subject_consistency",
                  "background_consistency", "consistency", "temporal_flicker")


# ----------------------------------------------------------------------------- the suite


def block_of(episode_name: str) -> str:
    return "240s" if episode_name == "long-240s" else "60s"


def natural_policy(model: str):
    """The policy a trained student runs with, or None for a model that runs every policy.

    A bundle folder is a student when its pipeline.json names the policy it was trained with.
    """
    if model in STUDENTS:
        return STUDENTS[model]
    meta = Path(model) / "pipeline.json"
    return json.loads(meta.read_text()).get("policy") if meta.exists() else None


def rows_for(models: list, policies: list) -> list:
    """[{"label", "model", "policy"}]: every policy on each general model, each student with its own policy."""
    rows = []
    for model in models:
        own = natural_policy(model)
        if own is None:
            prefix = "" if model == "default" else f"{model_label(model)} / "
            rows += [{"label": prefix + policy, "model": model, "policy": policy} for policy in policies]
        else:
            rows.append({"label": f"{model_label(model)} ({own})", "model": model, "policy": own})
    return rows


def model_label(model: str) -> str:
    return model if model in STUDENTS or model == "default" else Path(model).name


def truncated_segments(segments, max_seconds):
    """The episode's world segments, cut to at most `max_seconds` in all (None: unchanged)."""
    if max_seconds is None:
        return list(segments)
    out, left = [], float(max_seconds)
    for segment in segments:
        if left <= 1e-9:
            break
        out.append(type(segment)(segment.prompt, min(segment.seconds, left), segment.cut))
        left -= segment.seconds
    return out


def run_key(row: dict, episode_name: str, seed: int) -> str:
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_label(row["model"]))
    return f"{model}__{row['policy']}__{episode_name}__seed{seed}"


def model_fingerprint(model: str) -> str:
    """Identifies the weights a run was made with (a new bundle, adapter or base invalidates the cache).

    Hashes file contents, not modification times, so a cache committed with the results stays
    valid in a fresh clone; an adapter bundle's fingerprint covers its base bundle too.
    """
    from ..pipeline import bundle_folder

    folder = bundle_folder(model)
    if not (folder / "pipeline.json").is_file():
        return "toy config, random weights" if model == "default" else str(folder)
    return _bundle_digest(folder)[:16]


def _bundle_digest(folder: Path) -> str:
    meta_path = folder / "pipeline.json"
    digest = hashlib.sha256(meta_path.read_bytes())
    meta = json.loads(meta_path.read_text())
    weights = ["transformer.safetensors", "vae/diffusion_pytorch_model.safetensors",
               f"{meta.get('lora', 'adapter')}/adapter_model.safetensors"]
    for name in weights:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    if "base" in meta:
        digest.update(_bundle_digest((folder / meta["base"]).resolve()).encode())
    return digest.hexdigest()


def check_models(models: list) -> None:
    from ..pipeline import SHIPPED_MODELS, shipped_models

    present = shipped_models()
    for model in models:
        if model == "default":
            continue
        if model in SHIPPED_MODELS and not Path(model).exists():
            if model not in present:
                raise TetherError(f"model '{model}' is not in this install (present: {', '.join(present) or 'none'})")
        elif not Path(model).is_dir():
            raise TetherError(f"unknown model '{model}' (use {', '.join(SHIPPED_MODELS)} or a bundle folder)")


def load_model(model: str, device, dtype):
    from ..pipeline import load_pipeline

    return load_pipeline(None if model == "default" else model, device=device, dtype=dtype)


def _split_list(text):
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def resolve_suite(args) -> dict:
    """Check every name before anything is loaded or generated; TetherError on bad input."""
    from ..memory import POLICIES
    from ..pipeline import shipped_models
    from ..world.episodes import SCENARIOS, episode

    policies = _split_list(args.policies) or list(POLICIES)
    for policy in policies:
        if policy not in POLICIES:
            raise TetherError(f"unknown policy '{policy}' (known: {', '.join(sorted(POLICIES))})")
    models = _split_list(args.models) or ["default"] + [m for m in shipped_models() if m != "default"]
    check_models(models)
    episodes = _split_list(args.episodes) or list(QUICK["episodes"] if args.quick else SCENARIOS)
    for name in episodes:
        episode(name, 0)  # raises a one-line TetherError for an unknown scenario
    seeds = args.seeds if args.seeds is not None else (QUICK["seeds"] if args.quick else FULL["seeds"])
    if seeds < 1:
        raise TetherError(f"--seeds must be at least 1, got {seeds}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise TetherError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    if args.window <= 0:
        raise TetherError(f"--window must be positive, got {args.window:g}")
    features = args.features or (QUICK["features"] if args.quick else FULL["features"])
    return {"policies": policies, "models": list(dict.fromkeys(models)), "episodes": list(dict.fromkeys(episodes)),
            "seeds": list(range(seeds)), "features": features, "rows": rows_for(list(dict.fromkeys(models)), policies)}


def command_line(args, suite: dict) -> str:
    """The command, canonical: every choice spelled out, so it reproduces the run."""
    parts = ["tether", "bench", "quality"]
    if args.quick:
        parts.append("--quick")
    parts += ["--models", ",".join(suite["models"]), "--policies", ",".join(suite["policies"]),
              "--episodes", ",".join(suite["episodes"]), "--seeds", str(len(suite["seeds"])),
              "--features", suite["features"], "--out", str(args.out)]
    if args.max_seconds is not None:
        parts += ["--max-seconds", f"{args.max_seconds:g}"]
    if args.window != SERIES_SECONDS:
        parts += ["--window", f"{args.window:g}"]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- one run


def run_metrics(result: dict, episode_name: str) -> dict:
    """The table's numbers for one evaluated run (None where the run has nothing to score)."""
    from ..eval.series import drift

    toy = result.get("toy") or {}
    switches = toy.get("switches", [])
    followed = [sw["chunks_to_follow"] for sw in switches if sw["chunks_to_follow"] is not None]
    series = result.get("series", {})
    out = {
        "adherence": toy.get("adherence"),
        "identity_retention": toy.get("identity_retention"),
        "background_stability": toy.get("background_stability"),
        "switch_adherence": _mean([sw["adherence"] for sw in switches]),
        "chunks_to_follow": _mean(followed),
        "switches": len(switches),
        "switches_followed": len(followed),
        "abrupt_resets": toy.get("abrupt_resets"),
        "subject_consistency": result.get("subject_consistency"),
        "background_consistency": result.get("background_consistency"),
        "temporal_flicker": result.get("temporal_flicker"),
        "adherence_drift": drift(series.get("adherence", [])),
        "consistency_drift": drift(series.get("consistency", [])),
    }
    if episode_name in REENTRY_GAPS:
        out["reentry_identity"] = reentry_identity(toy)
    return out


def reentry_identity(toy: dict):
    """How much the subject is itself when it comes back: None if it is never seen in the return segment.

    The mean over the subject's read attributes (shape, colour, pattern, size) in the last segment
    of a re-entry episode ("the circle comes back" names only the shape): for an attribute the first
    prompt stated, the share of frames that still show it (the toy metrics carry a scene's stated
    values over to later prompts, so this is that segment's adherence); for one no prompt stated,
    the share equal to its first look (identity).
    """
    from ..eval.toy import READ_ATTRIBUTES

    segments = toy.get("segments") or []
    if len(segments) < 3 or not segments[-1].get("scored_frames"):  # cut short, or never back in view
        return None
    last = segments[-1]
    return _mean([last["adherence"].get(a, last["identity"].get(a)) for a in READ_ATTRIBUTES])


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


class Runner:
    """Generates and scores runs, loading each model and the feature extractor only when a run needs them."""

    def __init__(self, suite: dict, out: Path, device, dtype, window: float, max_seconds, keep_videos: bool):
        self.suite, self.out, self.device, self.dtype = suite, out, device, dtype
        self.window, self.max_seconds, self.keep_videos = window, max_seconds, keep_videos
        self.runs_dir = out / "quality_runs"
        self._pipes, self._extractor, self._probe = {}, None, None
        self.fingerprints = {m: model_fingerprint(m) for m in suite["models"]}

    def timeline_text(self, episode_name: str, seed: int) -> str:
        from ..world.episodes import episode
        from ..world.prompts import format_timeline

        return format_timeline(truncated_segments(episode(episode_name, seed).segments, self.max_seconds))

    def fingerprint(self, row: dict, episode_name: str, seed: int) -> dict:
        return {"model": self.fingerprints[row["model"]], "policy": row["policy"], "episode": episode_name,
                "seed": seed, "timeline": self.timeline_text(episode_name, seed), "features": self.suite["features"],
                "window": self.window}

    def cached(self, key: str, fingerprint: dict):
        path = self.runs_dir / f"{key}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("fingerprint") == fingerprint else None

    def pipe(self, model: str):
        if model not in self._pipes:
            self._pipes.clear()  # one model in memory at a time
            self._pipes[model] = load_model(model, self.device, self.dtype)
        return self._pipes[model]

    def scorers(self):
        if self._extractor is None:
            from ..eval import PROBE_PATH
            from ..eval.features import load_extractor
            from ..world.probe import load_probe

            self._extractor = load_extractor(self.suite["features"])
            self._probe = load_probe(str(PROBE_PATH))
        return self._extractor, self._probe

    def run(self, row: dict, episode_name: str, seed: int, key: str, fingerprint: dict) -> dict:
        import torch

        from ..cli import write_video
        from ..eval import chunk_first_frame, evaluate
        from ..timeline import resolve_timeline

        pipe = self.pipe(row["model"])
        extractor, probe = self.scorers()
        text = fingerprint["timeline"]
        timeline = resolve_timeline(timeline=text)
        total = chunk_first_frame(timeline.num_chunks)
        picks = sorted(set(np.linspace(0, total - 1, STRIP_FRAMES).round().astype(int).tolist()))
        strip = {}

        def keep(first, frames):
            for index in picks:
                if first <= index < first + len(frames):
                    strip[index] = frames[index - first]

        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # The scratch name carries the process id: processes that split the rows between them
        # (`--models`/`--policies`) may reach the same run, and must not delete each other's video.
        video = self.runs_dir / (f"{key}.mp4" if self.keep_videos else f".{key}.{os.getpid()}.tmp.mp4")
        started = time.perf_counter()
        with torch.no_grad():
            frames = write_video(pipe, timeline, video, policy=row["policy"], seed=seed, progress=False, on_frames=keep)
        generated = time.perf_counter()
        result = evaluate(video, text, extractor=extractor, probe=probe, regions=True, series_seconds=self.window)
        scored = time.perf_counter()
        if not self.keep_videos:
            video.unlink(missing_ok=True)
        result.pop("video", None)
        if strip:
            save_strip(np.concatenate([strip[i] for i in sorted(strip)], axis=1), self.runs_dir / f"{key}.png")
        record = {
            "key": key, "fingerprint": fingerprint, "label": row["label"], "model": row["model"],
            "model_description": pipe.description, "policy": row["policy"], "episode": episode_name, "seed": seed,
            "block": block_of(episode_name), "timeline": text, "frames": frames, "strip_frames": sorted(strip),
            "generate_seconds": generated - started, "eval_seconds": scored - generated,
            "metrics": run_metrics(result, episode_name), "evaluation": result,
        }
        write_atomic(self.runs_dir / f"{key}.json", json.dumps(record, indent=1) + "\n")
        return record


def save_strip(image: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image

    tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
    matplotlib.image.imsave(tmp, image)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a kill never leaves a torn result that a rerun would trust


# ----------------------------------------------------------------------------- aggregation


def effective_context_length(retention: dict, threshold: float = RETENTION_THRESHOLD) -> float:
    """Longest gap G (seconds) with retention >= threshold at every tested gap <= G; 0.0 if the shortest fails.

    `retention`: {gap seconds: identity retention after re-entry, or None (never seen again: not retained)}.
    """
    longest = 0.0
    for gap in sorted(retention):
        value = retention[gap]
        if value is None or value < threshold:
            break
        longest = float(gap)
    return longest


def format_context_length(seconds, gaps) -> str:
    if seconds is None or not gaps:
        return "-"
    if seconds == 0:
        return f"<{min(gaps):g} s"
    return f"≥{seconds:g} s" if seconds >= max(gaps) else f"{seconds:g} s"


def aggregate(records: list, rows: list) -> dict:
    """Per row label: each block's means, re-entry retention per gap, effective context length, series."""
    out = {}
    for row in rows:
        mine = [r for r in records if r["label"] == row["label"]]
        entry = {"model": row["model"], "policy": row["policy"], "blocks": {}}
        for block in BLOCKS:
            runs = [r for r in mine if r["block"] == block]
            if not runs:
                continue
            values = {key: _mean([r["metrics"].get(key) for r in runs]) for key, _, _ in METRICS}
            values["switches"] = sum(r["metrics"]["switches"] for r in runs)
            values["switches_followed"] = sum(r["metrics"]["switches_followed"] for r in runs)
            followed = [sw["chunks_to_follow"] for r in runs for sw in r["evaluation"].get("toy", {}).get("switches", [])
                        if sw["chunks_to_follow"] is not None]
            values["chunks_to_follow"] = _mean(followed)  # over switches, not over runs
            values["runs"] = len(runs)
            entry["blocks"][block] = values
        retention = {}
        for name, gap in REENTRY_GAPS.items():
            runs = [r for r in mine if r["episode"] == name]
            if runs:
                # a run whose subject never came back into view scores 0 here, not "unknown"
                retention[gap] = float(np.mean([r["metrics"].get("reentry_identity") or 0.0 for r in runs]))
        entry["reentry_identity"] = {f"{g:g}": v for g, v in retention.items()}
        entry["effective_context_seconds"] = effective_context_length(retention) if retention else None
        entry["effective_context"] = format_context_length(entry["effective_context_seconds"], list(retention))
        entry["series"] = {}
        for block in BLOCKS:
            series = block_series(mine, block)
            if series:
                entry["series"][block] = series
        out[row["label"]] = entry
    return out


def series_episode(records: list, block: str):
    """The episode whose metrics over time stand for `block`: long-60s / long-240s, else the block's longest."""
    names = {r["episode"]: r["frames"] for r in records if r["block"] == block}
    if not names:
        return None
    return LONG_EPISODES[block] if LONG_EPISODES[block] in names else max(names, key=names.get)


def block_series(records: list, block: str) -> dict:
    """Seed-mean of each metric over time for the block's series episode."""
    name = series_episode(records, block)
    runs = [r for r in records if r["episode"] == name and "series" in r["evaluation"]]
    if not runs:
        return {}
    longest = max(runs, key=lambda r: len(r["evaluation"]["series"]["t"]))["evaluation"]["series"]
    out = {"episode": name, "t": longest["t"]}
    for metric in SERIES_METRICS:
        columns = [r["evaluation"]["series"].get(metric) for r in runs]
        columns = [c for c in columns if c]
        if columns:
            out[metric] = [_mean([c[i] for c in columns if i < len(c)]) for i in range(len(out["t"]))]
    return out


# ----------------------------------------------------------------------------- the command


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def terminal_table(summary: dict) -> str:
    columns = [("adherence", "adh"), ("identity_retention", "ident"), ("background_stability", "bg"),
               ("switch_adherence", "sw.adh"), ("chunks_to_follow", "follow"), ("abrupt_resets", "resets"),
               ("subject_consistency", "subj.c"), ("background_consistency", "bg.c"), ("temporal_flicker", "flick")]
    width = max([len("policy / model")] + [len(label) for label in summary["aggregates"]]) + 2
    lines = []
    for block in BLOCKS:
        rows = [(label, a) for label, a in summary["aggregates"].items() if block in a["blocks"]]
        if not rows:
            continue
        lines.append(f"{block} block")
        header = "policy / model".ljust(width) + "".join(f"{h:>8}" for _, h in columns)
        if block == "60s":
            header += f"{'eff.ctx':>9}"
        lines.append(header)
        for label, a in rows:
            values = a["blocks"][block]
            line = label.ljust(width) + "".join(f"{_fmt(values.get(k), 2):>8}" for k, _ in columns)
            if block == "60s":
                line += f"{a['effective_context']:>9}"
            lines.append(line)
        lines.append("")
    return "\n".join(lines).rstrip()


def describe_device(device) -> str:
    from .speed import describe_device as describe

    return describe(device)


def main(args) -> int:
    from tqdm import tqdm

    from ..cli import _device, _dtype

    suite = resolve_suite(args)
    device, dtype = _device(args.device), _dtype(args.dtype)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TetherError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise TetherError(f"cannot write to --out {out}")
    command = command_line(args, suite)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    runner = Runner(suite, out, device, dtype, args.window, args.max_seconds, args.keep_videos)

    plan = [(row, name, seed) for row in suite["rows"] for name in suite["episodes"] for seed in suite["seeds"]]
    records, todo = [], []
    for row, name, seed in plan:
        key = run_key(row, name, seed)
        fingerprint = runner.fingerprint(row, name, seed)
        record = runner.cached(key, fingerprint)
        if record is not None:
            records.append(record)
        else:
            todo.append((row, name, seed, key, fingerprint))
    reused = len(records)
    if not args.quiet:
        print(f"bench quality: {len(suite['rows'])} rows x {len(suite['episodes'])} episodes x "
              f"{len(suite['seeds'])} seeds = {len(plan)} runs ({reused} cached in {runner.runs_dir})", file=sys.stderr)
    with tqdm(total=len(plan), initial=reused, unit="run", desc="bench quality", disable=args.quiet) as bar:
        for row, name, seed, key, fingerprint in todo:
            bar.set_postfix_str(f"{row['label']} {name} s{seed}", refresh=True)
            records.append(runner.run(row, name, seed, key, fingerprint))
            bar.update(1)

    order = {run_key(row, name, seed): i for i, (row, name, seed) in enumerate(plan)}
    records.sort(key=lambda r: order[r["key"]])
    import torch

    descriptions = {r["model"]: r["model_description"] for r in records}
    summary = {
        "command": command,
        "quick": bool(args.quick),
        "device": describe_device(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "tether_commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": time.perf_counter() - started,
        "runs_generated": len(todo),
        "runs_cached": reused,
        "load_average": [load_at_start, os.getloadavg()[0]],
        "features": suite["features"],
        "episodes": suite["episodes"],
        "seeds": suite["seeds"],
        "max_seconds": args.max_seconds,
        "window_seconds": args.window,
        "retention_threshold": RETENTION_THRESHOLD,
        "models": {m: descriptions.get(m, runner.fingerprints[m]) for m in suite["models"]},
        "rows": suite["rows"],
        "aggregates": aggregate(records, suite["rows"]),
        "runs": records,
    }
    from .quality_report import write_report

    written = write_report(summary, out)
    print(terminal_table(summary))
    print(f"{len(plan)} runs ({len(todo)} generated, {reused} cached) in {summary['wall_seconds']:.0f} s on "
          f"{summary['device']}; wrote " + ", ".join(str(p) for p in written))
    return 0


def _git_commit():
    from .speed import git_commit

    return git_commit()
