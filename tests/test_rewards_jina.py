"""clip_score (jina-clip-v2): manifest of the released checkpoint and the loading path's errors."""
import math

import pytest
import torch

from miro_scale.rewards import jina_clip as jc
from miro_scale.rewards.loading import CheckpointError
from miro_scale.rewards.registry import build_reward


def test_manifest_sizes_match_the_published_model():
    m = jc.manifest()
    assert m["vision_model.pos_embed"] == (1, (512 // 14) ** 2 + 1, 1024)
    assert m["vision_model.blocks.23.mlp.w1.weight"] == (2730, 1024)
    assert m["vision_model.blocks.0.attn.q_proj.weight"] == (1024, 1024)
    assert "vision_model.blocks.0.attn.k_bias" not in m  # EVA: q and v biases only
    r = "text_model.transformer.roberta."
    assert m[r + "embeddings.word_embeddings.parametrizations.weight.original"] == (250002, 1024)
    assert m[r + "encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_A"] == (5, 4, 1024)
    assert m[r + "encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_B"] == (5, 3072, 4)
    vis = sum(math.prod(s) for k, s in m.items() if k.startswith("vision_model."))
    txt = sum(math.prod(s) for k, s in m.items() if k.startswith("text_model.") and "lora" not in k)
    assert 0.29e9 < vis < 0.32e9 and 0.55e9 < txt < 0.57e9  # ~304M EVA02-L + ~561M XLM-R (model card 865M)


def test_check_checkpoint_names_differences():
    cfg = jc.JinaClipV2Config(layers=1, text_layers=1, vocab_size=10, width=64, hidden_size=64,
                              intermediate_size=128, image_size=28)
    sd = {k: torch.zeros(s) for k, s in jc.manifest(cfg).items()}
    jc.check_checkpoint(sd, cfg=cfg)
    sd.pop("vision_model.blocks.0.attn.q_bias")
    sd["text_model.proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError) as e:
        jc.check_checkpoint(sd, "jina.safetensors", cfg=cfg)
    assert "vision_model.blocks.0.attn.q_bias" in str(e.value) and "text_model.proj.weight" in str(e.value)
    # a different number of LoRA tasks is a shape mismatch, named
    other = {k: torch.zeros(s) for k, s in jc.manifest(jc.JinaClipV2Config(**{**cfg.__dict__, "lora_tasks": 1})).items()}
    with pytest.raises(CheckpointError, match="lora_A: checkpoint"):
        jc.check_checkpoint(other, cfg=cfg)


def test_clip_score_builders_fail_with_an_explanation(tmp_path):
    with pytest.raises(NotImplementedError, match="manifest"):
        build_reward("clip_score", "tiny")
    with pytest.raises(RuntimeError, match="trust_remote_code"):
        build_reward("clip_score", weights=str(tmp_path))
