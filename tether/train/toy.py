"""`tether train toy`: the whole toy model, from nothing to a pipeline bundle, as resumable stages.

    vae      train the toy video VAE (or take the shipped one, tether/weights/default/vae)
    text     the toy text encoder: a frozen, randomly initialised umT5 over the world's words
    dataset  render world clips, encode them once (VAE latents + text embeddings);
             ~2 clips/s of 81 frames at 64x64 on 2 CPU cores: the default 1000 in ~8 min
    teacher  bidirectional flow-matching teacher on that dataset
    student  ode-init, then self-forcing (when those recipes are registered)
    export   a bundle folder that `tether generate --checkpoint` loads
    long-dataset      longer world clips (405 frames, 25 s) for Context Forcing's long-context teacher
    context-forcing   cf-teacher (ERFT, from the teacher), then cf-stage1 and cf-stage2 on the student
    grounded-forcing  gf-stage1, then gf-stage2 (prompt switches, APR, scene cuts) on the student
    export-students   adapter bundles (bundle-context-forcing/, bundle-grounded-forcing/) over bundle/

The Context/Grounded Forcing students train LoRA adapters on the exported
default student (their toy configs set `lora:`), so each ships in a few MB
beside the default instead of another full transformer.

The VAE and the teacher train in phases (`vae.phases`, `teacher.phases`: a
YAML list of override lists): each phase is an ordinary run of the recipe that
starts from the previous phase's export, in out/teacher-phase1, -phase2, ...;
the last is out/teacher (out/vae for the VAE).

The chain's defaults are the recipe of the shipped built-in model (BUILT_IN
below): the stride-4 VAE and `toy-s4` transformer, shift 1 in every recipe,
the VAE's five phases (the fourth measures the per-frame latent scale, the
last trains the decoder alone behind warmed-up causal caches), the
teacher's four-phase crop curriculum (the last with word contrast), and
ode-init on the teacher's 48-step shift-3 trajectories. Overrides are applied
after them, so
`teacher.phases=[[]]` is a single teacher run and `teacher.model.source=toy`
the stride-8 transformer.

A stage whose output exists is skipped, so re-running the command continues
the chain; a stage interrupted mid-training continues from its checkpoint with
--resume. `--until STAGE` stops after STAGE; `--only STAGE` runs that stage
alone (the Context and Grounded Forcing stages can run side by side in two
processes). Wall times go to chain.json.

Overrides are `STAGE.key=value`: recipe stages pass `key=value` to that
recipe's toy config (`teacher.steps=500`, `ode-init.batch_size=2`); `text.*`
and `dataset.*` set the stage's own settings below; `vae.shipped=false` trains
the VAE even when a shipped one exists.
"""

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import TetherError
from ..schedule import DEFAULT_SHIFT

SHIPPED_VAE = Path(__file__).resolve().parent.parent / "weights" / "default" / "vae"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers writes it after config.json: the export's last file
STAGES = ("vae", "text", "dataset", "teacher", "student", "export",
          "long-dataset", "context-forcing", "grounded-forcing", "export-students")
RECIPE_STAGES = ("vae", "teacher", "ode-init", "self-forcing", "cf-teacher", "cf-stage1", "cf-stage2", "gf-stage1", "gf-stage2")
# What each student's final stage is, and the name its bundle ships under (tether/weights/<name>).
STUDENTS = {"context-forcing": "cf-stage2", "grounded-forcing": "gf-stage2"}
# The memory policy each was trained with, which it runs by default (pipeline.json "policy").
STUDENT_POLICIES = {"context-forcing": "slow-fast", "grounded-forcing": "dual"}
# The toy transformer (tether.configs.CONFIGS["toy"]) reads 32 text tokens of width 128.
DEFAULTS = {
    "text": {"dim": 128, "layers": 2, "heads": 4, "text_len": 32, "seed": 0},
    "dataset": {"clips": 1000, "frames": 81, "size": 64, "seed": 0, "batch_size": 4},
    # 405 frames = 102 latent frames, cf-teacher's full layout (sink 3 + sparse 12x6 + motion 6 + target 21).
    "long-dataset": {"clips": 160, "frames": 405, "size": 64, "seed": 1, "batch_size": 2},
    "vae": {"shipped": True},
}
# The shipped model's recipe (README, "The built-in model"), applied before the user's overrides.
# Shift 1 everywhere: SD3's resolution rule (shift grows with sqrt(tokens)) puts a 336-token toy clip
# near 1, not Wan's 5. ode-init distils the teacher's 48-step shift-3 trajectories, the grid on which the
# teacher itself follows colour best (bench/results/teacher_sampler/).
BUILT_IN = {
    "vae": ["model.source=toy-s4", "data.height=16", "data.width=16", "data.crop=6"],
    "teacher": ["model.source=toy-s4", "shift=1.0"],
    "ode-init": ["shift=1.0", "ode.steps=48", "ode.shift=3.0"],
    **{recipe: ["shift=1.0"] for recipe in ("self-forcing", "cf-teacher", "cf-stage1", "cf-stage2", "gf-stage1", "gf-stage2")},
}
# 3-latent-frame crops at a larger batch, with the loss weighted towards the subjects.
_TEACHER_CROPS = ["data.frames=3", "batch_size=28", "loss.object_weight=4.0"]
# Each phase continues the previous phase's export with a fresh optimiser.
BUILT_IN_PHASES = {
    # The VAE was still gaining ~0.5 dB per 1,000 steps at 5,800; the fourth phase trains nothing and
    # gives each latent frame index its own scale (the causal encoder's first frames are weak). The last
    # trains the decoder alone behind warmed-up causal caches: generation decodes one long stream, whose
    # steady state 21-frame clips never reach (a colour cast from frame ~30 on). The encoder, and so the
    # latent space every transformer learns, is the fourth phase's.
    "vae": [["steps=1800"], ["steps=4000"], ["steps=1000"], ["steps=0", "export.frame_scale=true"],
            ["model.train=decoder", "data.warmup=12", "steps=1200"]],
    # The teacher's crop curriculum: whole clips, then 3-latent-frame crops with object-weighted loss at
    # a larger batch, then whole clips again with that weighting. Last, crops with word contrast
    # (tether.train.word_contrast): flow matching alone left the colour word half used, and weight 0.3
    # keeps most of the colour it gains for the least background (docs/built_in_model_log.md).
    "teacher": [
        ["steps=2500"],
        _TEACHER_CROPS + ["optimizer.lr=4.0e-4", "steps=1500"],
        ["loss.object_weight=4.0", "steps=1500"],
        _TEACHER_CROPS + ["optimizer.lr=1.0e-4", "optimizer.warmup=50", "steps=400",
                          "loss.word_contrast={weight: 0.3, margin: 0.2, min_timestep: 500, attributes: [shape, colour]}"],
    ],
}


class ToyChain:
    def __init__(self, out="runs/toy", resume: bool = False, overrides=(), progress: bool = True, device: str | None = None):
        self.out = Path(out)
        self.resume = resume
        self.progress = progress
        self.device = device
        self.settings = {stage: dict(values) for stage, values in DEFAULTS.items()}
        self.recipe_overrides = {stage: [] for stage in RECIPE_STAGES}
        self.phases = {recipe: [list(phase) for phase in phases] for recipe, phases in BUILT_IN_PHASES.items()}
        self._read_overrides(overrides)
        self.times_path = self.out / "chain.json"

    def _read_overrides(self, overrides) -> None:
        import yaml

        for item in overrides:
            stage, _, rest = item.partition(".")
            if "=" not in rest:
                raise TetherError(f"toy chain override '{item}' is not STAGE.key=value (stages: {', '.join(STAGES)})")
            key, raw = rest.split("=", 1)
            if stage == "vae" and key == "shipped":
                self.settings["vae"]["shipped"] = bool(yaml.safe_load(raw))
            elif stage in BUILT_IN_PHASES and key == "phases":
                self.phases[stage] = _read_phases(item, yaml.safe_load(raw))
            elif stage in RECIPE_STAGES:
                self.recipe_overrides[stage].append(rest)
            elif stage in ("text", "dataset", "long-dataset"):
                if key not in DEFAULTS[stage]:
                    raise TetherError(f"unknown {stage} setting '{key}' (known: {', '.join(DEFAULTS[stage])})")
                self.settings[stage][key] = yaml.safe_load(raw)
            else:
                raise TetherError(f"toy chain override '{item}': no stage '{stage}' (stages: {', '.join(RECIPE_STAGES + ('text', 'dataset', 'long-dataset'))})")

    # ---- paths: each stage's output, whose existence marks the stage done ---------------
    @property
    def vae_folder(self) -> Path:
        return self.out / "vae" / "export"

    @property
    def text_folder(self) -> Path:
        return self.out / "text_encoder"

    @property
    def dataset_folder(self) -> Path:
        return self.out / "dataset"

    def transformer_of(self, recipe: str) -> Path:
        return self.out / recipe / "export" / "transformer.safetensors"

    @property
    def long_dataset_folder(self) -> Path:
        return self.out / "long_dataset"

    @property
    def bundle_folder(self) -> Path:
        return self.out / "bundle"

    def student_bundle_folder(self, name: str) -> Path:
        return self.out / f"bundle-{name}"

    def done(self, stage: str) -> bool:
        outputs = {
            "vae": self.vae_folder / VAE_WEIGHTS,
            "text": self.text_folder / "tokenizer.json",  # written last by save_toy_text_encoder
            "dataset": self.dataset_folder / "latents.pt",
            "teacher": self.transformer_of("teacher"),
            "student": self.transformer_of("self-forcing"),
            "export": self.bundle_folder / "pipeline.json",
            "long-dataset": self.long_dataset_folder / "latents.pt",
            "context-forcing": self.transformer_of(STUDENTS["context-forcing"]),
            "grounded-forcing": self.transformer_of(STUDENTS["grounded-forcing"]),
            "export-students": self.student_bundle_folder("grounded-forcing") / "pipeline.json",
        }
        return outputs[stage].exists()

    # ---- running ------------------------------------------------------------------------
    def run(self, until: str | None = None, only: str | None = None) -> dict:
        for name in (until, only):
            if name is not None and name not in STAGES:
                raise TetherError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
        last = STAGES.index(until) if until else len(STAGES) - 1
        self.out.mkdir(parents=True, exist_ok=True)
        for number, stage in enumerate(STAGES[:last + 1], 1):
            if only is not None and stage != only:
                continue
            header = f"[{number}/{len(STAGES)}] {stage}"
            if self.done(stage):
                print(f"{header}: done already, skipped", flush=True)
                continue
            print(f"{header}: running", flush=True)
            began = time.perf_counter()
            note = getattr(self, "stage_" + stage.replace("-", "_"))()
            seconds = time.perf_counter() - began
            # Re-read: a stage run with --only in another process may have written its time meanwhile.
            times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
            # A resumed stage adds up the wall time of all its runs.
            previous = times.get(stage, {}).get("seconds", 0.0)
            times[stage] = {"seconds": round(previous + seconds, 1), "note": note}
            tmp = self.times_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(times, indent=1) + "\n")
            tmp.replace(self.times_path)
            print(f"{header}: finished in {seconds:.0f} s{' (' + note + ')' if note else ''}", flush=True)
        return json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def config_of(self, recipe: str, extra=(), last=()) -> dict:
        """The recipe's config with, in order, the built-in recipe's overrides, `extra`, the user's
        `recipe.*` overrides, then `last`: the user's win over the defaults, the chain's own wiring wins over both."""
        from .config import load_config

        overrides = BUILT_IN.get(recipe, []) + list(extra) + self.recipe_overrides.get(recipe, []) + list(last)
        return load_config(recipe, overrides=overrides)

    def _train(self, recipe: str, extra=(), run_name: str | None = None, last=()) -> "object":
        """Run (or continue) a recipe in out/<run_name or recipe>, then export it to its export/ folder."""
        from . import Trainer

        cfg = self.config_of(recipe, extra, last)
        if self.device:
            cfg["device"] = self.device
        run_dir = self.out / (run_name or recipe)
        resume = (run_dir / "checkpoint.pt").exists()
        if resume and not self.resume:
            raise TetherError(f"{run_dir} holds an unfinished {recipe} run: pass --resume to continue it")
        trainer = Trainer(cfg, run_dir, resume=resume, progress=self.progress)
        last = trainer.run()
        export = run_dir / "export"
        export.mkdir(parents=True, exist_ok=True)
        report = trainer.recipe.export(export)
        return last, report

    def stage_vae(self) -> str:
        if self.settings["vae"]["shipped"] and (SHIPPED_VAE / "config.json").exists():
            shutil.copytree(SHIPPED_VAE, self.vae_folder, dirs_exist_ok=True)
            return f"copied the shipped VAE {SHIPPED_VAE} (vae.shipped=false trains one)"
        _, report = self._train_phases("vae", [], VAE_WEIGHTS, whole_folder=True)
        return f"{self._phase_count('vae')}held-out PSNR {report['psnr_db']:.2f} dB"

    def stage_text(self) -> str:
        from ..text import make_toy_text_encoder, save_toy_text_encoder
        from ..world import vocabulary

        s = self.settings["text"]
        encoder = make_toy_text_encoder(vocabulary(), dim=s["dim"], layers=s["layers"], heads=s["heads"],
                                        text_len=s["text_len"], seed=s["seed"])
        shutil.rmtree(self.text_folder, ignore_errors=True)  # a half-written folder from an interrupted run
        save_toy_text_encoder(encoder, self.text_folder)
        return f"umT5 dim {s['dim']}, {s['layers']} layers, {s['text_len']} tokens, frozen random (seed {s['seed']})"

    def stage_dataset(self) -> str:
        return self._build_dataset(self.dataset_folder, self.settings["dataset"])

    def stage_long_dataset(self) -> str:
        return self._build_dataset(self.long_dataset_folder, self.settings["long-dataset"])

    def _build_dataset(self, folder: Path, s: dict) -> str:
        from ..text import load_text_encoder
        from ..vae import LatentCodec, load_vae
        from .toy_data import build_latent_dataset

        codec = LatentCodec(load_vae(self.vae_folder))
        text_encoder = load_text_encoder(str(self.text_folder))
        stats = build_latent_dataset(folder, codec, text_encoder, s["clips"], s["frames"], s["size"],
                                     seed=s["seed"], batch_size=s["batch_size"], progress=self.progress)
        rate = stats["clips_per_second"]
        return f"{s['clips']} clips, latents {stats['latent_shape']}" + (f", {rate:.2f} clips/s" if rate else "")

    def _data_overrides(self):
        return ["data.kind=latents", f"data.path={self.dataset_folder}"]

    def phase_name(self, recipe: str, index: int) -> str:
        return recipe if index == len(self.phases[recipe]) - 1 else f"{recipe}-phase{index + 1}"

    def _phase_count(self, recipe: str) -> str:
        return f"{len(self.phases[recipe])} phases, " if len(self.phases[recipe]) > 1 else ""

    def _train_phases(self, recipe: str, extra: list, weights: str, whole_folder: bool = False) -> tuple:
        """Run `recipe`'s phases not yet exported, each from the previous one's export: its `weights`
        file, or the whole export folder (a VAE's) with `whole_folder`."""
        exports = [self.out / self.phase_name(recipe, i) / "export" for i in range(len(self.phases[recipe]))]
        finished = [export / weights for export in exports]
        sources = exports if whole_folder else finished
        # A phase's export means every phase before it is done, so a chain resumed from a later phase's
        # export alone (e.g. one carried to a fresh machine) does not train the earlier ones again.
        done = max((i for i, marker in enumerate(finished) if marker.exists()), default=-1)
        last, report = {}, {}
        for index in range(done + 1, len(self.phases[recipe])):
            # A later phase continues from the earlier one's weights, whatever model.source the user set.
            chained = [f"model.source={sources[index - 1]}"] if index > 0 else []
            last, report = self._train(recipe, extra, run_name=self.phase_name(recipe, index),
                                       last=self.phases[recipe][index] + chained)
        return last, report

    def stage_teacher(self) -> str:
        # text.source: the encoder that embedded the dataset, for word contrast's variant prompts.
        last, _ = self._train_phases("teacher", self._data_overrides() + [f"text.source={self.text_folder}"],
                                     "transformer.safetensors")
        loss = f"final loss {last.get('loss', float('nan')):.4g}" if last else ""
        return (self._phase_count("teacher") + loss).strip(", ")

    def stage_student(self) -> str:
        from .recipe import RECIPES

        missing = [r for r in ("ode-init", "self-forcing") if r not in RECIPES]
        if missing:
            message = f"recipe(s) {', '.join(missing)} not registered yet: student skipped, export uses the teacher"
            print(f"  {message}", flush=True)
            return message
        teacher = str(self.transformer_of("teacher"))
        # The causal student starts from the bidirectional teacher's weights, as CausVid and Self-Forcing
        # start from Wan (teacher.source unset follows model.source).
        self._train_once("ode-init", self._data_overrides() + [f"model.source={teacher}"])
        self._train("self-forcing", self._data_overrides() + [f"model.source={self.transformer_of('ode-init')}",
                                                              f"teacher.source={teacher}"])
        return "ode-init + self-forcing"

    def stage_export(self) -> str:
        import torch

        from ..checkpoints import load_transformer, save_transformer
        from ..vae import LatentCodec, load_vae

        student = self.transformer_of("self-forcing")
        transformer = student if student.exists() else self.transformer_of("teacher")
        if not transformer.exists():
            raise TetherError(f"nothing to export: {transformer} is missing (run the teacher stage first)")
        what = "causal self-forcing student" if student.exists() else \
            "bidirectional teacher (no distilled student yet: slow, not causal-trained)"
        dataset = self.settings["dataset"]
        tmp = self.bundle_folder.with_name(self.bundle_folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # fp16 on disk (half the size; loading casts back to the run dtype), the teacher beside the
        # student because every later recipe (cf-teacher, DMD's real score) starts from it.
        written = {}
        for source, name in ((transformer, "transformer.safetensors"), (self.transformer_of("teacher"), "teacher.safetensors")):
            if source.exists():
                written[name] = load_transformer(str(source))
                save_transformer(written[name], tmp / name, dtype=torch.float16)
        shutil.copytree(self.text_folder, tmp / "text_encoder")
        shutil.copytree(self.vae_folder, tmp / "vae")
        config = written["transformer.safetensors"].config
        stride = LatentCodec(load_vae(self.vae_folder)).spatial_stride
        clips = json.loads((self.dataset_folder / "prompts.json").read_text())["num_clips"]
        run_config = json.loads((transformer.parent.parent / "config.json").read_text())
        meta = {"height": dataset["size"], "width": dataset["size"], "fps": 16,
                "shift": float(run_config.get("shift", DEFAULT_SHIFT)),  # its sampler must use the shift it trained at
                "description": f"toy world model: {what}; stride-{stride} toy VAE; {config.num_layers}-layer "
                               f"dim-{config.dim} transformer; "
                               f"trained by `tether train toy` on {clips} world clips"}
        ode_config = self.out / "ode-init" / "config.json"
        if student.exists() and ode_config.exists():
            # The teacher's grid whose trajectories the student regressed onto: how to sample the teacher.
            ode = json.loads(ode_config.read_text())
            meta["teacher_sampling"] = {"steps": int(ode["ode"]["steps"]),
                                        "shift": float(ode["ode"].get("shift") or ode.get("shift", DEFAULT_SHIFT))}
        (tmp / "pipeline.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(self.bundle_folder, ignore_errors=True)
        tmp.replace(self.bundle_folder)
        return f"bundle {self.bundle_folder} from the {what.split(' (')[0]}"


    # ---- the Context and Grounded Forcing students: adapters over the exported default --------
    def _train_once(self, recipe: str, extra=()) -> None:
        if not self.transformer_of(recipe).exists():
            self._train(recipe, extra)

    def _student_sources(self) -> list:
        """The exported bundle's student and teacher: the adapters must fit the weights that ship."""
        return [f"model.source={self.bundle_folder / 'transformer.safetensors'}",
                f"teacher.source={self.bundle_folder / 'teacher.safetensors'}"]

    def _continue_adapter(self, recipe: str) -> str:
        return f"lora.init={self.transformer_of(recipe).parent / 'adapter'}"

    def stage_context_forcing(self) -> str:
        teacher = self.bundle_folder / "teacher.safetensors"
        long_data = ["data.kind=latents", f"data.path={self.long_dataset_folder}"]
        self._train_once("cf-teacher", long_data + [f"model.source={teacher}"])
        self._train_once("cf-stage1", self._data_overrides() + self._student_sources())
        # Stage 2: contextual DMD against the long-context teacher, continuing stage 1's adapter.
        self._train_once("cf-stage2", self._data_overrides() + self._student_sources()
                         + [f"teacher.source={self.transformer_of('cf-teacher')}", self._continue_adapter("cf-stage1")])
        return "cf-teacher + cf-stage1 + cf-stage2"

    def stage_grounded_forcing(self) -> str:
        self._train_once("gf-stage1", self._data_overrides() + self._student_sources())
        self._train_once("gf-stage2", self._data_overrides() + self._student_sources() + [self._continue_adapter("gf-stage1")])
        return "gf-stage1 + gf-stage2"

    def stage_export_students(self) -> str:
        from ..checkpoints import BASE_FINGERPRINT_KEY, weights_fingerprint

        # Each adapter names the base it was made over, so loading it over another student is an error.
        base_fingerprint = weights_fingerprint(self.bundle_folder / "transformer.safetensors")
        written = []
        for name, recipe in STUDENTS.items():
            adapter = self.transformer_of(recipe).parent / "adapter"
            if not (adapter / "adapter_model.safetensors").exists():
                raise TetherError(f"{recipe} left no adapter in {adapter}: the student configs must set lora:")
            folder = self.student_bundle_folder(name)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(adapter, tmp / "adapter")
            config_path = tmp / "adapter" / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config[BASE_FINGERPRINT_KEY] = base_fingerprint
            config_path.write_text(json.dumps(adapter_config, indent=1) + "\n")
            base = json.loads((self.bundle_folder / "pipeline.json").read_text())
            meta = {"base": os.path.relpath(self.bundle_folder, folder), "lora": "adapter", "policy": STUDENT_POLICIES[name],
                    "height": base["height"], "width": base["width"], "fps": base.get("fps", 16),
                    "description": f"toy world {name} student: LoRA adapter ({recipe}) over the default student"}
            (tmp / "pipeline.json").write_text(json.dumps(meta, indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.replace(folder)
            written.append(folder.name)
        return ", ".join(written)


def _read_phases(item: str, phases) -> list:
    """`vae.phases`, `teacher.phases`: a non-empty list of lists of key=value overrides."""
    if not isinstance(phases, list) or not phases or not all(
            isinstance(phase, list) and all(isinstance(o, str) and "=" in o for o in phase) for phase in phases):
        stage = item.partition(".")[0]
        raise TetherError(f"toy chain override '{item}': {stage}.phases is a list of override lists, "
                          f"e.g. {stage}.phases=[[steps=2500], [data.frames=3, steps=1500]]")
    return phases


def run_toy_chain(args) -> int:
    """`tether train toy` (called from the CLI's train command)."""
    chain = ToyChain(args.out or "runs/toy", resume=args.resume, overrides=args.overrides,
                     progress=not args.quiet, device=getattr(args, "device", None))
    times = chain.run(until=getattr(args, "until", None), only=getattr(args, "only", None))
    total = sum(t["seconds"] for t in times.values())
    stages = ", ".join(f"{name} {entry['seconds']:.0f} s" for name, entry in times.items())
    print(f"toy chain in {chain.out}: {stages} (total {total:.0f} s)")
    return 0
