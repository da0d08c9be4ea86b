"""The toy chain's first stages: world clips, the encoded dataset, the VAE recipe's export, the chain runner."""

import json

import numpy as np
import pytest
import torch

from tether.text import load_text_encoder, make_toy_text_encoder, save_toy_text_encoder
from tether.train import Trainer
from tether.train.config import load_config
from tether.train.data import LatentData
from tether.train.toy_data import build_latent_dataset, sample_clip
from tether.vae import LatentCodec, load_vae
from tether.world import parse, vocabulary

# A tiny VAE run that still exercises training, statistics and the PSNR check.
TINY_VAE = ["model.source=tiny", "data.frames=2", "data.height=2", "data.width=2", "batch_size=1", "ema=0.9",
            "steps=2", "eval_every=0", "export.stats_clips=2", "export.eval_clips=1", "export.frames=5"]


def test_clips_are_a_pure_function_of_seed_and_index():
    frames, prompt = sample_clip(0, 7, num_frames=9, size=32)
    again, prompt_again = sample_clip(0, 7, num_frames=9, size=32)
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 32, 3)
    assert prompt == prompt_again and np.array_equal(frames, again)
    other, other_prompt = sample_clip(1, 7, num_frames=9, size=32)
    assert other_prompt != prompt or not np.array_equal(other, frames)
    prompts = [sample_clip(0, i, num_frames=1, size=16)[1] for i in range(40)]
    scenes = [parse(p) for p in prompts]  # every prompt is in the world's grammar
    assert any(len(s.objects) == 2 for s in scenes) and any(len(s.objects) == 1 for s in scenes)
    assert any(s.camera_pan for s in scenes)
    assert any(o.colour is None or o.shape is None or o.pattern is None for s in scenes for o in s.objects)


def test_dataset_builder_writes_a_latents_source_and_resumes(tmp_path):
    codec = LatentCodec(load_vae("tiny"))
    text = make_toy_text_encoder(vocabulary(), dim=32, layers=1, heads=2, text_len=8, seed=0)
    stats = build_latent_dataset(tmp_path, codec, text, num_clips=3, num_frames=5, size=16, seed=0, progress=False)
    assert stats["encoded_now"] == 3
    saved = torch.load(tmp_path / "latents.pt", weights_only=True)
    assert saved["latents"].dtype == torch.float16 and saved["latents"].shape == (3, 16, 2, 2, 2)
    assert saved["text"].shape == (3, 8, 32)
    prompts = json.loads((tmp_path / "prompts.json").read_text())["prompts"]
    assert prompts == [sample_clip(0, i, 5, 16)[1] for i in range(3)]
    latents, embeddings = LatentData(tmp_path).batch(torch.Generator().manual_seed(0), 2)
    assert latents.shape == (2, 16, 2, 2, 2) and embeddings.shape == (2, 8, 32) and latents.dtype == torch.float32
    again = build_latent_dataset(tmp_path, codec, text, num_clips=3, num_frames=5, size=16, seed=0, progress=False)
    assert again["encoded_now"] == 0  # every shard was already there


def test_vae_export_normalises_latents_and_loads_back(tmp_path):
    trainer = Trainer(load_config("vae", overrides=TINY_VAE), tmp_path / "run", progress=False)
    last = trainer.run()
    assert all(np.isfinite(v) for v in last.values())
    report = trainer.recipe.export(tmp_path / "vae")
    assert np.isfinite(report["psnr_db"])
    gains = report["decoder_gain_by_latent_frame"]  # export.frames=5: latent frames 0 and 1
    assert len(gains) == 2 and all(g > 0 for g in gains)
    vae = load_vae(tmp_path / "vae")
    assert vae.config.latents_std != [1.0] * 16 and vae.config.latents_mean != [0.0] * 16
    # Held-out clips the statistics never saw come out near unit scale per channel.
    frames, _ = sample_clip(5, 0, num_frames=5, size=16)
    from tether.train.toy_data import clips_to_video

    latents = LatentCodec(vae).encode(clips_to_video([frames]))
    assert 0.2 < latents.std().item() < 5.0


def test_vae_export_frame_scale_brings_every_latent_frame_index_to_unit_scale(tmp_path):
    """Recomputed: the exported scale is the std of each frame index of the statistics clips' latents."""
    from tether.train.recipes.vae import latent_statistics

    overrides = TINY_VAE + ["export.frame_scale=true", "export.frames=9", "export.stats_clips=3"]
    trainer = Trainer(load_config("vae", overrides=overrides), tmp_path / "run", progress=False)
    trainer.run()
    trainer.recipe.export(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    scale = vae.config.latents_frame_scale
    assert len(scale) == 3 and len(set(scale)) == 3  # 9 frames: latent frames 0, 1, 2, each its own scale
    plain = load_vae(tmp_path / "vae")
    mean, std, _ = latent_statistics(plain, 3, 9, 16)
    assert np.allclose(mean, vae.config.latents_mean, atol=1e-3) and np.allclose(std, vae.config.latents_std, rtol=1e-2)
    # Those clips' latents through the codec: unit std at every frame index.
    from tether.train.toy_data import clips_to_video

    clips = [sample_clip(1, 10_000 + i, 9, 16)[0] for i in range(3)]
    latents = LatentCodec(vae).encode(clips_to_video(clips))
    per_frame = latents.transpose(0, 2).flatten(1).std(1)
    assert torch.allclose(per_frame, torch.ones(3), atol=0.02)
    # A decoder-only fine-tune keeps the scale with the rest of the latent space.
    tune_overrides = [o for o in TINY_VAE if not o.startswith("model.source")]
    tune = Trainer(load_config("vae", overrides=tune_overrides + [f"model.source={tmp_path / 'vae'}", "model.train=decoder"]),
                   tmp_path / "tune", progress=False)
    tune.run()
    tune.recipe.export(tmp_path / "tuned")
    assert load_vae(tmp_path / "tuned").config.latents_frame_scale == scale


def test_stride_four_vae_trains_at_its_own_latent_size(tmp_path):
    """data.height counts latent pixels at the VAE's own stride: 4 of them are 16 px for "toy-s4"."""
    overrides = TINY_VAE + ["model.source=toy-s4", "data.height=4", "data.width=4"]
    trainer = Trainer(load_config("vae", overrides=overrides), tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.recipe.size == 16
    trainer.recipe.export(tmp_path / "vae")
    codec = LatentCodec(load_vae(tmp_path / "vae"))
    assert codec.spatial_stride == 4
    frames, _ = sample_clip(5, 0, num_frames=5, size=16)
    from tether.train.toy_data import clips_to_video

    assert codec.encode(clips_to_video([frames])).shape == (1, 16, 2, 4, 4)


def _tether(*argv) -> int:
    """The CLI in-process (a subprocess would spend most of the test importing torch and diffusers)."""
    from tether.cli import build_parser

    args = build_parser().parse_args(list(argv))
    return args.run(args)


def test_toy_chain_cli_runs_until_text(tmp_path, capsys):
    out = tmp_path / "toy"
    overrides = ["vae.shipped=false", "vae.phases=[[]]"] + [f"vae.{item}" for item in TINY_VAE]
    assert _tether("train", "toy", *overrides, "--out", str(out), "--until", "text", "--quiet", "--device", "cpu") == 0
    times = json.loads((out / "chain.json").read_text())
    assert set(times) == {"vae", "text"} and all(t["seconds"] >= 0 for t in times.values())
    assert load_vae(out / "vae" / "export").config.z_dim == 16
    encoder = load_text_encoder(str(out / "text_encoder"))
    assert encoder.encode(["a red circle bounces on grass"]).shape == (1, 32, 128)
    capsys.readouterr()
    assert _tether("train", "toy", *overrides, "--out", str(out), "--until", "text", "--quiet") == 0
    assert capsys.readouterr().out.count("skipped") == 2


def test_only_runs_one_stage_and_keeps_the_times_other_processes_wrote(tmp_path, monkeypatch):
    from tether.train.toy import ToyChain

    chain = ToyChain(tmp_path, progress=False)
    ran = []

    def fake_stage(name):
        def stage():
            ran.append(name)
            # Another process (say, the Context Forcing chain) finishes its stage meanwhile.
            (tmp_path / "chain.json").write_text(json.dumps({"context-forcing": {"seconds": 7.0, "note": ""}}))
            return "done"
        return stage

    for stage in ("vae", "text", "grounded-forcing"):
        monkeypatch.setattr(chain, "stage_" + stage.replace("-", "_"), fake_stage(stage))
    times = chain.run(only="grounded-forcing")
    assert ran == ["grounded-forcing"]
    assert set(times) == {"context-forcing", "grounded-forcing"} and times["context-forcing"]["seconds"] == 7.0
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="unknown stage 'gf'"):
        chain.run(only="gf")


def test_student_stage_starts_the_causal_student_from_the_teacher(tmp_path, monkeypatch):
    """ode-init regresses the teacher's own weights onto its trajectories, not a random init."""
    from tether.train.toy import ToyChain

    chain = ToyChain(tmp_path, progress=False)
    calls = []
    monkeypatch.setattr(chain, "_train", lambda recipe, extra=(): calls.append((recipe, list(extra))) or ({}, {}))
    chain.stage_student()
    teacher = str(chain.transformer_of("teacher"))
    (ode, ode_extra), (sf, sf_extra) = calls
    assert ode == "ode-init" and f"model.source={teacher}" in ode_extra
    assert not any(item.startswith("teacher.source=") for item in ode_extra)  # follows model.source
    assert sf == "self-forcing" and f"model.source={chain.transformer_of('ode-init')}" in sf_extra
    assert f"teacher.source={teacher}" in sf_extra


def test_toy_chain_rejects_unknown_stages(tmp_path):
    from tether.errors import TetherError
    from tether.train.toy import ToyChain

    with pytest.raises(TetherError, match="no stage"):
        ToyChain(tmp_path, overrides=["students.steps=3"])
    with pytest.raises(TetherError, match="unknown stage"):
        ToyChain(tmp_path).run(until="nothing")


def test_vae_object_crops_hold_an_object(tmp_path):
    # A 16x16 window of a 64x64 frame, placed around the first visible object's centre.
    cfg = load_config("vae", overrides=TINY_VAE + ["data.height=8", "data.width=8", "data.crop=2",
                                                   "data.object_crops=1.0"])
    recipe = Trainer(cfg, tmp_path / "run", progress=False).recipe
    recipe.setup()
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        index = int(torch.randint(2**31 - 1, (1,), generator=g))
        frames, _, truths = sample_clip(0, index, 5, 64, with_truth=True)
        top, left = recipe._around_object(truths[0], 0, 0)
        visible = [o for o in truths[0].objects if o.visible]
        if visible:
            assert top <= visible[0].y <= top + 16 or visible[0].y < 0 or visible[0].y > 64
            assert left <= visible[0].x <= left + 16 or visible[0].x < 0 or visible[0].x > 64


def test_vae_decoder_fine_tune_keeps_the_latent_space(tmp_path):
    first = Trainer(load_config("vae", overrides=TINY_VAE), tmp_path / "first", progress=False)
    first.run()
    first.recipe.export(tmp_path / "vae")
    overrides = [o for o in TINY_VAE if not o.startswith("model.source")]
    tune = Trainer(load_config("vae", overrides=overrides + [f"model.source={tmp_path / 'vae'}", "model.train=decoder",
                                                             "optimizer.lr=1.0e-2"]),
                   tmp_path / "tune", progress=False)
    tune.run()
    tune.recipe.export(tmp_path / "tuned")
    before, after = load_vae(tmp_path / "vae"), load_vae(tmp_path / "tuned")
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std
    old, new = before.state_dict(), after.state_dict()
    unchanged = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert unchanged and all(torch.equal(old[k], new[k]) for k in unchanged)
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))


def test_vae_decoder_fine_tune_needs_a_trained_vae(tmp_path):
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="model.source must be its folder"):
        Trainer(load_config("vae", overrides=TINY_VAE + ["model.train=decoder"]), tmp_path / "run", progress=False).run()


def test_object_masks_cover_every_object_pixel_and_little_else():
    """Recomputed at pixel level: each visible object's disc lies inside the mask, which reaches
    no further than one latent pixel beyond the disc's bounding square."""
    from tether.train.toy_data import clip_truths, object_mask
    from tether.world.vocab import SIZE_DIAMETERS

    for index in range(6):
        truths = clip_truths(0, index, 81)
        mask = object_mask(truths, 21, 16, 16)
        ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
        for latent in range(21):
            frames = [0] if latent == 0 else range(1 + 4 * (latent - 1), 1 + 4 * latent)
            disc, box = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
            for frame in frames:
                for obj in truths[frame].visible_objects():
                    r = SIZE_DIAMETERS[obj.size] / 2
                    disc |= (ys - obj.y) ** 2 + (xs - obj.x) ** 2 <= r * r
                    box |= ((ys - obj.y).abs() <= r + 4) & ((xs - obj.x).abs() <= r + 4)
            pooled = lambda m: m.view(16, 4, 16, 4).any(3).any(1)
            assert not (pooled(disc) & ~mask[latent]).any()  # every object pixel is weighted
            assert not (mask[latent] & ~pooled(box)).any()


def test_masked_latent_data_and_the_object_weighted_teacher(tmp_path):
    from tether.train.recipes.teacher import flow_matching_loss

    codec = LatentCodec(load_vae("tiny"))
    text = make_toy_text_encoder(vocabulary(), dim=128, layers=1, heads=2, text_len=32, seed=0)  # the toy model's text
    build_latent_dataset(tmp_path, codec, text, num_clips=3, num_frames=9, size=16, seed=0, progress=False)
    data = LatentData(tmp_path, frames=2)
    assert data.masks.shape == (3, 3, 2, 2) and data.masks.any()
    latents, embeddings, masks = data.batch(torch.Generator().manual_seed(4), 5, with_masks=True)
    again, _ = data.batch(torch.Generator().manual_seed(4), 5)
    assert torch.equal(latents, again) and masks.shape == (5, 1, 2, 2, 2)  # the same clips as without masks

    class Fixed(torch.nn.Module):  # a "model" whose error is known: it predicts `out` everywhere
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward_bidirectional(self, x, t, text):
            return self.out

    target = torch.randn(1, 4, 2, 2, 2)
    noise, x0, t = target.clone(), torch.zeros_like(target), torch.tensor([500.0])
    wrong = target.clone()
    wrong[..., 0, 0] += 3.0  # an error only at latent pixel (0, 0)
    ignore_it = torch.ones(1, 1, 2, 2, 2)
    ignore_it[..., 0, 0] = 0.0
    assert flow_matching_loss(Fixed(wrong), x0, None, t, noise, weight=ignore_it) == 0
    plain = flow_matching_loss(Fixed(wrong), x0, None, t, noise)
    assert torch.isclose(flow_matching_loss(Fixed(wrong), x0, None, t, noise, weight=torch.ones(1, 1, 2, 2, 2)), plain)

    overrides = ["model.source=toy", "data.kind=latents", f"data.path={tmp_path}", "data.frames=2", "batch_size=2",
                 "steps=2", "save_every=2", "loss.object_weight=4.0"]
    trainer = Trainer(load_config("teacher", overrides=overrides), tmp_path / "run", progress=False)
    assert np.isfinite(trainer.run()["loss"])
    (tmp_path / "masks.pt").unlink()
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="object masks"):
        Trainer(load_config("teacher", overrides=overrides), tmp_path / "run2", progress=False).run()


def test_teacher_phases_chain_runs_each_from_the_last_export_and_resume_skips_done_phases(tmp_path, monkeypatch):
    from tether.train.toy import ToyChain

    phases = "teacher.phases=[[steps=25], [data.frames=3, batch_size=28, steps=15], [loss.object_weight=4.0, steps=15]]"
    chain = ToyChain(tmp_path, progress=False, overrides=["teacher.shift=1.0", "teacher.model.source=toy-s4", phases])
    calls = []

    def fake_train(recipe, extra=(), run_name=None, last=()):
        calls.append((recipe, run_name, list(last)))
        export = tmp_path / run_name / "export" / "transformer.safetensors"
        export.parent.mkdir(parents=True)
        export.write_bytes(b"")
        return {"loss": 0.5}, {}

    monkeypatch.setattr(chain, "_train", fake_train)
    (tmp_path / "teacher-phase1" / "export").mkdir(parents=True)
    (tmp_path / "teacher-phase1" / "export" / "transformer.safetensors").write_bytes(b"")  # phase 1 finished earlier
    note = chain.stage_teacher()
    first = tmp_path / "teacher-phase1" / "export" / "transformer.safetensors"
    second = tmp_path / "teacher-phase2" / "export" / "transformer.safetensors"
    assert calls == [("teacher", "teacher-phase2", ["data.frames=3", "batch_size=28", "steps=15", f"model.source={first}"]),
                     ("teacher", "teacher", ["loss.object_weight=4.0", "steps=15", f"model.source={second}"])]
    assert chain.done("teacher") and note == "3 phases, final loss 0.5"
    # The user's teacher.* overrides apply to every phase, before the phase's own and the chained source.
    assert chain.recipe_overrides["teacher"] == ["shift=1.0", "model.source=toy-s4"]


def test_teacher_phases_resume_from_the_latest_export_alone(tmp_path, monkeypatch):
    from tether.train.toy import ToyChain

    phases = "teacher.phases=[[steps=25], [steps=15], [steps=15]]"
    chain = ToyChain(tmp_path, progress=False, overrides=[phases])
    calls = []
    monkeypatch.setattr(chain, "_train", lambda recipe, extra=(), run_name=None, last=(): calls.append((run_name, list(last)))
                        or ({"loss": 0.5}, {}))
    second = tmp_path / "teacher-phase2" / "export" / "transformer.safetensors"
    second.parent.mkdir(parents=True)
    second.write_bytes(b"")  # carried over without phase 1's export
    chain.stage_teacher()
    assert calls == [("teacher", ["steps=15", f"model.source={second}"])]


def test_vae_phases_continue_from_the_previous_phase_folder(tmp_path, monkeypatch):
    from tether.train.toy import VAE_WEIGHTS, ToyChain

    chain = ToyChain(tmp_path, progress=False, overrides=["vae.shipped=false"])
    calls = []

    def fake_train(recipe, extra=(), run_name=None, last=()):
        calls.append((run_name, list(last)))
        (tmp_path / run_name / "export").mkdir(parents=True)
        (tmp_path / run_name / "export" / VAE_WEIGHTS).write_bytes(b"")
        return {}, {"psnr_db": 24.5}

    monkeypatch.setattr(chain, "_train", fake_train)
    (tmp_path / "vae-phase1" / "export").mkdir(parents=True)  # phase 1 was killed before its export finished
    (tmp_path / "vae-phase2" / "export").mkdir(parents=True)
    (tmp_path / "vae-phase2" / "export" / VAE_WEIGHTS).write_bytes(b"")
    note = chain.stage_vae()
    second, third, fourth = (tmp_path / f"vae-phase{i}" / "export" for i in (2, 3, 4))
    assert calls == [("vae-phase3", ["steps=1000", f"model.source={second}"]),
                     ("vae-phase4", ["steps=0", "export.frame_scale=true", f"model.source={third}"]),
                     ("vae", ["model.train=decoder", "data.warmup=12", "steps=1200", f"model.source={fourth}"])]
    assert chain.done("vae") and note == "5 phases, held-out PSNR 24.50 dB"
    assert chain.config_of("vae", last=chain.phases["vae"][0])["steps"] == 1800


def test_teacher_phases_must_be_override_lists(tmp_path):
    from tether.errors import TetherError
    from tether.train.toy import ToyChain

    for bad in ("teacher.phases=[]", "teacher.phases=[steps=3]", "teacher.phases=[[3]]"):
        with pytest.raises(TetherError, match="list of override lists"):
            ToyChain(tmp_path, overrides=[bad])
    assert ToyChain(tmp_path, overrides=["teacher.phases=[[]]"]).phase_name("teacher", 0) == "teacher"  # a single run
    with pytest.raises(TetherError, match="vae.phases is a list"):
        ToyChain(tmp_path, overrides=["vae.phases=[]"])


def test_chain_defaults_are_the_built_in_models_recipe_and_the_users_overrides_win(tmp_path):
    from tether.train.toy import ToyChain

    chain = ToyChain(tmp_path)
    assert len(chain.phases["teacher"]) == 4 and chain.phase_name("teacher", 0) == "teacher-phase1"
    # The last teacher phase adds word contrast, whose variant prompts need the chain's own text encoder.
    wiring = []
    chain._train = lambda recipe, extra=(), run_name=None, last=(): wiring.append(list(extra)) or ({}, {})
    chain.stage_teacher()
    assert all(f"text.source={chain.text_folder}" in extra for extra in wiring) and len(wiring) == 4
    contrast = chain.config_of("teacher", wiring[-1], last=chain.phases["teacher"][-1])
    assert contrast["loss"]["word_contrast"]["weight"] == 0.3 and contrast["data"]["frames"] == 3
    assert chain.phases["vae"][-2] == ["steps=0", "export.frame_scale=true"] and chain.phase_name("vae", 4) == "vae"
    # The last VAE phase fine-tunes the decoder alone, behind warmed-up caches, from the frame-scaled export.
    decoder = chain.config_of("vae", last=chain.phases["vae"][-1])
    assert decoder["model"]["train"] == "decoder" and decoder["data"]["warmup"] == 12 and decoder["data"]["crop"] == 6
    teacher = chain.config_of("teacher", chain._data_overrides())
    assert teacher["model"]["source"] == "toy-s4" and teacher["shift"] == 1.0
    assert teacher["data"]["path"] == str(tmp_path / "dataset")
    ode = chain.config_of("ode-init", ["model.source=some/teacher.safetensors"])
    assert ode["model"]["source"] == "some/teacher.safetensors"  # the chain's wiring beats the defaults
    assert ode["ode"]["steps"] == 48 and ode["ode"]["shift"] == 3.0 and ode["shift"] == 1.0
    assert ode["ode"]["guidance"] == 3.0  # the DMD real score's guidance
    assert chain.config_of("vae")["model"]["source"] == "toy-s4"
    mine = ToyChain(tmp_path, overrides=["teacher.model.source=toy", "teacher.shift=5.0", "teacher.phases=[[steps=7]]"])
    teacher = mine.config_of("teacher", last=mine.phases["teacher"][0])
    assert teacher["model"]["source"] == "toy" and teacher["shift"] == 5.0 and teacher["steps"] == 7


def test_decoder_gain_is_zero_without_noise_and_grows_with_it():
    from tether.train.recipes.vae import decoder_gain_by_frame

    torch.set_num_threads(1)
    codec = LatentCodec(load_vae("tiny"))
    assert decoder_gain_by_frame(codec, 1, num_frames=9, size=16, noise=0.0) == [0.0, 0.0, 0.0]
    small, large = (decoder_gain_by_frame(codec, 1, num_frames=9, size=16, noise=n) for n in (0.05, 0.5))
    assert all(0 < a < b for a, b in zip(small, large))


def test_export_writes_a_bundle_that_names_its_vae_model_and_teacher_grid(tmp_path):
    """The chain's export: fp16 student and teacher, the VAE's stride and the transformer's size in the
    description, and the teacher's Euler grid that ode-init distilled (how to sample the teacher)."""
    from tether.checkpoints import load_transformer, save_transformer
    from tether.pipeline import load_pipeline
    from tether.train.toy import ToyChain

    chain = ToyChain(tmp_path, progress=False)
    for recipe in ("teacher", "self-forcing"):
        chain.transformer_of(recipe).parent.mkdir(parents=True)
        save_transformer(load_transformer("tiny"), chain.transformer_of(recipe))
    (tmp_path / "self-forcing" / "config.json").write_text(json.dumps({"shift": 1.0}))
    (tmp_path / "ode-init").mkdir()
    (tmp_path / "ode-init" / "config.json").write_text(json.dumps({"shift": 1.0, "ode": {"steps": 48, "shift": 3.0}}))
    load_vae("tiny").save_pretrained(chain.vae_folder)
    save_toy_text_encoder(make_toy_text_encoder(vocabulary(), dim=32, layers=1, heads=2, text_len=8, seed=0),
                          chain.text_folder)
    chain.dataset_folder.mkdir()
    (chain.dataset_folder / "prompts.json").write_text(json.dumps({"num_clips": 3}))
    chain.stage_export()
    meta = json.loads((chain.bundle_folder / "pipeline.json").read_text())
    assert meta["shift"] == 1.0 and meta["teacher_sampling"] == {"steps": 48, "shift": 3.0}
    tiny = load_transformer("tiny").config
    assert f"stride-8 toy VAE; {tiny.num_layers}-layer dim-{tiny.dim}" in meta["description"]
    pipe = load_pipeline(str(chain.bundle_folder))
    assert pipe.teacher_sampling == {"steps": 48, "shift": 3.0} and pipe.shift == 1.0


def test_vae_variant_trains_from_a_built_in_with_changed_arguments(tmp_path):
    """model.config changes the built-in's architecture; the strides follow from its layers."""
    overrides = TINY_VAE + ["model.config.z_dim=8", "model.config.temperal_downsample=[false,false,true]", "data.frames=3"]
    trainer = Trainer(load_config("vae", overrides=overrides), tmp_path / "run", progress=False)
    trainer.run()
    trainer.recipe.export(tmp_path / "vae")
    codec = LatentCodec(load_vae(tmp_path / "vae"))
    assert (codec.temporal_stride, codec.spatial_stride) == (2, 8)
    frames, _ = sample_clip(5, 0, num_frames=5, size=16)
    from tether.train.toy_data import clips_to_video

    assert codec.encode(clips_to_video([frames])).shape == (1, 8, 3, 2, 2)


def test_vae_variant_of_a_built_in_matches_the_built_in_where_unchanged():
    from tether.vae import builtin_vae

    plain, same = load_vae("toy-s4"), builtin_vae("toy-s4", {})
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))
    wide = builtin_vae("toy-s4", {"z_dim": 32})
    assert wide.config.z_dim == 32 and len(wide.config.latents_std) == 32 and wide.config.scale_factor_spatial == 4


def test_vae_variant_needs_a_built_in_source_and_buildable_arguments(tmp_path):
    from tether.errors import TetherError
    from tether.vae import builtin_vae

    folder = tmp_path / "vae"
    folder.mkdir()
    with pytest.raises(TetherError, match="model.source must name one"):
        Trainer(load_config("vae", overrides=TINY_VAE + [f"model.source={folder}", "model.config.z_dim=8"]),
                tmp_path / "run", progress=False).run()
    with pytest.raises(TetherError, match="does not build"):
        builtin_vae("tiny", {"no_such_argument": 1})


def test_vae_warm_up_encodes_and_decodes_as_diffusers_does_the_whole_clip():
    from tether.train.recipes.vae import decode_without_clamp, encode_posterior, warm_up_frames

    vae = load_vae("tiny").float()
    frames, _ = sample_clip(0, 3, 13, 16)  # 4 latent frames
    from tether.train.toy_data import clips_to_video

    video = clips_to_video([frames])
    with torch.no_grad():
        whole = vae.encode(video).latent_dist.mean  # diffusers, the oracle
        decoded = vae.decode(whole).sample
        for warm in (0, 1, 2):
            warm_means, posterior = encode_posterior(vae, video, warm)
            assert torch.allclose(posterior.mean, whole[:, :, warm:], atol=1e-5)
            assert (warm_means is None) == (warm == 0)
            if warm:
                assert torch.allclose(warm_means, whole[:, :, :warm], atol=1e-5)
            tail = decode_without_clamp(vae, whole, warm=warm).clamp(-1, 1)
            assert torch.allclose(tail, decoded[:, :, warm_up_frames(warm):], atol=1e-5)


def test_vae_warm_up_trains_only_the_frames_after_it(tmp_path):
    from tether.train.recipes.vae import warm_up_frames

    trainer = Trainer(load_config("vae", overrides=TINY_VAE + ["data.warmup=2"]), tmp_path / "run", progress=False)
    recipe = trainer.recipe
    recipe.setup()
    for warm in (0, 1, 2):
        video = recipe.batch(torch.Generator().manual_seed(warm), 1, warm)
        # data.frames=2: a first frame and one chunk cold, two chunks after a warm-up
        assert video.shape[2] == warm_up_frames(warm) + (5 if warm == 0 else 8)
        terms, recon = recipe.losses(video, torch.zeros(recipe.latent_shape(video, warm)), warm=warm)
        assert recon.shape == video[:, :, warm_up_frames(warm):].shape
        recipe.vae.zero_grad()
        terms["loss"].backward()
        assert recipe.vae.decoder.conv_out.weight.grad is not None
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.run().values())
    report = trainer.recipe.export(tmp_path / "vae")
    assert report["late_frames"] == "81-160 of 161" and report["psnr_db_late_frames"] > 0


def test_student_bundles_name_the_base_their_adapters_were_made_over(tmp_path):
    from tether.checkpoints import BASE_FINGERPRINT_KEY, weights_fingerprint
    from tether.train.toy import STUDENTS, ToyChain

    chain = ToyChain(tmp_path, progress=False)
    chain.bundle_folder.mkdir()
    (chain.bundle_folder / "transformer.safetensors").write_bytes(b"the default student")
    (chain.bundle_folder / "pipeline.json").write_text(json.dumps({"height": 64, "width": 64, "fps": 16}))
    for recipe in STUDENTS.values():
        adapter = chain.transformer_of(recipe).parent / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"factors")
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4.0}))
    chain.stage_export_students()
    for name in STUDENTS:
        config = json.loads((chain.student_bundle_folder(name) / "adapter" / "adapter_config.json").read_text())
        assert config == {"r": 4, "lora_alpha": 4.0,
                          BASE_FINGERPRINT_KEY: weights_fingerprint(chain.bundle_folder / "transformer.safetensors")}
