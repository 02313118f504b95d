"""VQAScore (CLIP-FlanT5): prompt, scoring on a tiny config, checkpoint layout and strict loading."""
import json

import pytest
import torch

from miro_scale.rewards import vqascore as vq
from miro_scale.rewards.loading import CheckpointError
from miro_scale.rewards.registry import build_reward

X = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
CAPS = ["a red circle", "two blue squares left of a green star"]


def test_prompt_format():
    pre, post = vq.prompt_chunks("a dog")
    assert pre.endswith(" USER: ") and pre.startswith("A chat between a curious user")
    assert post == '\nDoes this figure show "a dog"? Please answer yes or no. ASSISTANT: '


def test_tiny_vqascore_is_a_probability_and_matches_manual_computation():
    r = build_reward("vqa", "tiny")
    assert r.view.name == "clip336_padmean" and r.view.size == 336
    s = r.score(X, CAPS)
    assert s.shape == (2,) and ((s > 0) & (s <= 1)).all()
    # manual: splice the projected patch tokens into the prompt, teacher-force "Yes </s>"
    m = r.model
    with torch.no_grad():
        feats = m.encode_images(X)
        n_patch = (336 // 48) ** 2
        assert feats.shape == (2, n_patch, 32)
        pre, post = vq.prompt_chunks(CAPS[1])
        ids_a = torch.tensor(r.tokenizer(pre).input_ids)
        ids_b = torch.tensor(r.tokenizer(post).input_ids)
        assert ids_a[-1] == 1 and ids_b[-1] == 1  # each chunk ends with </s>
        emb = m.get_input_embeddings()
        x = torch.cat([emb(ids_a), feats[1], emb(ids_b)])[None]
        labels = torch.tensor([r.tokenizer("Yes").input_ids])
        out = m(inputs_embeds=x, labels=labels)
        ref = torch.exp(-out.loss)
    assert torch.allclose(s[1], ref, rtol=1e-4)


def test_lm_head_is_untied_for_flan_t5():
    r = build_reward("vqa", "tiny")
    assert r.model.lm_head.weight.data_ptr() != r.model.shared.weight.data_ptr()


def test_full_size_manifest_has_the_released_names():
    m = vq.manifest()
    assert m["shared.weight"] == (32128, 4096) and m["lm_head.weight"] == (32128, 4096)
    assert m["mm_projector.0.weight"] == (4096, 1024) and m["mm_projector.2.weight"] == (4096, 4096)
    assert m["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert m["decoder.block.23.layer.2.DenseReluDense.wi_1.weight"] == (10240, 4096)
    assert m["vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    assert m["vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    n = sum(int(torch.tensor(s).prod()) if s else 1 for k, s in m.items() if "embed_tokens" not in k)
    assert 11.4e9 < n < 11.5e9  # FlanT5-XXL with its own lm_head (11.1B) + CLIP ViT-L (0.3B) + projector


def _save_released_layout(r, d, drop=(), extra=None, with_vision=True, bin_shards=0):
    """The tiny model under the released checkpoint's names: model.safetensors, or (bin_shards > 0)
    pytorch_model-0000i-of-0000n.bin shards listed by pytorch_model.bin.index.json."""
    from safetensors.torch import save_file
    flat = vq._flat_clip_vision()
    sd = {}
    for k, v in r.model.state_dict().items():
        ck = vq.to_checkpoint_name(k, flat)
        if "embed_tokens" in ck or "position_ids" in ck or ck in drop:
            continue
        if not with_vision and ck.startswith(vq.VT):
            continue
        sd[ck] = v.detach().clone().contiguous()
    sd.update(extra or {})
    d.mkdir(parents=True, exist_ok=True)
    if bin_shards:
        keys = sorted(sd)
        weight_map = {}
        for i in range(bin_shards):
            name = f"pytorch_model-{i + 1:05d}-of-{bin_shards:05d}.bin"
            part = {k: sd[k] for k in keys[i::bin_shards]}
            torch.save(part, d / name)
            weight_map.update(dict.fromkeys(part, name))
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(sd, str(d / "model.safetensors"))
    t5, _ = vq.tiny_configs()
    cfg = {k: v for k, v in t5.to_dict().items() if k not in ("scale_decoder_outputs",)}
    cfg.update(model_type="clip_t5", tie_word_embeddings=False, mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=32)
    (d / "config.json").write_text(json.dumps(cfg))


def test_load_released_layout_strictly(tmp_path):
    r = build_reward("vqa", "tiny")
    _save_released_layout(r, tmp_path / "ok")
    t5, vis = vq.tiny_configs()
    r2 = vq.VQAScoreReward(weights=str(tmp_path / "ok"), vision_config=vis, tokenizer=r.tokenizer)
    assert torch.allclose(r2.score(X, CAPS), r.score(X, CAPS), rtol=1e-4)
    assert r2.checkpoint_digest.startswith("sha256:")
    _save_released_layout(r, tmp_path / "bad", drop=("mm_projector.2.bias",),
                          extra={"mm_projector.4.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError) as e:
        vq.VQAScoreReward(weights=str(tmp_path / "bad"), vision_config=vis, tokenizer=r.tokenizer)
    assert "mm_projector.2.bias" in str(e.value) and "mm_projector.4.weight" in str(e.value)
    post_ln = vq.VT + "vision_model.post_layernorm.weight"
    _save_released_layout(r, tmp_path / "partial", drop=(post_ln,))
    with pytest.raises(CheckpointError, match="1 missing key.*" + post_ln):
        vq.VQAScoreReward(weights=str(tmp_path / "partial"), vision_config=vis, tokenizer=r.tokenizer)
    # a LLaVA-style checkpoint without the vision tower needs vision_weights
    _save_released_layout(r, tmp_path / "novis", with_vision=False)
    with pytest.raises(CheckpointError, match="no vision tower"):
        vq.VQAScoreReward(weights=str(tmp_path / "novis"), vision_weights=None, vision_config=vis,
                          tokenizer=r.tokenizer)


def test_released_checkpoint_with_tied_embedding_aliases(tmp_path):
    """t2v-metrics' model sets `self.embed_tokens = self.encoder.embed_tokens`, so its .bin shards hold
    `embed_tokens.weight` (and the tied encoder/decoder copies) beside `shared.weight`: accepted when
    equal to it, an error naming the key otherwise."""
    r = build_reward("vqa", "tiny")
    _, vis = vq.tiny_configs()
    shared = r.model.shared.weight.detach().clone()
    tied = {k: shared.clone() for k in ("embed_tokens.weight", "encoder.embed_tokens.weight",
                                        "decoder.embed_tokens.weight")}
    _save_released_layout(r, tmp_path / "ok", extra=tied, bin_shards=3)
    r2 = vq.VQAScoreReward(weights=str(tmp_path / "ok"), vision_config=vis, tokenizer=r.tokenizer)
    assert torch.equal(r2.score(X, CAPS), r.score(X, CAPS))
    for key, value, match in (
            ("embed_tokens.weight", shared + 1, r"embed_tokens.weight \(differs from shared.weight\)"),
            ("decoder.embed_tokens.weight", shared * 0, r"decoder.embed_tokens.weight \(differs from shared.weight\)"),
            ("embed_tokens.weight", shared[:5], r"embed_tokens.weight: checkpoint \(5, 32\)")):
        _save_released_layout(r, tmp_path / "bad", extra={**tied, key: value}, bin_shards=2)
        with pytest.raises(CheckpointError, match=match):
            vq.VQAScoreReward(weights=str(tmp_path / "bad"), vision_config=vis, tokenizer=r.tokenizer)


def test_check_checkpoint_knows_the_alias():
    m = vq.manifest()
    sd = {k: torch.empty(s, device="meta") for k, s in m.items()}
    vq.check_checkpoint(dict(sd, **{"embed_tokens.weight": sd["shared.weight"]}))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: checkpoint \(3, 4096\)"):
        vq.check_checkpoint(dict(sd, **{"embed_tokens.weight": torch.empty(3, 4096, device="meta")}))
