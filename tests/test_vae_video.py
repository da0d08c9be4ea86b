"""Tests for tether.vae (loading, latents, streaming decode) and tether.video (mp4 I/O)."""

import io
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from tether.errors import TetherError
from tether.vae import (
    LatentCodec,
    StreamingDecoder,
    StreamingEncoder,
    frames_to_video_tensor,
    load_vae,
    video_tensor_to_frames,
)
from tether.video import VideoWriter, check_writable, probe_video, read_video


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_codec():
    return LatentCodec(load_vae("tiny"))


def random_latents(num_frames, batch=1, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, num_frames, size, size, generator=generator)


def decode_in_chunks(codec, latents, chunk_sizes):
    decoder = StreamingDecoder(codec)
    pieces, start = [], 0
    for size in chunk_sizes:
        pieces.append(decoder.decode_chunk(latents[:, :, start : start + size]))
        start += size
    return pieces


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunk_sizes", [[3, 3, 3, 3], [1, 2, 3, 3]])
def test_streaming_decode_equals_one_shot(tiny_codec, chunk_sizes):
    latents = random_latents(sum(chunk_sizes), batch=2)
    one_shot = tiny_codec.decode(latents)
    pieces = decode_in_chunks(tiny_codec, latents, chunk_sizes)

    expected_lengths = [1 + 4 * (chunk_sizes[0] - 1)] + [4 * size for size in chunk_sizes[1:]]
    assert [piece.shape[2] for piece in pieces] == expected_lengths
    assert (torch.cat(pieces, dim=2) - one_shot).abs().max().item() <= 1e-5


def test_streaming_decoder_reset_starts_a_new_video(tiny_codec):
    latents = random_latents(6)
    decoder = StreamingDecoder(tiny_codec)
    decoder.decode_chunk(random_latents(3, seed=1))
    decoder.reset()
    streamed = torch.cat([decoder.decode_chunk(latents[:, :, :3]), decoder.decode_chunk(latents[:, :, 3:])], dim=2)
    assert (streamed - tiny_codec.decode(latents)).abs().max().item() <= 1e-5


def test_streaming_decoder_state_resumes_after_save_and_load(tiny_codec):
    latents = random_latents(9)
    first = StreamingDecoder(tiny_codec)
    first.decode_chunk(latents[:, :, :3])
    first.decode_chunk(latents[:, :, 3:6])
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)

    resumed = StreamingDecoder(tiny_codec)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    expected = first.decode_chunk(latents[:, :, 6:])
    assert torch.equal(resumed.decode_chunk(latents[:, :, 6:]), expected)


def test_streaming_encode_equals_one_shot(tiny_codec):
    video = torch.rand(1, 3, 1 + 4 * 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoder = StreamingEncoder(tiny_codec)
    # Pixel frames arrive as 1 + 4k, then 4k per chunk.
    pieces = [encoder.encode_chunk(video[:, :, :9]), encoder.encode_chunk(video[:, :, 9:13]), encoder.encode_chunk(video[:, :, 13:])]
    assert [piece.shape[2] for piece in pieces] == [3, 1, 2]
    assert (torch.cat(pieces, dim=2) - tiny_codec.encode(video)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="4k frames"):
        encoder.encode_chunk(video[:, :, :5])


def test_frame_scale_streams_as_one_shot_and_survives_save_and_load(tmp_path):
    """A per-frame-index scale must apply to a chunk's frames by their index in the whole video."""
    vae = load_vae("tiny")
    vae.register_to_config(latents_frame_scale=[0.3, 0.6, 1.2])
    vae.save_pretrained(tmp_path / "vae")
    codec = LatentCodec(load_vae(tmp_path / "vae"))
    assert codec.frame_scale.tolist() == pytest.approx([0.3, 0.6, 1.2])
    latents = random_latents(7)
    one_shot = codec.decode(latents)
    assert (torch.cat(decode_in_chunks(codec, latents, [1, 2, 4]), dim=2) - one_shot).abs().max().item() <= 1e-5
    # The scale is the only difference from the plain codec: frame k is decoded as if scaled by scale[min(k, 2)].
    scaled = latents * torch.tensor([0.3, 0.6] + [1.2] * 5).view(1, 1, -1, 1, 1)
    assert (LatentCodec(load_vae("tiny")).decode(scaled) - one_shot).abs().max().item() <= 1e-5
    video = torch.rand(1, 3, 1 + 4 * 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoder = StreamingEncoder(codec)
    pieces = [encoder.encode_chunk(video[:, :, :5]), encoder.encode_chunk(video[:, :, 5:])]
    assert (torch.cat(pieces, dim=2) - codec.encode(video)).abs().max().item() <= 1e-5
    assert (codec.denormalize(codec.normalize(scaled, first_frame=2), first_frame=2) - scaled).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- codec


def test_encode_decode_shapes_and_frame_counts(tiny_codec):
    video = torch.rand(2, 3, 13, 32, 24) * 2 - 1
    latents = tiny_codec.encode(video)
    assert latents.shape == (2, 16, 4, 4, 3)
    decoded = tiny_codec.decode(latents)
    assert decoded.shape == (2, 3, 13, 32, 24)
    assert decoded.abs().max() <= 1.0
    # 21 latent frames are Wan2.1's 81 frames; a first 3-frame chunk is 9 frames.
    assert tiny_codec.num_frames(21) == 81 and tiny_codec.num_latent_frames(81) == 21
    assert tiny_codec.num_frames(3) == 9
    with pytest.raises(ValueError):
        tiny_codec.encode(torch.zeros(1, 3, 12, 64, 64))


def test_latents_are_normalised_with_config_statistics():
    vae = AutoencoderKLWan(base_dim=4, latents_mean=[0.5] * 16, latents_std=[2.0] * 16).eval()
    codec = LatentCodec(vae)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        raw_mean = vae.encode(video).latent_dist.mean
    latents = codec.encode(video)
    torch.testing.assert_close(latents, (raw_mean - 0.5) / 2.0)
    with torch.no_grad():
        expected_video = vae.decode(latents * 2.0 + 0.5).sample
    torch.testing.assert_close(codec.decode(latents), expected_video)


def test_frame_conversion_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 16, 3), dtype=np.uint8)
    video = frames_to_video_tensor(frames)
    assert video.shape == (1, 3, 5, 8, 16) and video.min() >= -1 and video.max() <= 1
    np.testing.assert_array_equal(video_tensor_to_frames(video), frames)


# ----------------------------------------------------------------------------- loading


def original_wan_key(diffusers_key):
    """Undo convert_wan_vae_to_diffusers' renames for one key (verified against it below)."""
    key = re.sub(r"^quant_conv\.", "conv1.", diffusers_key)
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    key = key.replace("mid_block.attentions.0.", "middle.1.")
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m[1])}.", key)
    key = key.replace("encoder.down_blocks.", "encoder.downsamples.")
    # The decoder's 4 up blocks are flattened: 3 residual blocks then an upsampler each.
    key = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", key)
    for diffusers_name, original_name in [("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                                          ("conv2", "residual.6"), ("conv_shortcut", "shortcut")]:
        if key.count(".") > 2:  # only inside blocks, never the top-level conv1/conv2
            key = key.replace(f".{diffusers_name}.", f".{original_name}.")
    return key


def to_original_wan_layout(diffusers_state_dict):
    original = {original_wan_key(key): tensor for key, tensor in diffusers_state_dict.items()}
    # The inverse is only trusted because diffusers' own converter maps it back exactly.
    assert convert_wan_vae_to_diffusers(original).keys() == diffusers_state_dict.keys()
    for original_key, tensor in original.items():
        ((round_trip_key, _),) = convert_wan_vae_to_diffusers({original_key: tensor}).items()
        assert torch.equal(diffusers_state_dict[round_trip_key], tensor)
    return original


def assert_same_model(loaded, reference):
    reference_weights = reference.state_dict()
    assert loaded.state_dict().keys() == reference_weights.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference_weights[key]), key
    latents = random_latents(3)
    torch.testing.assert_close(LatentCodec(loaded).decode(latents), LatentCodec(reference).decode(latents), rtol=0, atol=0)


def test_load_original_wan_layout_checkpoint(tmp_path):
    reference = load_vae("tiny")
    original = to_original_wan_layout(reference.state_dict())
    assert "decoder.upsamples.4.shortcut.weight" in original and "encoder.middle.1.to_qkv.weight" in original
    checkpoint = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, checkpoint)
    assert_same_model(load_vae(checkpoint, config="tiny"), reference)


def test_original_checkpoint_defaults_to_wan21_architecture(tmp_path):
    checkpoint = tmp_path / "Wan2.1_VAE.pth"
    torch.save(to_original_wan_layout(load_vae("tiny").state_dict()), checkpoint)
    # Built as the real Wan2.1 VAE (base_dim 96), the tiny weights cannot fit.
    with pytest.raises(TetherError, match=r"shape mismatches .*encoder\.conv1\.weight \(checkpoint \(4, 3, 3, 3, 3\), model \(96, 3, 3, 3, 3\)\)"):
        load_vae(checkpoint)


@pytest.mark.parametrize("pipeline_layout", [False, True])
def test_load_diffusers_folder(tmp_path, pipeline_layout):
    reference = load_vae("toy")
    folder = tmp_path / "pipeline" / "vae" if pipeline_layout else tmp_path / "vae"
    reference.save_pretrained(folder)
    loaded = load_vae(folder.parent if pipeline_layout else folder)
    assert loaded.config.base_dim == 16 and list(loaded.config.latents_std) == [1.0] * 16
    assert_same_model(loaded, reference)


def broken_state_dict(state_dict, removed, reshaped):
    broken = dict(state_dict)
    del broken[removed]
    broken["decoder.extra_layer.weight"] = torch.zeros(3)
    broken[reshaped] = torch.zeros(5, 5)
    return broken


def test_wrong_original_checkpoint_names_every_problem(tmp_path):
    original = to_original_wan_layout(load_vae("tiny").state_dict())
    checkpoint = tmp_path / "broken.pth"
    torch.save(broken_state_dict(original, "decoder.head.2.bias", "encoder.middle.1.proj.weight"), checkpoint)
    with pytest.raises(TetherError) as raised:
        load_vae(checkpoint, config="tiny")
    message = str(raised.value)
    assert "\n" not in message
    # The missing key is named as the model calls it; the others as the file does.
    assert "missing keys (1): decoder.conv_out.bias" in message
    assert "unexpected keys (1): decoder.extra_layer.weight" in message
    assert "shape mismatches (1): encoder.middle.1.proj.weight (checkpoint (5, 5), model (16, 16, 1, 1))" in message


def test_wrong_diffusers_folder_names_every_problem(tmp_path):
    from safetensors.torch import save_file

    vae = load_vae("tiny")
    vae.save_pretrained(tmp_path)
    broken = broken_state_dict(vae.state_dict(), "decoder.conv_in.weight", "quant_conv.bias")
    for key in [key for key in broken if key.startswith("encoder.")][:6]:  # more than a message lists
        del broken[key]
    save_file({key: tensor.contiguous() for key, tensor in broken.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(TetherError) as raised:
        load_vae(tmp_path)
    message = str(raised.value)
    assert re.search(r"missing keys \(7\): encoder\.conv_in\.weight, [^;]*, \.\.\. \(\+3 more\);", message), message
    assert "unexpected keys (1): decoder.extra_layer.weight" in message
    assert "quant_conv.bias (checkpoint (5, 5), model (32,))" in message


def test_missing_vae_source_raises(tmp_path):
    with pytest.raises(TetherError, match="VAE not found"):
        load_vae(tmp_path / "nowhere" / "Wan2.1_VAE.pth")
    with pytest.raises(TetherError, match="no config.json"):
        load_vae(tmp_path)


# ----------------------------------------------------------------------------- video files


def smooth_frames(num_frames, height=64, width=64):
    rows, columns = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(columns * 2 + 3 * t) % 256, rows * 255 // height, np.full_like(rows, 60 + 4 * t)], axis=-1)
        for t in range(num_frames)
    ]
    return np.stack(frames).astype(np.uint8)


def test_video_writer_round_trip(tmp_path):
    frames = smooth_frames(30)
    path = tmp_path / "video.mp4"
    with VideoWriter(path, fps=16) as writer:
        for start in range(0, 30, 12):  # chunk-sized writes
            writer.write(frames[start : start + 12])
    assert probe_video(path) == (30, 16.0, 64, 64)
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.float64) - frames).mean() < 3


@pytest.mark.parametrize("height, width", [(480, 832), (33, 47)])
def test_video_writer_sizes(tmp_path, height, width):
    frames = smooth_frames(3, height, width)
    path = tmp_path / "video.mp4"
    with VideoWriter(path) as writer:
        writer.write(frames)
    # Odd sizes are padded to even by repeating the edge.
    even_height, even_width = height + height % 2, width + width % 2
    assert probe_video(path) == (3, 16.0, even_width, even_height)
    decoded = read_video(path)[:, :height, :width]
    assert np.abs(decoded.astype(np.float64) - frames).mean() < 3


def test_write_cut_short_by_a_kill_keeps_earlier_chunks(tmp_path, monkeypatch):
    path = tmp_path / "video.mp4"
    writer = VideoWriter(path)
    writer.write(smooth_frames(9))
    writer.write(smooth_frames(12))
    size_before = path.stat().st_size
    # Simulate a kill after the third chunk's bytes went out but before they were committed.
    monkeypatch.setattr(writer, "_commit", lambda start, header: None)
    writer.write(smooth_frames(12))
    writer.close()
    data = path.read_bytes()
    for cut in (size_before + 5, size_before + 100, (size_before + len(data)) // 2, len(data)):
        cut_path = tmp_path / f"cut{cut}.mp4"
        cut_path.write_bytes(data[:cut])
        assert len(read_video(cut_path)) == 21


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from tether.video import VideoWriter
    writer = VideoWriter(sys.argv[1], fps=16)
    rows, columns = np.mgrid[0:64, 0:64]
    for chunk in range(1000):
        frames = np.stack([np.stack([columns * 2 + t, rows * 3, np.full_like(rows, chunk % 200)], -1)
                           for t in range(12)]).astype(np.uint8)
        writer.write(frames)
        writer.flush()
        print(writer.frames_written, flush=True)
        time.sleep(0.05)
    """
)


def test_video_survives_sigkill(tmp_path):
    path = tmp_path / "killed.mp4"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        completed_frames = 0
        deadline = time.monotonic() + 60
        while completed_frames < 36 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            completed_frames = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert completed_frames >= 36, "the writer subprocess did not get going"
    assert writer.returncode == -signal.SIGKILL
    decoded = read_video(path)
    assert len(decoded) >= completed_frames
    assert decoded.shape[1:] == (64, 64, 3)


def test_check_writable_rejects_missing_folder(tmp_path):
    with pytest.raises(TetherError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.mp4")
    with pytest.raises(TetherError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4")
    with pytest.raises(TetherError, match="is a folder"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "out.mp4") == tmp_path / "out.mp4"
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind
