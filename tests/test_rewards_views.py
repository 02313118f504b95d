"""Preprocessing views: each distinct view is computed once per image for all rewards that share it,
views share their common steps, and the values are those of the per-pixel formula."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from miro_scale.data._testing import simple_dataset
from miro_scale.rewards import base
from miro_scale.rewards.base import VIEWS, Reward, View, compute_views, prepare_views
from miro_scale.rewards.scoring import ScoreConfig, ShardScorer


def _image(seed=0, size=(70, 50)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _per_pixel(view: View, pixels: np.ndarray) -> torch.Tensor:
    """How a view normalised before the lookup table: float32 arithmetic on every pixel."""
    a = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    a = (a - np.asarray(view.mean, np.float32)) / np.asarray(view.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


@pytest.mark.parametrize("view", list(VIEWS.values()) + [View("vqa", "pad_mean", 336, jpeg_quality=75)],
                         ids=lambda v: v.name)
def test_views_are_bit_identical_to_the_per_pixel_formula(view):
    img = _image()
    got = view.one(img)
    src = img if view.jpeg_quality is None else base._jpeg(img, view.jpeg_quality)
    pixels = view._pixels(src)
    if view.mode == "pixels":
        assert np.array_equal(got, pixels)
    else:
        assert torch.equal(got, _per_pixel(view, pixels))


def test_shared_steps_run_once(monkeypatch):
    calls = {"pixels": 0, "jpeg": 0}
    pixels, jpeg = View._pixels, base._jpeg

    def count_pixels(self, img):
        calls["pixels"] += 1
        return pixels(self, img)

    def count_jpeg(img, q):
        calls["jpeg"] += 1
        return jpeg(img, q)

    monkeypatch.setattr(View, "_pixels", count_pixels)
    monkeypatch.setattr(base, "_jpeg", count_jpeg)
    a = View("a", "center_crop", 32)
    same_as_a = View("renamed", "center_crop", 32)  # the same preprocessing under another name
    other_norm = View("b", "center_crop", 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    q1, q2 = View("q1", "pad_mean", 24, jpeg_quality=75), View("q2", "center_crop", 24, jpeg_quality=75)
    out = compute_views(_image(), [a, same_as_a, other_norm, q1, q2])
    assert len(out) == 4 and calls == {"pixels": 3, "jpeg": 1}  # a's pixels serve other_norm too
    assert torch.equal(out[other_norm.spec], _per_pixel(other_norm, pixels(a, _image())))
    batch = prepare_views([_image(1), _image(2)], [a, same_as_a])
    assert list(batch) == [a.spec] and batch[a.spec].shape == (2, 3, 32, 32)


class _MeanReward(Reward):
    needs_text = False

    def __init__(self, key, view, scale):
        self.key, self.view, self.scale = key, view, scale

    @torch.no_grad()
    def score(self, images, captions=None):
        return images.mean(dim=(1, 2, 3)) * self.scale


def test_the_scorer_prepares_a_view_once_per_image_for_all_rewards_using_it(tmp_path, monkeypatch):
    shard = simple_dataset(str(tmp_path / "data"), 6, 6)[0]
    view = View("v", "center_crop", 16)
    rewards = [_MeanReward("clip_score", view, 1.0),
               _MeanReward("aesthetic_score", View("v_again", "center_crop", 16), 2.0),
               _MeanReward("sharpness_score", View("w", "letterbox", 16), 1.0)]
    calls = []
    pixels = View._pixels
    monkeypatch.setattr(View, "_pixels", lambda self, img: calls.append(self.spec) or pixels(self, img))
    cfg = ScoreConfig(shards=[shard], rewards=[r.key for r in rewards], out_dir=str(tmp_path / "out"),
                      num_workers=0, progress=False)
    rows, counts, _ = ShardScorer(rewards, cfg, torch.device("cpu"), {}).score_shard(shard)
    assert counts["ok"] == 6
    assert calls.count(view.spec) == 6 and calls.count(rewards[2].view.spec) == 6  # once per image
    # the scores are what each reward gives on its own preprocessing of the same decoded images
    from miro_scale.data.decode import decode_image
    from miro_scale.data.tario import iter_samples
    images = [decode_image(m["jpg"], k) for k, m in iter_samples(shard)]
    for r in rewards:
        want = r.score(torch.stack([r.view.one(im) for im in images])).numpy()
        np.testing.assert_array_equal(np.asarray(rows[r.key], np.float32), want)
    np.testing.assert_allclose(rows["aesthetic_score"], 2 * np.asarray(rows["clip_score"]), rtol=1e-6)


def test_jpeg_view_reencodes_like_pil():
    img = _image(3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    assert np.array_equal(np.asarray(base._jpeg(img, 75)), np.asarray(Image.open(buf).convert("RGB")))
