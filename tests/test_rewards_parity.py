"""Parity with the upstream packages on fixtures they generated (see tests/fixtures/rewards/make_*.py)."""
from pathlib import Path

import pytest
import torch

from miro_scale.rewards import image_reward as ir
from miro_scale.rewards.loading import strict_load

FIX = Path(__file__).resolve().parent / "fixtures" / "rewards"


def test_image_reward_matches_upstream_image_reward_1_5():
    f = FIX / "image_reward_parity.pt"
    if not f.exists():
        pytest.skip("fixture not generated")
    fx = torch.load(f, map_location="cpu", weights_only=True)
    model = ir.ImageRewardModel(ir.BlipVisionConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2),
                                ir.BlipTextConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=64, encoder_width=32)).eval()
    # the upstream state dict loads with no missing, unexpected (bar BLIP's projections) or mis-shaped key
    strict_load(model, fx["state_dict"], source=str(f), optional=ir.OPTIONAL_KEYS, ignore=ir.IGNORED_KEYS)
    with torch.no_grad():
        emb = model.encode_images(fx["pixels"])
        assert torch.allclose(emb, fx["image_embeds"], atol=1e-5)
        got = model.score_embeds(emb, fx["input_ids"], fx["attention_mask"])
    assert torch.allclose(got, fx["expected"], atol=1e-5), (got, fx["expected"])
    assert (fx["expected"][0] - fx["expected"][1]).abs() > 1e-3  # the two inputs really differ


def test_hpsv2_matches_upstream_hpsv2_1_2():
    f = FIX / "hpsv2_parity.pt"
    if not f.exists():
        pytest.skip("fixture not generated")
    from miro_scale.rewards.base import View
    from miro_scale.rewards.openclip_models import build_open_clip, open_clip_tokenizer
    fx = torch.load(f, map_location="cpu", weights_only=True)
    model = build_open_clip(fx["config"]).eval()
    strict_load(model, {k: v.float() for k, v in fx["state_dict"].items()}, source=str(f), optional=("attn_mask",))
    tok = open_clip_tokenizer(77)(fx["captions"])
    assert torch.equal(tok, fx["input_ids"])  # same ids, truncation to 77 with <end_of_text> last
    with torch.no_grad():
        img = model.encode_image(fx["pixels"], normalize=True)
        txt = model.encode_text(tok, normalize=True)
    assert torch.allclose((img * txt).sum(-1), fx["expected"], atol=1e-5)
    # the official letterbox preprocessing: same geometry and padding; upstream resizes the float
    # tensor, we resize the 8-bit image with PIL, so values differ by resampling only
    from PIL import Image
    ours = View("lb64", "letterbox", 64).one(Image.fromarray(fx["letterbox_input"].numpy()))
    ref = fx["letterbox_expected"]
    assert ours.shape == ref.shape
    pad = (ref == ref[:, :1, :1]).all(0)  # the zero-padded rows (normalised 0 = -mean/std)
    assert torch.equal(pad, (ours == ours[:, :1, :1]).all(0))
    assert (ours - ref).abs()[:, ~pad].mean() < 0.02  # measured 0.0045 (about 0.3/255)
