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
