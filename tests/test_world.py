import time

import numpy as np
import pytest

from tether.errors import TetherError
from tether.world import (
    SCENARIOS, FPS, ObjectSpec, SceneChange, SceneSpec, Segment, describe, episode, format_timeline,
    parse, parse_timeline, random_prompt, random_scene, render_background, render_clip, vocabulary,
)
from tether.world.vocab import BACKGROUNDS, COLOURS, MOTIONS, OBJECT_ATTRIBUTES


def _subject_track(truths, index=0):
    return [t.objects[index] for t in truths]


# ----------------------------------------------------------------------------- determinism and sizes


def test_same_seed_gives_identical_frames_and_truth():
    prompt = "a red striped circle bounces and a small blue dotted star orbits on grass as the camera pans left"
    a_frames, a_truths = render_clip(prompt, 40, seed=7)
    b_frames, b_truths = render_clip(prompt, 40, seed=7)
    c_frames, _ = render_clip(prompt, 40, seed=8)
    assert a_frames.dtype == np.uint8 and a_frames.shape == (40, 64, 64, 3)
    assert np.array_equal(a_frames, b_frames) and a_truths == b_truths
    assert not np.array_equal(a_frames, c_frames)


def test_sampled_look_does_not_depend_on_clip_length():
    short = render_clip("a shape drifts left", 5, seed=3)[1][0].objects[0]
    long = render_clip("a shape drifts left", 300, seed=3)[1][0].objects[0]
    assert short == long


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes_scale_positions(size):
    frames, truths = render_clip("a large green square orbits in the snow", 20, seed=2, size=size)
    _, reference = render_clip("a large green square orbits in the snow", 20, seed=2, size=64)
    assert frames.shape == (20, size, size, 3)
    for t, r in zip(truths, reference):
        assert t.objects[0].x == pytest.approx(r.objects[0].x * size / 64)
        assert t.objects[0].y == pytest.approx(r.objects[0].y * size / 64)


def test_only_draws_selected_frames_identically():
    frames, truths = render_clip("a yellow diamond bounces over the ocean", 60, seed=1)
    some, some_truths = render_clip("a yellow diamond bounces over the ocean", 60, seed=1, only=[3, 40, 59])
    assert np.array_equal(frames[[3, 40, 59]], some) and [truths[i] for i in (3, 40, 59)] == some_truths


def test_chunked_rendering_matches_whole_clip():
    ep = episode("story", seed=4)
    frames, truths = ep.render()
    chunks = list(ep.iter_render(chunk_frames=100))
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), frames)
    assert [t for c in chunks for t in c[1]] == truths


# ----------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "star"])
def test_object_pixels_sit_at_reported_position_with_reported_colour(shape):
    scene = SceneSpec("desert", (ObjectSpec(shape, "purple", "solid", "large", "bounce"),))
    frames, truths = render_clip(scene, 48, seed=5)
    rgb = np.array(COLOURS["purple"])
    checked = 0
    for frame, truth in zip(frames, truths):
        o = truth.objects[0]
        if o.visible_fraction < 1.0:
            continue
        assert tuple(frame[int(o.y), int(o.x)]) == tuple(rgb)
        ys, xs = np.nonzero(np.all(frame == rgb, axis=-1))
        # Centre of the fill; the triangle's fill centroid is its circumcentre too.
        assert abs(xs.mean() + 0.5 - o.x) < 0.75 and abs(ys.mean() + 0.5 - o.y) < 0.75
        checked += 1
    assert checked > 20


def test_hidden_object_is_truly_off_frame_and_visible_one_is_drawn():
    ep = episode("reentry-5s", seed=1)
    frames, truths = ep.render()
    for k in range(0, len(frames), 3):
        t = truths[k]
        background = render_background(t.background, [t.camera_offset], seed=ep.seed)[0]
        same = np.array_equal(frames[k], background)
        assert same == (not t.objects[0].visible), k
        assert (t.objects[0].visible_fraction > 0) == t.objects[0].visible


def test_motion_is_smooth():
    for motion in MOTIONS:
        scene = SceneSpec("grass", (ObjectSpec("circle", "red", "solid", "small", motion),))
        truths = render_clip(scene, 160, seed=11)[1]
        xs = np.array([o.x for o in _subject_track(truths)])
        ys = np.array([o.y for o in _subject_track(truths)])
        visible = np.array([o.visible for o in _subject_track(truths)])
        steps = np.hypot(np.diff(xs), np.diff(ys))[visible[1:] & visible[:-1]]  # a drifter wraps while off-frame
        assert steps.max() <= 2.05, motion
        if motion != "rest":
            assert steps.mean() >= 0.5, motion
        else:
            assert steps.max() == 0


def test_occlusion_lowers_visible_fraction_of_the_lower_object():
    # Two resting objects placed on top of each other by the episode-style override.
    scene = SceneSpec("snow", (ObjectSpec("square", "red", "solid", "small", "rest"),
                               ObjectSpec("circle", "blue", "solid", "large", "rest")))
    truths = render_clip(scene, 2, seed=0, placements={0: (32, 32), 1: (32, 32)})[1]
    lower, upper = truths[0].objects
    assert lower.visible and lower.visible_fraction < 0.05 and upper.visible_fraction == 1.0


# ----------------------------------------------------------------------------- prompts


def test_grammar_round_trip_on_random_scenes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng)
        assert parse(describe(scene)) == scene
        omit = [n for n in OBJECT_ATTRIBUTES + ("background",) if rng.random() < 0.3]
        partial = parse(describe(scene, omit=omit))
        for spec, original in zip(partial.objects, scene.objects):
            for name in OBJECT_ATTRIBUTES:
                assert getattr(spec, name) == (None if name in omit else getattr(original, name))
        assert partial.background == (None if "background" in omit else scene.background)


def test_grammar_examples_and_changes():
    scene = parse("a blue square and a small yellow dotted triangle drift left in the desert")
    assert scene.background == "desert" and [o.motion for o in scene.objects] == ["drift left"] * 2
    assert scene.objects[1] == ObjectSpec("triangle", "yellow", "dotted", "small", "drift left")
    assert scene.objects[0].size is None and scene.objects[0].pattern is None
    assert parse("a circle bounces on grass") == SceneSpec("grass", (ObjectSpec("circle", motion="bounce"),))
    assert parse("an orange shape").objects[0] == ObjectSpec(colour="orange")
    changes = [
        SceneChange(target=ObjectSpec(shape="circle"), colour="green"),
        SceneChange(target=ObjectSpec(shape="circle", colour="red"), pattern="dotted"),
        SceneChange(target=ObjectSpec(shape="star"), size="small"),
        SceneChange(target=ObjectSpec(shape="star"), shape="diamond"),
        SceneChange(target=ObjectSpec(shape="star"), motion="rest"),
        SceneChange(target=ObjectSpec(shape="star"), motion="away"),
        SceneChange(target=ObjectSpec(shape="star"), motion="return"),
        SceneChange(target=ObjectSpec(shape="star"), motion="drift right"),
        SceneChange(camera_pan=-0.5),
        SceneChange(camera_pan=0.0),
    ]
    for change in changes:
        assert parse(describe(change)) == change
    assert describe(changes[0]) == "the circle turns green"


@pytest.mark.parametrize("prompt", ["", "a red fox runs", "the fox stops", "a red blue circle", "a circle bounce",
                                    "a circle and a square and a star", "the circle dances", "hello"])
def test_unparseable_prompts_are_user_errors(prompt):
    with pytest.raises(TetherError):
        parse(prompt)


def test_vocabulary_covers_every_prompt():
    words = set(vocabulary())
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng) for _ in range(300)]
    prompts += [s.prompt for name in SCENARIOS for seed in range(3) for s in episode(name, seed).segments]
    for prompt in prompts:
        assert set(prompt.split()) <= words, prompt


def test_omitted_attributes_are_sampled_and_recorded():
    colours, backgrounds = set(), set()
    for seed in range(12):
        truths = render_clip("a circle bounces", 3, seed=seed)[1]
        o = truths[0].objects[0]
        assert o.shape == "circle" and o.motion == "bounce"
        assert o.stated == {"shape", "motion"} and o.sampled == {"colour", "pattern", "size"}
        colours.add(o.colour)
        backgrounds.add(truths[0].background)
    assert len(colours) >= 3 and len(backgrounds) >= 3
    truths = render_clip("a circle bounces on grass[1s] | the circle turns green[1s]", seed=0)[1]
    before, after = truths[0].objects[0], truths[-1].objects[0]
    assert after.colour == "green" and after.stated == {"shape", "colour"}
    assert "colour" in before.sampled and "colour" not in after.sampled
    assert after.pattern == before.pattern and after.size == before.size


def test_two_sampled_objects_get_different_colours_and_shapes():
    for seed in range(10):
        a, b = render_clip("a shape and a shape", 1, seed=seed)[1][0].objects
        assert a.colour != b.colour and a.shape != b.shape


def test_timeline_errors_are_user_errors():
    bad_timelines = ["a red circle[5s] | the square turns green[2s]", "the circle stops[2s]", "a circle[zz]",
                     "a circle[0s]"]
    for bad in bad_timelines:
        with pytest.raises(TetherError):
            render_clip(bad, seed=0)
    with pytest.raises(TetherError):
        render_clip("a red circle", seed=0)  # a single scene needs num_frames


def test_timeline_string_round_trips():
    text = "a red circle bounces on grass[4s] | the circle turns green[2.5s] | a green circle rests in the snow[3s#]"
    segments = parse_timeline(text)
    assert segments == [
        Segment("a red circle bounces on grass", 4, False),
        Segment("the circle turns green", 2.5, False),
        Segment("a green circle rests in the snow", 3, True),
    ]
    assert format_timeline(segments) == text
    for name in SCENARIOS:
        ep = episode(name, seed=5)
        assert tuple(parse_timeline(ep.timeline_string())) == ep.segments


# ----------------------------------------------------------------------------- episodes


def test_all_scenarios_are_deterministic_and_unknown_ones_fail():
    for name in SCENARIOS:
        assert episode(name, 3) == episode(name, 3)
    assert episode("story", 1).segments != episode("story", 2).segments
    assert episode("long-240s", 0).num_frames == 240 * FPS
    with pytest.raises(TetherError):
        episode("reentry-7s", 0)


@pytest.mark.parametrize("name,seconds,size", [("reentry-5s", 5, 64), ("reentry-10s", 10, 32), ("reentry-20s", 20, 128),
                                               ("reentry-40s", 40, 64)])
def test_reentry_gap_equals_requested_seconds(name, seconds, size):
    ep = episode(name, seed=2)
    truths = ep.render(size)[1]
    track = _subject_track(truths)
    hidden = np.array([not o.visible for o in track])
    gaps = np.flatnonzero(hidden)
    assert len(gaps) == seconds * FPS and gaps[0] == ep.facts["exit_frame"]
    assert np.all(np.diff(gaps) == 1)
    first, back = track[gaps[0] - 1], track[gaps[-1] + 1]
    assert (first.colour, first.pattern, first.size, first.shape) == (back.colour, back.pattern, back.size, back.shape)
    assert back.stated == {"shape", "motion"}  # the return prompt names only the shape
    assert track[-1].visible_fraction == 1.0  # it comes all the way back in


def test_scene_cut_changes_background_and_keeps_subject():
    for seed in range(3):
        ep = episode("scene-cut", seed)
        truths = ep.render()[1]
        cut = ep.facts["cut_frame"]
        assert ep.segments[1].cut and ep.timeline_string().endswith("#]")
        assert truths[cut - 1].background == ep.facts["before"] != truths[cut].background == ep.facts["after"]
        assert truths[cut - 1].objects[0].spec == truths[cut].objects[0].spec


def test_attribute_and_motion_switches_happen_at_the_segment_boundary():
    ep = episode("attribute-switch", 0)
    truths = ep.render()[1]
    k = ep.facts["switch_frame"]
    assert truths[k - 1].objects[0].colour == ep.facts["before"] and truths[k].objects[0].colour == ep.facts["after"]
    assert "turns" in ep.segments[1].prompt
    ep = episode("motion-switch", 0)
    truths = ep.render()[1]
    k = ep.facts["switch_frame"]
    assert truths[k - 1].objects[0].motion == ep.facts["before"] and truths[k].objects[0].motion == ep.facts["after"]
    # Position stays continuous across the switch.
    a, b = truths[k - 1].objects[0], truths[k].objects[0]
    assert np.hypot(a.x - b.x, a.y - b.y) <= 2.05


def test_long_episode_renders_fast_enough():
    start = time.perf_counter()
    frames, truths = episode("long-60s", 0).render()
    assert len(frames) == len(truths) == 60 * FPS
    assert time.perf_counter() - start < 10  # ~1 s unloaded; generous for a shared machine


# ----------------------------------------------------------------------------- probe


def test_probe_smoke(tmp_path):
    torch = pytest.importorskip("torch")
    from tether.world.probe import evaluate_probe, load_probe, train_probe, truth_slots

    torch.set_num_threads(1)
    train_probe(tmp_path, steps=24, seed=0, batch_size=4, width=16, dilations=(1, 2), progress=False)  # structure only
    assert (tmp_path / "probe.safetensors").is_file() and (tmp_path / "probe.json").is_file()
    probe = load_probe(tmp_path)
    frames, truths = render_clip("a red circle and a blue star bounce on grass", 5, seed=0, size=128)
    readings = probe.read(frames)
    assert len(readings) == 5
    for reading in readings:
        assert reading["background"] in BACKGROUNDS and len(reading["objects"]) == 2
        for slot in reading["objects"]:
            assert set(slot) == {"present", "shape", "colour", "pattern", "size", "x", "y", "score"}
    # Slots follow the canonical order: colour in vocabulary order first.
    slots = truth_slots(truths[0])
    assert [o.colour for o in slots] == sorted([o.colour for o in slots], key=list(COLOURS).index)
    result = evaluate_probe(probe, 16, seed=0)
    for key in ("background", "presence", "shape", "colour", "pattern", "size", "position_within_2px"):
        assert key in result
    with pytest.raises(TetherError):
        load_probe(tmp_path / "missing")


def test_shipped_probe_still_reads_the_world():
    # Guards the trained weights against changes to the renderer or vocabulary.
    torch = pytest.importorskip("torch")
    from pathlib import Path

    from tether.world.probe import evaluate_probe, load_probe

    torch.set_num_threads(1)
    folder = Path(__file__).resolve().parents[1] / "tether" / "weights" / "probe"
    result = evaluate_probe(load_probe(folder), 160, seed=5)
    for key in ("background", "presence", "shape", "colour", "pattern", "size", "position_within_2px"):
        assert result[key] >= 0.9, (key, result[key])


def test_gaussian_blur_keeps_flat_frames_and_mean_and_softens_edges():
    pytest.importorskip("torch")
    from tether.world.probe import gaussian_blur

    flat = np.full((2, 16, 16, 3), 77, dtype=np.uint8)
    assert np.array_equal(gaussian_blur(flat, 1.5), flat)
    assert gaussian_blur(flat, 0.0) is flat
    edge = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    edge[:, :, 8:] = 255
    soft = gaussian_blur(edge, 1.0)
    row = soft[0, 4, :, 0].astype(int)
    assert list(row) == sorted(row) and 0 < row[7] < 128 < row[8] < 255  # monotone ramp across the edge
    assert abs(soft.astype(float).mean() - edge.astype(float).mean()) < 1.0  # replicate padding: no mass lost


def test_shipped_probe_under_blur_reports_psnr_and_loses_patterns_first():
    # What `evaluate_probe(..., blur=)` is for: a 2 px blur erases stripes and dots (1-3 px features)
    # long before it erases colour, and its PSNR is reported for comparison with a VAE's.
    torch = pytest.importorskip("torch")
    from pathlib import Path

    from tether.world.probe import evaluate_probe, load_probe

    torch.set_num_threads(1)
    probe = load_probe(Path(__file__).resolve().parents[1] / "tether" / "weights" / "probe")
    sharp = evaluate_probe(probe, 200, seed=5)
    blurred = evaluate_probe(probe, 200, seed=5, blur=2.0)
    assert "blurred_psnr_db" not in sharp and 20 < blurred["blurred_psnr_db"] < 27
    assert blurred["colour"] >= 0.95 and blurred["pattern"] < sharp["pattern"] - 0.2
