"""Video sizes, frame conversion and files: the 4k + 1 rule, the 16-pixel rule, uint8 frames, mp4/GIF round trips."""
import numpy as np
import pytest
import torch

from hvlab.video import (check_video_size, latent_frames, latent_shape, nearest_valid, save_video, to_uint8_frames,
                         video_frames)


def test_frame_counts_round_trip():
    assert latent_frames(129) == 33 and latent_frames(1) == 1
    for k in range(40):  # video_frames inverts latent_frames on every valid length
        assert latent_frames(video_frames(k + 1)) == k + 1
        assert video_frames(latent_frames(4 * k + 1)) == 4 * k + 1


@pytest.mark.parametrize("n, nearest", [(130, "129 or 133"), (128, "125 or 129"), (3, "1 or 5"), (0, "1")])
def test_bad_frame_count_names_nearest(n, nearest):
    with pytest.raises(ValueError, match=f"video_length must be 4k\\+1; got {n}, nearest valid: {nearest} \\("):
        latent_frames(n)


def test_sizes():
    assert check_video_size(720, 1280) == (720, 1280)
    assert latent_shape(720, 1280, 129) == (16, 33, 90, 160)  # the release's 720p latent
    assert latent_shape(544, 960, 129) == (16, 33, 68, 120)
    with pytest.raises(ValueError, match="height must be a multiple of 16.*got 721, nearest valid: 720 or 736"):
        check_video_size(721, 1280)
    with pytest.raises(ValueError, match="width .* got 8, nearest valid: 16$"):
        latent_shape(64, 8, 17)
    assert nearest_valid(100, 32) == "96 or 128"


def test_to_uint8_frames():
    x = torch.rand(2, 3, 5, 4, 6, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some values off [-1, 1]
    out = to_uint8_frames(x)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 4, 6, 3)
    ref = np.clip(x.numpy() / 2 + 0.5, 0, 1) * 255  # independent: numpy, channels moved last
    ref = np.rint(ref).astype(np.uint8).transpose(0, 2, 3, 4, 1)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1  # float32 vs float64 rounding at .5 only
    ends = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2, 1).expand(1, 3, 1, 2, 1)
    assert to_uint8_frames(ends)[0, 0, :, 0, 0].tolist() == [0, 255]


def _frames(n=9, h=32, w=48):
    """Smooth moving gradients: survive H.264 with small error."""
    t, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    rgb = np.stack([x * 255 / w, y * 255 / h, (t * 255 / n + 0 * x)], axis=-1)
    return rgb.astype(np.uint8)


def test_save_video_mp4_reads_back(tmp_path):
    import imageio.v3 as iio

    frames = _frames()
    path = save_video(frames, tmp_path / "clip.mp4", fps=24)
    back = iio.imread(path, plugin="FFMPEG")  # (F, H, W, 3)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy codec, smooth content


def test_save_video_gif_reads_back(tmp_path):
    import imageio.v3 as iio

    frames = _frames(5, 16, 16)
    path = save_video(torch.from_numpy(frames), tmp_path / "clip.gif", fps=8)
    back = iio.imread(path, index=None)
    assert back.shape[:3] == frames.shape[:3]
    with pytest.raises(ValueError, match=r"uint8 frames \(F, H, W, 3\)"):
        save_video(frames.astype(np.float32), tmp_path / "bad.mp4")
