"""The `tether` command line.

User mistakes end in one line on stderr and exit status 2, never a traceback.
"""

import argparse
import sys
import time

from .errors import TetherError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise TetherError(f"{self.prog}: {message}")


def _device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TetherError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise TetherError(f"unknown device '{name}' (use cpu or cuda)")
    return name


def _dtype(name):
    import torch

    if name is None:
        return None
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise TetherError(f"unknown dtype '{name}' (use fp32, bf16 or fp16)")
    return table[name]


def add_model_arguments(p):
    p.add_argument("--checkpoint", help="model to load (default: the built-in toy model)")
    p.add_argument("--base", help="Wan2.1 folder supplying VAE and text encoder for a .pt generator")
    p.add_argument("--ema", action="store_true", help="use generator_ema from a Self-Forcing/CausVid .pt")
    p.add_argument("--lora", help="LoRA .pt to merge (LongLive)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: fp32 on cpu, bf16 on cuda)")


def load_from_args(args):
    from .pipeline import load_pipeline

    return load_pipeline(args.checkpoint, base=args.base, device=_device(args.device), dtype=_dtype(args.dtype),
                         ema=args.ema, lora=args.lora, lora_alpha=args.lora_alpha)


def parse_options(items) -> dict:
    """KEY=VALUE strings -> dict, values read as YAML (true, 3, 0.9, code)."""
    import yaml

    options = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TetherError(f"option '{item}' is not KEY=VALUE")
        options[key.replace("-", "_")] = yaml.safe_load(raw)
    return options


def cmd_generate(args) -> int:
    import torch

    with torch.no_grad():  # a context, not a global switch: cli.main may run in-process (tests, notebooks)
        return _generate_video(args)


def _generate_video(args) -> int:
    from .memory import make_policy
    from .memory.switch import make_switch_rule
    from .timeline import resolve_timeline
    from .video import check_writable

    timeline = resolve_timeline(prompt=args.prompt, timeline=args.timeline, seconds=args.seconds)
    policy_options = parse_options(args.policy_opt)
    if args.policy:
        make_policy(args.policy, **policy_options)  # fail on a bad name or option before loading anything
    if args.switch:
        make_switch_rule(args.switch)
    check_writable(args.output)
    if args.strip:
        check_writable(args.strip)
        if args.strip_every <= 0:
            raise TetherError("--strip-every must be positive")
    pipe = load_from_args(args)
    if not args.policy:
        args.policy = pipe.policy
        make_policy(args.policy, **policy_options)
    if args.verbose:
        print(f"model: {pipe.description}", file=sys.stderr)
    strip = FrameStrip(args.strip_every * pipe.fps) if args.strip else None
    started = time.perf_counter()
    frames_done = write_video(pipe, timeline, args.output, policy=args.policy, seed=args.seed, switch=args.switch,
                              policy_options=policy_options, progress=not args.quiet,
                              on_frames=strip.add if strip else None)
    elapsed = time.perf_counter() - started
    if strip:
        strip.save(args.strip)
    print(f"wrote {args.output}: {frames_done} frames ({frames_done / pipe.fps:.1f} s of video) in {elapsed:.1f} s, "
          f"{frames_done / elapsed:.1f} frames/s, policy {args.policy}, {pipe.description}")
    return 0


class FrameStrip:
    """Every `every`-th frame of a video, side by side: a video's story in one PNG."""

    def __init__(self, every: float):
        self.every = max(1, round(every))
        self.frames = []

    def add(self, first: int, frames) -> None:
        self.frames += [frames[i - first] for i in range(first, first + len(frames)) if i % self.every == 0]

    def save(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image
        import numpy as np

        gap = np.full((self.frames[0].shape[0], 2, 3), 255, dtype=np.uint8)
        row = np.concatenate([part for frame in self.frames for part in (frame, gap)][:-1], axis=1)
        matplotlib.image.imsave(path, row)


def write_video(pipe, timeline, output, policy="window", seed=0, switch=None, policy_options=None,
                progress=True, on_frames=None) -> int:
    """Generate `timeline` with `pipe` into the mp4 `output`, chunk by chunk; the number of frames written.

    What `tether generate` runs, and `tether bench quality` for each of its runs.
    `on_frames(first_frame_index, frames)` sees every decoded chunk as it is written.
    """
    from tqdm import tqdm

    from .video import VideoWriter

    frames_done = 0
    started = time.perf_counter()
    with VideoWriter(output, fps=pipe.fps) as writer, tqdm(total=timeline.num_chunks, unit="chunk",
                                                          desc=f"generate [{policy}]", disable=not progress) as bar:
        for chunk in pipe.generate(timeline, policy=policy, seed=seed, switch=switch, policy_options=policy_options):
            writer.write(chunk.frames)
            if on_frames is not None:
                on_frames(frames_done, chunk.frames)
            frames_done += len(chunk.frames)
            bar.set_postfix(fps=f"{frames_done / (time.perf_counter() - started):.1f}", refresh=False)
            bar.update(1)
    return frames_done


def cmd_train(args) -> int:
    if args.recipe == "toy":  # not a recipe: the whole toy chain, stage by stage (tether/train/toy.py)
        from .train.toy import run_toy_chain

        if args.device:
            args.device = _device(args.device)
        return run_toy_chain(args)
    from .train import Trainer
    from .train.config import load_config

    cfg = load_config(args.recipe, scale=args.scale, config=args.config, overrides=args.overrides)
    if args.estimate_memory:
        return _estimate_memory(args, cfg)
    if args.device:
        cfg["device"] = _device(args.device)
    out = args.out or f"runs/{args.recipe}-{args.scale}"
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.quiet)
    last = trainer.run()
    if args.export:
        trainer.recipe.export(args.export)
    trainer.close()
    if trainer.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
        print(f"{args.recipe}: {trainer.total_steps} steps in {out} ({summary})")
    if trainer.world_size > 1:
        _leave_without_interpreter_teardown()
    return 0


def _leave_without_interpreter_teardown() -> None:
    """Exit a finished torchrun rank at once, everything written and the process group destroyed.

    Even after destroy_process_group, gloo's worker threads can outlive the Python objects they
    reference; interpreter finalisation then aborts the rank ("terminate called without an
    active exception", SIGABRT) and torchrun fails a run that finished. Measured under load: 1
    of 12 two-rank self-forcing runs before this exit.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _estimate_memory(args, cfg) -> int:
    """`tether train RECIPE --estimate-memory`: the per-GPU memory the run would need, computed, nothing trained."""
    import json
    import os

    from .configs import CONFIGS
    from .train.memory_estimate import RECIPES, estimate, format_estimate

    if cfg["recipe"] not in RECIPES:
        raise TetherError(f"no memory estimate for recipe '{cfg['recipe']}' (known: {', '.join(RECIPES)})")
    nproc = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        raise TetherError("--nproc must be at least 1")
    default = {"wan1.3b": CONFIGS["wan2.1-t2v-1.3b"], "toy": CONFIGS["toy"]}.get(args.scale, CONFIGS["wan2.1-t2v-1.3b"])
    result = estimate(cfg, world_size=nproc, mixed_precision=cfg.get("mixed_precision", "bf16") == "bf16",
                      default_config=default)
    print(format_estimate(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result.to_dict(), f, indent=2)
        except OSError as e:
            raise TetherError(f"cannot write {args.json}: {e.strerror}") from None
        print(f"wrote {args.json}")
    return 0


def cmd_serve(args) -> int:
    from .memory import make_policy

    if args.policy:
        make_policy(args.policy)  # fail on a bad name before loading anything
    if args.max_sessions < 1:
        raise TetherError("--max-sessions must be at least 1")
    if args.idle_timeout <= 0:
        raise TetherError("--idle-timeout must be a positive number of seconds")
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as e:
        raise TetherError(f"tether serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None
    pipe = load_from_args(args)
    args.policy = args.policy or pipe.policy
    app = create_app(pipe, policy=args.policy, max_sessions=args.max_sessions, idle_timeout=args.idle_timeout)
    print(f"tether serve: http://{args.host}:{args.port}/  ({pipe.description}; policy {args.policy}, "
          f"at most {args.max_sessions} sessions)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_eval(args) -> int:
    from .eval import cmd_eval as run_eval  # imports cv2 / feature models only when asked
    return run_eval(args)


def build_parser():
    parser = OneLineParser(prog="tether", description="Long, interactive, streaming video generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    g = sub.add_parser("generate", help="generate a video from a prompt or a prompt timeline")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt for the whole video")
    source.add_argument("--timeline", help="'a fox runs[10s] | it stops[5s#]' or a .yaml/.json file")
    g.add_argument("--seconds", type=float, help="video length (default 5 s for a single prompt)")
    g.add_argument("--policy", help="memory policy (see README; default: the model's own, e.g. slow-fast for "
                                    "context-forcing, else window)")
    g.add_argument("--policy-opt", action="append", metavar="KEY=VALUE",
                   help="policy option, repeatable (e.g. promotion=code for slow-fast, global_sink=true for frame-sink)")
    g.add_argument("--switch", help="switch rule at prompt changes: text-reset, kv-recache, kv-flush, apr "
                                    "(default: the policy's own)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--strip", metavar="PNG", help="also save a frame strip of the video (one frame every --strip-every s)")
    g.add_argument("--strip-every", type=float, default=5.0, metavar="SECONDS", help="frame strip spacing (default 5 s)")
    g.add_argument("-o", "--output", required=True, help="output .mp4")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--verbose", action="store_true")
    add_model_arguments(g)
    g.set_defaults(run=cmd_generate)

    t = sub.add_parser("train", help="run a training recipe (also under torchrun)")
    t.add_argument("recipe", help="teacher, ode-init, self-forcing, cf-teacher, cf-stage1, cf-stage2, gf-stage1, gf-stage2, ...")
    t.add_argument("overrides", nargs="*", help="config overrides, key=value (dotted keys for sections)")
    t.add_argument("--scale", default="toy", help="which shipped config: toy (default) or wan1.3b")
    t.add_argument("--config", help="a YAML config file instead of the shipped one")
    t.add_argument("--out", help="run folder (default runs/RECIPE-SCALE)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--export", help="after training, write the result in its inference format to this folder")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--until", help="toy chain only (`tether train toy`): stop after this stage")
    t.add_argument("--only", help="toy chain only: run just this stage (e.g. grounded-forcing beside "
                                  "context-forcing in another process); the stages it reads must be done")
    t.add_argument("--estimate-memory", action="store_true",
                   help="print the computed per-GPU memory of this run (bf16, FSDP2 over --nproc GPUs) and exit")
    t.add_argument("--nproc", type=int, help="with --estimate-memory: GPUs (default: $WORLD_SIZE or 1); "
                                             "accumulation comes from the config (accumulation=8)")
    t.add_argument("--json", help="with --estimate-memory: also write the estimate to this JSON file")
    t.set_defaults(run=cmd_train)
    s = sub.add_parser("serve", help="interactive web app: watch the video as it is generated and steer it live")
    s.add_argument("--policy", help="memory policy a new session starts with (default: the model's own, else window)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max-sessions", type=int, default=2, help="browser sessions generating at once; more are told the server is busy")
    s.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without a word from a tab before its session is freed")
    add_model_arguments(s)
    s.set_defaults(run=cmd_serve)
    e = sub.add_parser("eval", help="score videos: consistency, flicker, motion, drift; exact toy-world metrics")
    e.add_argument("videos", nargs="+", metavar="VIDEO")
    e.add_argument("--prompt", help="the prompt the video was made from")
    e.add_argument("--timeline", help="the timeline it was made from ('a fox runs[10s] | it stops[5s#]' or a file)")
    e.add_argument("--features", default="efficientnet-lite0",
                   help="frame features: efficientnet-lite0 (default), pixels, or a local Hugging Face model folder")
    e.add_argument("--json", required=True, help="where to write the results")
    e.set_defaults(run=cmd_eval)
    from .bench import add_bench_parser  # `tether bench speed`, and later benchmarks
    add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # `tether train RECIPE --out DIR key=value`: argparse stops collecting positionals at the
        # first option, so overrides given after options come back here; they are still overrides.
        if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.run(args)
    except TetherError as e:
        print(f"tether: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tether: interrupted; what was written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
