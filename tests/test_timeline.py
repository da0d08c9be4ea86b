import json

import pytest

from tether.errors import TetherError
from tether.timeline import parse_timeline, resolve_timeline, seconds_to_chunks


def test_seconds_convert_to_chunks_at_16_fps_12_frames():
    assert seconds_to_chunks(10) == 13  # 160 frames / 12 = 13.3
    assert seconds_to_chunks(5) == 7
    assert seconds_to_chunks(0.1) == 1


def test_inline_timeline_with_cut():
    tl = parse_timeline("a red fox runs[10s] | the fox stops[5s#]")
    assert [(s.prompt, s.chunks, s.cut) for s in tl.segments] == [("a red fox runs", 13, False), ("the fox stops", 7, True)]
    assert tl.num_chunks == 20
    assert tl.starts() == [0, 13]
    assert tl.segment_at(12)[0] == 0 and tl.segment_at(13)[0] == 1


def test_open_segment_takes_the_rest():
    tl = parse_timeline("a[3c] | b", total_seconds=6)
    assert [s.chunks for s in tl.segments] == [3, 5]


def test_plain_prompt():
    tl = resolve_timeline(prompt="a circle", seconds=3)
    assert tl.num_chunks == 4 and tl.segments[0].prompt == "a circle"


@pytest.mark.parametrize("spec", ["a[10s", "a[zz] | b", "[5s]", "a[-3s]", "a[0s]", "a[1.5c]", "", "a | b"])
def test_bad_timelines_are_user_errors(spec):
    with pytest.raises(TetherError):
        parse_timeline(spec)


def test_zero_or_negative_seconds_rejected():
    for s in (0, -1):
        with pytest.raises(TetherError):
            resolve_timeline(prompt="x", seconds=s)


def test_file_timelines(tmp_path):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("segments:\n  - {prompt: a fox runs, seconds: 10}\n  - {prompt: it stops, seconds: 5, cut: true}\n")
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps({"segments": [{"prompt": "a fox runs", "seconds": 10}, {"prompt": "it stops", "chunks": 7, "cut": True}]}))
    inline = parse_timeline("a fox runs[10s] | it stops[5s#]")
    assert resolve_timeline(timeline=str(yaml_file)) == inline
    assert resolve_timeline(timeline=str(json_file)) == inline
    with pytest.raises(TetherError):
        resolve_timeline(timeline=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments: [ {seconds: 3} ]")
    with pytest.raises(TetherError):
        resolve_timeline(timeline=str(bad))
