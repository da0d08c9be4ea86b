"""`tether bench ...`: benchmarks, one sub-command each.

Only argument definitions live here, so that building the CLI parser stays
cheap; each benchmark's module (and torch) is imported when it runs.
"""


def add_bench_parser(subparsers) -> None:
    """Register `tether bench` and its sub-commands on the top-level sub-parsers."""
    bench = subparsers.add_parser("bench", help="measure tether: speed (and more later)")
    # Same parser class as the parent, so bad arguments stay one-line TetherErrors.
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, parser_class=type(bench))
    _add_speed_parser(benchmarks)
    _add_cost_parser(benchmarks)
    _add_quality_parser(benchmarks)
    _add_adherence_parser(benchmarks)
    _add_latents_parser(benchmarks)
    _add_binding_parser(benchmarks)
    _add_texture_parser(benchmarks)


def _add_cost_parser(benchmarks) -> None:
    p = benchmarks.add_parser("cost", help="each policy's per-chunk cost against window at the same cache size")
    p.add_argument("--config", default="toy", help="transformer config, random weights (default: toy)")
    p.add_argument("--latent", type=int, default=8, help="latent height and width (default 8: 64x64 video)")
    p.add_argument("--chunks", type=int, default=20, help="timed chunks per round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per policy (default 3)")
    p.add_argument("--policy", action="append", help="only this policy (repeatable; default: all)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(run=lambda args: __import__("tether.bench.cost", fromlist=["main"]).main(args))


def _add_adherence_parser(benchmarks) -> None:
    p = benchmarks.add_parser(
        "adherence", help="toy-world prompt adherence of a model (and its teacher), read by the probe",
        description="Generate N 5 s clips from random toy-world prompts and score each stated attribute with the probe.")
    p.add_argument("--checkpoint", help="model to test (default: the built-in model; or a shipped name or a bundle folder)")
    p.add_argument("--teacher", help="also sample this bidirectional teacher (transformer .safetensors) on the same prompts")
    p.add_argument("--no-student", action="store_true", help="only the teacher (its pipeline's text encoder and VAE)")
    p.add_argument("--reference", action="store_true",
                   help="also score the world's own renders (truth) and their VAE round trip (vae): the VAE's ceiling")
    p.add_argument("--clips", type=int, default=100, help="number of random prompts (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", help="the student's memory policy (default: the model's own; window for the default)")
    p.add_argument("--teacher-from", help="comma-separated timesteps in (0, 1000): also run the teacher from the world's "
                                          "render noised to each (how much noise it can take before losing the prompt)")
    p.add_argument("--teacher-steps", type=int, help="teacher Euler steps (default: the bundle's teacher_sampling, "
                                                    "else 24)")
    p.add_argument("--teacher-shift", type=float, help="shift of the teacher's Euler grid (default: the bundle's "
                                                      "teacher_sampling, else its shift); a larger shift puts more "
                                                      "of the steps at high noise")
    p.add_argument("--guidance", type=float, default=3.0, help="teacher CFG scale (default 3, the DMD real score's)")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: __import__("tether.bench.adherence", fromlist=["main"]).main(args))


def _add_latents_parser(benchmarks) -> None:
    p = benchmarks.add_parser(
        "latents", help="what a VAE's latents keep: a classifier on an encoded toy dataset's latent frames",
        description="Train a small CNN on the latent frames of an encoded toy dataset to read the subject's attributes "
                    "(world ground truth), and score it on held-out clips: an encoder loss shows here, a decoder loss does not.")
    p.add_argument("dataset", help="an encoded toy dataset folder (latents.pt + prompts.json), e.g. runs/toy/dataset")
    p.add_argument("--clips", type=int, help="use the first N clips (default: all); the last 20%% are held out")
    p.add_argument("--steps", type=int, default=3000, help="classifier training steps (default 3000)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: __import__("tether.bench.latents", fromlist=["main"]).main(args))


def _add_binding_parser(benchmarks) -> None:
    p = benchmarks.add_parser(
        "binding", help="does a flow-matching transformer use each prompt word: true vs swapped-word denoising error",
        description="Held-out world clips are noised and denoised under their prompt and under the prompt with one "
                    "word swapped; reports how often the true word predicts the flow best on the pixels it is about.")
    p.add_argument("--checkpoint", help="bundle whose VAE and text encoder to use (default: the built-in model)")
    p.add_argument("--transformer", help="transformer .safetensors to test (default: the bundle's teacher.safetensors)")
    p.add_argument("--clips", type=int, default=100, help="held-out world clips (default 100)")
    p.add_argument("--seed", type=int, default=1, help="world clip stream (default 1; the toy dataset is stream 0)")
    p.add_argument("--timesteps", help="comma-separated noise timesteps in (0, 1000) (default 250,500,750)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: __import__("tether.bench.binding", fromlist=["main"]).main(args))


def _add_quality_parser(benchmarks) -> None:
    p = benchmarks.add_parser(
        "quality", help="every memory policy and trained student on the scripted toy-world episodes",
        description="Generate every scripted toy-world episode with every policy (and each trained student with its "
                    "own policy), score them with the probe's exact metrics and the generic ones, and write "
                    "quality.json, quality.md, plots and quality.html. Finished runs are cached in OUT/quality_runs/ "
                    "and skipped when the command is run again.")
    p.add_argument("--policies", help="comma-separated memory policies for the default model (default: all)")
    p.add_argument("--models", help="comma-separated models: default, context-forcing, grounded-forcing or bundle "
                                    "folders (default: default plus every installed student)")
    p.add_argument("--episodes", help="comma-separated episodes (default: all; with --quick a reduced set)")
    p.add_argument("--seeds", type=int, help="seeds per episode (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="reduced suite: 60 s block only, 1 seed, pixel features")
    p.add_argument("--features", help="frame features: efficientnet-lite0 (default), pixels (--quick), or a model folder")
    p.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per point of the metrics over time (default 5)")
    p.add_argument("--max-seconds", type=float, help="cut every episode to this length (smoke tests)")
    p.add_argument("--keep-videos", action="store_true", help="keep each run's mp4 in OUT/quality_runs/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: __import__("tether.bench.quality", fromlist=["main"]).main(args))


def _add_speed_parser(benchmarks) -> None:
    from ..cli import add_model_arguments

    p = benchmarks.add_parser(
        "speed",
        help="frames per second, chunk latency, memory and achieved FLOP/s of one policy",
        description="Generate a video with one memory policy and measure speed, latency and memory on this machine. "
                    "Text encoding runs once per prompt and is excluded from every timing.",
    )
    p.add_argument("--policy", default="window", help="memory policy to benchmark (default: window)")
    p.add_argument("--seconds", type=float, default=10.0, help="video length to generate (default 10 s)")
    p.add_argument("--config", help="benchmark a named transformer config with RANDOM weights (tiny, toy, "
                                    "wan2.1-t2v-1.3b, ...) instead of a checkpoint")
    p.add_argument("--height", type=int, help="video height (default: 480 for wan2.1-* configs, else 64)")
    p.add_argument("--width", type=int, help="video width (default: 832 for wan2.1-* configs, else 64)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--no-decode", action="store_true", help="skip the VAE decode (transformer only)")
    p.add_argument("--no-cache-chunks", type=int,
                   help="chunks of the no-KV-cache comparison run (default: enough to fill the window, plus 4; 0 skips it)")
    p.add_argument("--prompt", default="a red circle bounces on grass", help="the prompt (its content does not affect speed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_arguments(p)
    p.set_defaults(run=_run_speed)


def _run_speed(args) -> int:
    from .speed import main

    return main(args)


def _add_texture_parser(benchmarks) -> None:
    p = benchmarks.add_parser(
        "texture", help="how much of the toy world's stripes and dots a VAE's round trip keeps",
        description="Render test clips with patterned and with solid subjects, round-trip both through the model's "
                    "VAE, and report how much of the pattern (its mean shade, and its texture at the pattern's own "
                    "frequency) the decoded difference keeps.")
    p.add_argument("--checkpoint", help="a toy bundle folder (default: the built-in model)")
    p.add_argument("--scales", default="1", help="pattern scales to render, comma-separated (default 1: the world's own)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per test prompt (default 2)")
    p.add_argument("--prompts", type=int, default=4, help="test prompts, one per shape and background (1 to 4, default 4)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: __import__("tether.bench.texture", fromlist=["main"]).main(args))
