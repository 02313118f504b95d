"""Reward models on tiny configs of their real architectures: scoring, strict loading, key names."""
import pytest
import torch

from miro_scale.rewards.base import VIEWS, repeat_features
from miro_scale.rewards.loading import CheckpointError, check_state_dict, file_digest
from miro_scale.rewards.registry import ALIASES, available_rewards, build_reward, canonical_key

torch.manual_seed(0)
X = torch.randn(3, 3, 224, 224)
CAPS = ["a red circle", "two blue squares left of a green star", "x " * 300]


@pytest.mark.parametrize("key", ["aesthetic", "hpsv2", "pickscore", "sciscore", "image_reward", "clip_score"])
def test_tiny_models_score_and_share_image_features(key):
    r = build_reward(key, "tiny")
    s = r.score(X, CAPS)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.allclose(s, r.score(X, CAPS))  # deterministic (eval mode)
    if r.needs_text:
        # features of one image reused for several captions == scoring each pair
        f = r.encode_images(X[:2])
        counts = torch.tensor([2, 1])
        rep = repeat_features(f, counts)
        s2 = r.score_features(rep, [CAPS[0], CAPS[1], CAPS[1]])
        ref = r.score(torch.stack([X[0], X[0], X[1]]), [CAPS[0], CAPS[1], CAPS[1]])
        assert torch.allclose(s2, ref, atol=1e-5)


def test_registry_keys_and_aliases():
    assert canonical_key("pickscore") == "pick_a_score_score" and canonical_key("hpsv2_score") == "hpsv2_score"
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        canonical_key("nope")
    assert set(ALIASES.values()) <= set(available_rewards())


def _tiny_clip_cfg(quick_gelu=False):
    from miro_scale.rewards.registry import TINY_OPEN_CLIP
    return dict(TINY_OPEN_CLIP, quick_gelu=quick_gelu)


def test_aesthetic_loads_strictly_and_names_bad_keys(tmp_path):
    from miro_scale.rewards.openclip_models import AestheticReward
    src = AestheticReward(clip_config=_tiny_clip_cfg(True), random_init=True)
    torch.nn.init.normal_(src.head.layers[7].weight, std=1.0)  # make the head's output non-trivial
    # an OpenAI-style checkpoint with metadata keys, a head with the predictor's key names
    from miro_scale.rewards.openclip_models import build_open_clip
    full = build_open_clip(_tiny_clip_cfg(True))
    full.visual.load_state_dict(src.clip.visual.state_dict())
    sd = dict(full.state_dict())
    sd["input_resolution"] = torch.tensor(224)
    torch.save(sd, tmp_path / "clip.pt")
    head = src.head.state_dict()
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert head["layers.0.weight"].shape == (1024, 32) and head["layers.7.weight"].shape == (1, 16)
    torch.save(head, tmp_path / "head.pth")
    r = AestheticReward(clip_config=_tiny_clip_cfg(True), clip_weights=str(tmp_path / "clip.pt"),
                        head_weights=str(tmp_path / "head.pth"))
    assert torch.allclose(r.score(X), src.score(X), atol=1e-6)
    assert r.checkpoint_digest == f"{file_digest(tmp_path / 'clip.pt')},{file_digest(tmp_path / 'head.pth')}"
    bad = dict(head)
    bad.pop("layers.6.bias")
    bad["layers.8.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad_head.pth")
    with pytest.raises(CheckpointError) as e:
        AestheticReward(clip_config=_tiny_clip_cfg(True), clip_weights=str(tmp_path / "clip.pt"),
                        head_weights=str(tmp_path / "bad_head.pth"))
    msg = str(e.value)
    assert "bad_head.pth" in msg and "layers.6.bias" in msg and "layers.8.weight" in msg
    with pytest.raises(ValueError, match="head_weights"):
        AestheticReward(clip_config=_tiny_clip_cfg(True), clip_weights=str(tmp_path / "clip.pt"))


def test_hpsv2_checkpoint_roundtrip_views_and_shape_errors(tmp_path):
    from miro_scale.rewards.openclip_models import HPSv2Reward
    src = HPSv2Reward(clip_config=_tiny_clip_cfg(), random_init=True)
    torch.save({"state_dict": src.clip.state_dict(), "epoch": 3}, tmp_path / "HPS_v2.1_compressed.pt")
    r = HPSv2Reward(weights=str(tmp_path), clip_config=_tiny_clip_cfg())  # directory + default file name
    s = r.score(X, CAPS)
    assert torch.allclose(s, src.score(X, CAPS), atol=1e-6) and (s.abs() <= 1.0001).all()
    assert HPSv2Reward(clip_config=_tiny_clip_cfg(), random_init=True, view="letterbox224").view.mode == "letterbox"
    sd = dict(src.clip.state_dict())
    sd["text_projection"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"text_projection: checkpoint \(5, 5\)"):
        HPSv2Reward(weights=str(tmp_path / "bad.pt"), clip_config=_tiny_clip_cfg())
    with pytest.raises(FileNotFoundError):
        HPSv2Reward(weights=str(tmp_path / "missing.pt"), clip_config=_tiny_clip_cfg())


def test_pickscore_from_pretrained_dir_and_strict_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from miro_scale.rewards.hf_clip import PickScoreReward, tiny_clip_config
    src = PickScoreReward(config=tiny_clip_config(), tokenizer=None)
    src.model.save_pretrained(tmp_path / "pick")
    r = PickScoreReward(weights=str(tmp_path / "pick"), tokenizer=None)
    assert torch.allclose(r.score(X, CAPS), src.score(X, CAPS), atol=1e-5)
    assert r.checkpoint_digest.startswith("sha256:")
    # the score is logit_scale.exp() * cosine
    m = src.model
    with torch.no_grad():
        out = m(input_ids=src.tokenize(CAPS)[0], pixel_values=X)
    assert torch.allclose(out.logits_per_image.diagonal(), src.score(X, CAPS), atol=1e-4)
    sd = load_file(tmp_path / "pick" / "model.safetensors")
    sd.pop("visual_projection.weight")
    save_file(sd, tmp_path / "pick" / "model.safetensors")
    with pytest.raises(CheckpointError, match="visual_projection.weight"):
        PickScoreReward(weights=str(tmp_path / "pick"), tokenizer=None)


def test_image_reward_key_names_and_strict_loading(tmp_path):
    from miro_scale.rewards import image_reward as ir
    r = build_reward("image_reward", "tiny")
    sd = dict(r.model.state_dict())
    for k in ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
              "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.1.attn.qkv.weight",
              "blip.visual_encoder.blocks.1.mlp.fc2.bias", "blip.visual_encoder.norm.weight",
              "blip.text_encoder.embeddings.word_embeddings.weight",
              "blip.text_encoder.embeddings.position_ids",
              "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
              "blip.text_encoder.encoder.layer.1.attention.output.LayerNorm.bias",
              "blip.text_encoder.encoder.layer.1.intermediate.dense.weight", "mlp.layers.7.bias"):
        assert k in sd, k
    assert not any("token_type" in k or "pooler" in k for k in sd)
    # the released checkpoint also carries BLIP's contrastive projections: known, unused
    sd["blip.vision_proj.weight"] = torch.zeros(256, 32)
    sd["blip.text_proj.weight"] = torch.zeros(256, 32)
    sd.pop("blip.text_encoder.embeddings.position_ids")
    torch.save(sd, tmp_path / "ImageReward.pt")
    kw = dict(vision_config=ir.BlipVisionConfig(patch_size=32, width=32, layers=2, heads=2),
              text_config=ir.BlipTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, encoder_width=32, max_position_embeddings=64),
              tokenizer=r.tokenizer)
    r2 = ir.ImageRewardReward(weights=str(tmp_path / "ImageReward.pt"), filename=None, **kw)
    assert torch.allclose(r2.score(X, CAPS), r.score(X, CAPS), atol=1e-5)
    sd["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="blip.itm_head.weight"):
        ir.ImageRewardReward(weights=str(tmp_path / "bad.pt"), filename=None, **kw)


def test_image_reward_normalisation_and_truncation():
    from miro_scale.rewards import image_reward as ir
    r = build_reward("image_reward", "tiny")
    with torch.no_grad():
        for p in r.model.mlp.parameters():
            p.zero_()
        r.model.mlp.layers[7].bias.fill_(ir.IR_MEAN + ir.IR_STD)
    assert torch.allclose(r.score(X, CAPS), torch.ones(3))  # (raw - mean) / std
    t = r.tokenizer(["word " * 100], padding="longest", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"].shape[1] == 35 and t["input_ids"][0, 0] == r.tokenizer.cls_token_id


def test_full_size_architectures_match_published_shapes():
    """Built on the meta device: names and shapes of the real checkpoints, no memory."""
    from transformers import CLIPModel

    from miro_scale.rewards.hf_clip import pickscore_full_config
    from miro_scale.rewards.image_reward import ImageRewardModel
    from miro_scale.rewards.openclip_models import build_open_clip
    with torch.device("meta"):
        h = build_open_clip("ViT-H-14").state_dict()
        a = build_open_clip("ViT-L-14-quickgelu")
        ir = ImageRewardModel().state_dict()
        pk = CLIPModel(pickscore_full_config()).state_dict()
    assert len(h) == 686 and h["visual.proj"].shape == (1280, 1024) and h["text_projection"].shape == (1024, 1024)
    assert a.visual.output_dim == 768 and a.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert ir["blip.visual_encoder.pos_embed"].shape == (1, 197, 1024)
    assert ir["blip.visual_encoder.patch_embed.proj.weight"].shape == (1024, 3, 16, 16)
    assert ir["blip.text_encoder.embeddings.word_embeddings.weight"].shape == (30524, 768)
    assert ir["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)
    assert ir["mlp.layers.0.weight"].shape == (1024, 768)
    assert len([k for k in ir if k.startswith("blip.visual_encoder.blocks.")]) == 24 * 12
    assert pk["vision_model.embeddings.patch_embedding.weight"].shape == (1280, 3, 14, 14)
    assert pk["text_model.embeddings.token_embedding.weight"].shape == (49408, 1024)
    assert pk["visual_projection.weight"].shape == (1024, 1280)


def test_check_state_dict_reports_all_problems():
    exp = {"a": (2,), "b": (3,), "buf": (1,)}
    with pytest.raises(CheckpointError) as e:
        check_state_dict(exp, {"a": torch.zeros(4), "c": torch.zeros(1)}, source="ckpt.pt", optional=("buf",))
    m = str(e.value)
    assert m.startswith("ckpt.pt:") and "missing key(s): b" in m and "unexpected key(s): c" in m
    assert "a: checkpoint (4,) vs model (2,)" in m


def test_views():
    from PIL import Image
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    c = VIEWS["clip224"].one(im)
    lb = VIEWS["letterbox224"].one(im)
    pm = VIEWS["clip336_padmean"].one(im)
    assert c.shape == lb.shape == (3, 224, 224) and pm.shape == (3, 336, 336)
    mean = torch.tensor(VIEWS["clip224"].mean).view(3, 1, 1)
    std = torch.tensor(VIEWS["clip224"].std).view(3, 1, 1)
    assert torch.allclose(lb[:, 0, 0], (-mean / std).view(3), atol=1e-5)        # zero padding
    assert torch.allclose(pm[:, 0, 0], torch.zeros(3), atol=0.02)               # mean-colour padding
    assert torch.allclose(c[:, 112, 112], ((torch.tensor([1.0, 0, 0]).view(3, 1, 1) - mean) / std).view(3), atol=1e-5)
    px = VIEWS["pixels"].one(Image.new("RGB", (1024, 512)))
    assert px.shape == (256, 512, 3) and px.dtype.name == "uint8"


def test_center_crop_view_equals_torchvision_resize_centercrop():
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from miro_scale.rewards.base import OPENAI_MEAN, OPENAI_STD
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    rng = np.random.default_rng(0)
    for w, h in [(300, 201), (201, 300), (225, 224), (500, 333), (224, 224), (100, 50)]:
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        assert torch.equal(VIEWS["clip224"].one(im), tf(im)), (w, h)


def test_torchscript_checkpoints_load(tmp_path):
    """OpenAI's original CLIP files are TorchScript archives; garbage names the file."""
    from miro_scale.rewards.loading import load_state_dict_file
    m = torch.jit.trace(torch.nn.Linear(2, 3), torch.zeros(1, 2))
    m.save(str(tmp_path / "m.pt"))
    assert sorted(load_state_dict_file(tmp_path / "m.pt")) == ["bias", "weight"]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_state_dict_file(tmp_path / "bad.pt")
