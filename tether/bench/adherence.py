"""`tether bench adherence`: does a toy-world model draw what its prompt says?

The built-in model's acceptance test (toy-world issue): N random world
prompts, seeded, each generated as a 5 s clip (81 frames, 21 latent frames),
read back frame by frame with the probe, and scored with the exact toy
metrics of `tether.eval.toy` (share of frames showing each stated attribute;
frames where the subject is out of view are not scored).

Random prompts leave attributes out with the grammar's usual probability, so
each attribute's adherence is averaged over the clips that state it; the
report also gives identity retention of the attributes left open.

With `--teacher`, the same prompts and noise go through the bidirectional
teacher too (Euler on the shifted grid, classifier-free guidance), so the
distilled student can be compared with the model it was distilled from.

With `--reference`, the world's own render of each prompt is scored too
("truth": the probe's own accuracy on these clips), and so is that render
after a round trip through the model's VAE ("vae"): the best any transformer
could score through this VAE, which tells a weak VAE from a weak transformer.

With `--teacher-from T1,T2,...`, the teacher also starts from that render's
latents noised to timestep T (same noise as its own clip) instead of from
pure noise ("teacher@T"): how much noise the teacher can take before it loses
what the prompt asks for. A teacher that keeps the subject from T=500 but
draws none from pure noise knows the subject's look and has not learnt to
place one.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import TetherError

CLIP_SECONDS = 5.0
CLIP_FRAMES = 81  # 5 s at 16 fps: the teacher's training length (21 latent frames at Wan's temporal stride 4)
ATTRIBUTES = ("background", "shape", "colour", "pattern", "size")
BARS = {"background": 0.95, "shape": 0.90, "colour": 0.90, "pattern": 0.90, "size": 0.90}
DEFAULT_TEACHER_STEPS = 24  # Euler steps for a teacher whose bundle names no teacher_sampling


def random_prompts(count: int, seed: int) -> list:
    from ..world import random_prompt

    rng = np.random.default_rng(seed)
    return [random_prompt(rng) for _ in range(count)]


def student_clip(pipe, prompt: str, seed: int, policy: str) -> np.ndarray:
    from ..timeline import resolve_timeline

    timeline = resolve_timeline(prompt=prompt, seconds=CLIP_SECONDS)
    frames = [chunk.frames for chunk in pipe.generate(timeline, policy=policy, seed=seed)]
    return np.concatenate(frames)


@torch.no_grad()
def teacher_clip(pipe, teacher, prompt: str, seed: int, steps: int, shift: float, guidance: float,
                 start: float | None = None, clean=None) -> np.ndarray:
    """The teacher's clip from pure noise; or, with `start` and `clean` latents, from `clean` noised to `start`.

    Starting late keeps the steps of the full grid below `start` (plus `start` itself).
    """
    from ..pipeline import video_to_uint8
    from ..schedule import timestep_grid
    from ..train.recipes.ode_init import teacher_trajectory

    generator = torch.Generator().manual_seed(seed)
    latent_frames = pipe.codec.num_latent_frames(CLIP_FRAMES)
    noise = torch.randn((1, pipe.latent_shape[0], latent_frames, *pipe.latent_shape[1:]), generator=generator)
    grid = sorted({round(float(t), 6) for t in timestep_grid(shift, steps)} | {0.0}, reverse=True)
    if start is not None:
        grid = [float(start)] + [t for t in grid if t < start]
        sigma = start / 1000.0
        noise = (1 - sigma) * clean.float() + sigma * noise
    _, x0 = teacher_trajectory(teacher, noise, pipe.encode_prompt(prompt), grid, keep=[grid[0]], guidance=guidance)
    return video_to_uint8(pipe.codec.decode(x0.to(pipe.codec_dtype)))


def reference_clips(pipe, prompt: str, seed: int) -> dict:
    """The world's render of `prompt` (5 s) and the same render encoded and decoded by the pipeline's VAE."""
    from ..world import render_clip

    frames, _ = render_clip(prompt, CLIP_FRAMES, seed=seed, size=pipe.height)
    decoded, latents = vae_round_trip(pipe, frames)
    return {"truth": frames, "vae": decoded, "latents": latents}


@torch.no_grad()
def vae_round_trip(pipe, frames: np.ndarray) -> tuple:
    """(uint8 frames [T, H, W, 3] decoded from `frames`' latents, the normalised latents)."""
    from ..pipeline import video_to_uint8
    from ..train.toy_data import clips_to_video

    latents = pipe.codec.encode(clips_to_video([frames]).to(pipe.codec_dtype))
    return video_to_uint8(pipe.codec.decode(latents)), latents


def score_clip(probe, prompt: str, frames: np.ndarray) -> dict:
    from ..eval.toy import parse_world_timeline, toy_metrics

    parsed = parse_world_timeline([prompt])
    if parsed is None:
        raise TetherError(f"not a toy-world prompt: {prompt!r}")
    readings = probe.read(frames)
    metrics = toy_metrics(readings, parsed, [(0, len(frames))])
    segment = metrics["segments"][0]
    return {"adherence": segment["adherence"], "identity": segment["identity"],
            "scored_frames": segment["scored_frames"], "frames": len(frames), "subjects": len(parsed[0].objects),
            "two_colours": two_colours_shown(readings, parsed[0])}


def two_colours_shown(readings: list, scene) -> float | None:
    """Of the frames showing two subjects, the share whose colours differ; None unless the prompt
    states two different colours and some frame shows two subjects.

    Colour adherence matches each stated subject to its best detection, so a model that paints
    both subjects one colour still scores half of them right: this names that failure (colour
    leaking from one subject to the other) on its own.
    """
    colours = [o.colour for o in scene.objects]
    if len(colours) != 2 or None in colours or colours[0] == colours[1]:
        return None
    shown = [[d["colour"] for d in r["objects"] if d["present"]] for r in readings]
    pairs = [c for c in shown if len(c) == 2]
    return float(np.mean([c[0] != c[1] for c in pairs])) if pairs else None


def summarise(clips: list) -> dict:
    """Per attribute: mean over the clips that state it (adherence) or leave it open (identity).

    With each mean, its standard error over clips: object attributes are only
    scored on clips where the probe finds the subject, often a few dozen of a
    hundred, and two models' difference means little until it exceeds that.
    """
    adherence = {a: summarise_values([c["adherence"].get(a) for c in clips]) for a in ATTRIBUTES}
    identity = {a: summarise_values([c["identity"].get(a) for c in clips]) for a in ATTRIBUTES[1:]}
    passed = {a: adherence[a]["mean"] is not None and adherence[a]["mean"] >= BARS[a] for a in ATTRIBUTES}
    unscored = sum(c["scored_frames"] == 0 for c in clips)
    # "Some frame shows a subject" is a weak test (the probe sometimes reads a blob of texture as one);
    # the share of frames is what tells a drawn, lasting subject from a flicker.
    subject_frames = float(np.mean([c["scored_frames"] / c["frames"] for c in clips])) if clips else None
    # One- and two-subject prompts fail differently (two subjects: attributes leak between them).
    by_subjects = {count: {a: summarise_values([c["adherence"].get(a) for c in clips if c.get("subjects") == n])
                           for a in ATTRIBUTES} for n, count in ((1, "one"), (2, "two"))}
    return {"adherence": adherence, "identity": identity, "bars": BARS, "passed": passed,
            "clips_without_subject": unscored, "subject_frames": subject_frames, "by_subjects": by_subjects,
            "two_colours": summarise_values([c.get("two_colours") for c in clips])}


def summarise_values(values: list) -> dict:
    """{"mean", "stderr" (over the values), "clips"} of the values that are not None."""
    values = [v for v in values if v is not None]
    stderr = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(np.mean(values)) if values else None, "stderr": stderr, "clips": len(values)}


def run(checkpoint=None, teacher_path=None, clips: int = 100, seed: int = 0, policy: str | None = None,
        teacher_steps: int | None = None, shift: float | None = None, guidance: float = 3.0, progress: bool = True,
        student: bool = True, reference: bool = False, teacher_from=()) -> dict:
    from ..checkpoints import load_transformer
    from ..pipeline import load_pipeline
    from ..eval import PROBE_PATH
    from ..world.probe import load_probe

    pipe = load_pipeline(checkpoint)
    policy = policy or pipe.policy  # a student runs the memory it was trained with
    # By default the teacher's grid from the bundle (the one its student was distilled from), else 24
    # steps on the grid of the schedule it was trained with.
    if teacher_steps is None:
        teacher_steps = int(pipe.teacher_sampling.get("steps", DEFAULT_TEACHER_STEPS))
    if shift is None:
        shift = float(pipe.teacher_sampling.get("shift", pipe.shift))
    probe = load_probe(str(PROBE_PATH))
    if teacher_from and not teacher_path:
        raise TetherError("--teacher-from needs --teacher")
    if any(not 0 < t < 1000 for t in teacher_from):
        raise TetherError(f"--teacher-from timesteps must lie strictly between 0 and 1000, got {list(teacher_from)}")
    teacher = load_transformer(str(teacher_path)).float().eval() if teacher_path else None  # shipped teachers are fp16
    prompts = random_prompts(clips, seed)
    models = ({"student": None} if student else {}) | ({"teacher": teacher} if teacher is not None else {})
    if not models and not reference:
        raise TetherError("nothing to measure: --no-student needs --teacher or --reference")
    models |= {f"teacher@{int(t)}": teacher for t in teacher_from}
    if reference:
        models |= {"truth": None, "vae": None}
    results = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    for index, prompt in enumerate(tqdm(prompts, desc="adherence", unit="clip", disable=not progress)):
        if reference or teacher_from:
            started = time.perf_counter()
            references = reference_clips(pipe, prompt, seed + index)
            if reference:
                seconds["vae"] += time.perf_counter() - started  # render + encode + decode
        for name in models:
            started = time.perf_counter()
            if name == "student":
                frames = student_clip(pipe, prompt, seed + index, policy)
            elif name == "teacher":
                frames = teacher_clip(pipe, teacher, prompt, seed + index, teacher_steps, shift, guidance)
            elif name.startswith("teacher@"):
                frames = teacher_clip(pipe, teacher, prompt, seed + index, teacher_steps, shift, guidance,
                                      start=float(name.split("@")[1]), clean=references["latents"])
            else:
                frames = references[name]
            seconds[name] += time.perf_counter() - started
            results[name].append({"prompt": prompt, **score_clip(probe, prompt, frames)})
    report = {"model": pipe.description, "checkpoint": str(checkpoint) if checkpoint else "built-in",
              "policy": policy, "clips": clips, "seed": seed, "seconds_per_clip": {}}
    for name, scored in results.items():
        report[name] = summarise(scored)
        report[name]["per_clip"] = scored
        report["seconds_per_clip"][name] = round(seconds[name] / clips, 3)
    if teacher is not None:
        report["teacher_sampling"] = {"source": str(teacher_path), "steps": teacher_steps, "shift": shift,
                                      "guidance": guidance}
    if teacher is not None and student:
        report["student_minus_teacher"] = {
            a: (None if report["student"]["adherence"][a]["mean"] is None or report["teacher"]["adherence"][a]["mean"] is None
                else report["student"]["adherence"][a]["mean"] - report["teacher"]["adherence"][a]["mean"])
            for a in ATTRIBUTES}
    return report


def format_report(report: dict) -> str:
    names = [n for n in ("student", "teacher") if n in report] + sorted(
        (n for n in report if n.startswith("teacher@")), key=lambda n: -int(n.split("@")[1])) + [
        n for n in ("vae", "truth") if n in report]
    lines = [f"{'attribute':<12}" + "".join(f"{n:>17}" for n in names) + f"{'bar':>8}"]
    for a in ATTRIBUTES:
        cells = "".join(f"{_with_error(report[n]['adherence'][a]):>17}" for n in names)
        lines.append(f"{a:<12}{cells}{_percent(BARS[a]):>8}")
    lines.append(f"{'identity':<12}" + "".join(
        f"{_percent(_mean([v['mean'] for v in report[n]['identity'].values()])):>17}" for n in names))
    lines.append(f"{'subject seen':<12}" + "".join(f"{_percent(report[n]['subject_frames']):>17}" for n in names)
                 + "  (share of frames where the probe finds a subject)")
    for count in ("one", "two"):
        lines.append(f"{'colour, ' + count:<12}" + "".join(
            f"{_with_error(report[n]['by_subjects'][count]['colour']):>17}" for n in names)
            + f"  (prompts with {count} subject{'s' if count == 'two' else ''})")
    lines.append(f"{'two colours':<12}" + "".join(f"{_with_error(report[n]['two_colours']):>17}" for n in names)
                 + "  (frames showing both subjects of a two-colour prompt: share in two colours)")
    return "\n".join(lines)


def _with_error(entry: dict) -> str:
    """'74.2% ±3.1 (84)': mean, standard error in points, clips scored."""
    if entry["mean"] is None:
        return "-"
    error = f" ±{100 * entry['stderr']:.1f}" if entry.get("stderr") is not None else ""
    return f"{_percent(entry['mean'])}{error} ({entry['clips']})"


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main(args) -> int:
    report = run(args.checkpoint, args.teacher, clips=args.clips, seed=args.seed, policy=args.policy,
                 teacher_steps=args.teacher_steps, shift=args.teacher_shift, guidance=args.guidance,
                 progress=not args.quiet,
                 student=not args.no_student, reference=args.reference,
                 teacher_from=tuple(float(t) for t in args.teacher_from.split(",")) if args.teacher_from else ())
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
