"""clip_score (jina-clip-v2): native towers against an independent transcription of the published
forward pass, strict loading from the released safetensors layout, LoRA merging, truncation, scoring."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fixtures import jina_reference as ref
from miro_scale.rewards import jina_clip as jc
from miro_scale.rewards.base import repeat_features
from miro_scale.rewards.loading import CheckpointError
from miro_scale.rewards.registry import build_reward

# Parity scale: 56 px / patch 14 = a 4x4 grid, so the RoPE positions are interpolated (t * 16 / 4).
SMALL = jc.JinaClipV2Config(image_size=56, patch_size=14, width=64, layers=2, head_width=16, embed_dim=64,
                            vocab_size=len(jc.TINY_WORDS) + 5, hidden_size=64, text_layers=2, text_heads=4,
                            intermediate_size=128)
CAPS = ["a red circle", "two blue squares left of a green star on top of a big white triangle", "x"]


def _released_dir(tmp_path, cfg=SMALL, lora_alpha=2.0, task="retrieval.query", seed=0, drop=(), extra=None):
    """A directory in the released layout: model.safetensors (unmerged LoRA, 5 tasks) + config.json."""
    sd = ref.random_released_state_dict(jc.manifest(cfg), seed)
    for k in drop:
        sd.pop(k)
    sd.update(extra or {})
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "text_config": {"default_lora_task": task, "default_instruction_task": None,
                        "hf_model_config_kwargs": {"lora_alpha": lora_alpha, "lora_rank": cfg.lora_rank,
                                                   "lora_adaptations": list(jc.LORA_TASKS_V3)}},
        "vision_config": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
                          "layers": cfg.layers, "head_width": cfg.head_width, "pt_hw_seq_len": 16,
                          "intp_freq": True}}))
    return sd


def _inputs(tok, n=3):
    torch.manual_seed(1)
    pixels = torch.randn(n, 3, SMALL.image_size, SMALL.image_size)
    t = tok(CAPS[:n], padding=True, return_tensors="pt")
    return pixels, t["input_ids"], t["attention_mask"]


def test_manifest_sizes_match_the_published_model():
    m = jc.manifest()
    assert m["vision_model.pos_embed"] == (1, (512 // 14) ** 2 + 1, 1024)
    assert m["vision_model.blocks.23.mlp.w1.weight"] == (2730, 1024)
    assert m["vision_model.blocks.0.attn.q_proj.weight"] == (1024, 1024)
    assert "vision_model.blocks.0.attn.k_bias" not in m  # EVA: q and v biases only
    r = jc.TEXT_PREFIX
    assert m[r + "embeddings.word_embeddings.parametrizations.weight.original"] == (250002, 1024)
    assert m[r + "encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_A"] == (5, 4, 1024)
    assert m[r + "encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_B"] == (5, 3072, 4)
    vis = sum(math.prod(s) for k, s in m.items() if k.startswith("vision_model."))
    txt = sum(math.prod(s) for k, s in m.items() if k.startswith("text_model.") and "lora" not in k)
    assert 0.29e9 < vis < 0.32e9 and 0.55e9 < txt < 0.57e9  # ~304M EVA02-L + ~561M XLM-R (model card 865M)
    # the native (merged) model has exactly the released non-LoRA parameters: ~865M
    with torch.device("meta"):
        model = jc.JinaClipV2(jc.JinaClipV2Config())
    n = sum(p.numel() for p in model.parameters())
    assert n == vis + txt + 1 and 0.86e9 < n < 0.87e9


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
    one_task = jc.JinaClipV2Config(**{**cfg.__dict__, "lora_tasks": 1})
    other = {k: torch.zeros(s) for k, s in jc.manifest(one_task).items()}
    with pytest.raises(CheckpointError, match="lora_A: checkpoint"):
        jc.check_checkpoint(other, cfg=cfg)


@pytest.mark.parametrize("task", ["retrieval.query", "text-matching"])
def test_parity_with_the_published_forward(tmp_path, task):
    """Same released-layout weights (unmerged LoRA, all 5 tasks) through the native model (merged at
    load) and through the reference transcription: image features, text features and scores."""
    sd = _released_dir(tmp_path, lora_alpha=2.0, task=task)
    tok = jc.tiny_tokenizer()
    r = jc.JinaClipReward(weights=str(tmp_path), config=SMALL, tokenizer=tok)
    assert r.config.lora_tasks == 5 and r.config.lora_alpha == 2.0
    assert r.config.task_index == jc.LORA_TASKS_V3.index(task)
    pixels, ids, mask = _inputs(tok)
    assert (mask == 0).any()  # padding is exercised
    with torch.no_grad():
        img = r.model.vision_model(pixels)
        txt = r.model.text(ids, mask)
        scores = r.score(pixels, CAPS)
    img_ref = ref.reference_image_features(sd, pixels, width=SMALL.width, layers=SMALL.layers,
                                           head_width=SMALL.head_width, patch=SMALL.patch_size)
    txt_ref = ref.reference_text_features(sd, ids, mask, layers=SMALL.text_layers, heads=SMALL.text_heads,
                                          task=jc.LORA_TASKS_V3.index(task), alpha=2.0, rank=4,
                                          base=SMALL.rotary_base)
    s_ref = ref.reference_scores(sd, img_ref, txt_ref)
    d_img, d_txt, d_s = ((a - b).abs().max().item() for a, b in ((img, img_ref), (txt, txt_ref), (scores, s_ref)))
    print(f"parity[{task}] max|diff| image {d_img:.2e} text {d_txt:.2e} score {d_s:.2e}")
    assert d_img < 1e-5 and d_txt < 1e-5 and d_s < 1e-4
    assert s_ref.abs().max() > 1.0  # non-trivial scores (about 100 x cosine)
    # a wrong adapter would not pass: the other tasks' reference differs clearly
    other = ref.reference_text_features(sd, ids, mask, layers=2, heads=4, task=2, alpha=2.0, rank=4,
                                        base=SMALL.rotary_base)
    assert (other - txt).abs().max() > 1e-2


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    missing = "vision_model.blocks.1.attn.v_bias"
    lora = jc.TEXT_PREFIX + "encoder.layers.0.mlp.fc1.parametrizations.weight.0.lora_B"
    _released_dir(tmp_path, drop=(missing, lora), extra={"vision_model.head.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError) as e:
        jc.JinaClipReward(weights=str(tmp_path), config=SMALL, tokenizer=jc.tiny_tokenizer())
    msg = str(e.value)
    assert "model.safetensors" in msg and missing in msg and lora in msg and "vision_model.head.weight" in msg
    with pytest.raises(FileNotFoundError):
        jc.JinaClipReward(weights=str(tmp_path / "nowhere"), config=SMALL)


def test_meta_build_loads_every_tensor_in_the_requested_dtype(tmp_path):
    _released_dir(tmp_path)
    tok = jc.tiny_tokenizer()
    r32 = jc.JinaClipReward(weights=str(tmp_path), config=SMALL, tokenizer=tok)
    r16 = jc.JinaClipReward(weights=str(tmp_path), config=SMALL, tokenizer=tok, dtype=torch.bfloat16)
    params = dict(r16.model.named_parameters())
    assert not any(p.is_meta for p in params.values()) and not any(b.is_meta for b in r16.model.buffers())
    assert {p.dtype for n, p in params.items() if n != "logit_scale"} == {torch.bfloat16}
    assert params["logit_scale"].dtype == torch.float32
    # RoPE tables are recomputed after to_empty (not left as uninitialised memory)
    cos, sin = jc.eva_rope_tables(r16.config)
    assert torch.equal(r16.model.vision_model.rope_cos, cos) and torch.equal(r16.model.vision_model.rope_sin, sin)
    assert torch.allclose(r16.model.text.rotary_cos[:, 0], torch.cos(torch.arange(1024.0)))
    pixels, _, _ = _inputs(tok)
    s32, s16 = r32.score(pixels, CAPS), r16.score(pixels, CAPS)
    assert torch.isfinite(s16).all() and (s16 - s32).abs().max() < 0.05 * s32.abs().max() + 0.5
    assert r16.checkpoint_digest.startswith("sha256:")


def test_lora_merge_equals_the_unmerged_low_rank_forward():
    torch.manual_seed(0)
    T, r, n_in, n_out, s = 3, 4, 12, 7, 0.5
    W, A, B = torch.randn(n_out, n_in), torch.randn(T, r, n_in), torch.randn(T, n_out, r)
    x = torch.randn(5, n_in)
    for t in range(T):  # Linear: x W^T + s (x A^T) B^T
        merged = jc.merge_lora(W, A, B, t, s, embedding=False)
        assert torch.allclose(x @ merged.T, x @ W.T + s * (x @ A[t].T) @ B[t].T, atol=1e-5)
    E, Ae, Be = torch.randn(20, 6), torch.randn(T, 20, r), torch.randn(T, r, 6)
    ids = torch.tensor([0, 3, 19, 3])
    for t in range(T):  # Embedding: E[ids] + s A[ids] B
        merged = jc.merge_lora(E, Ae, Be, t, s, embedding=True)
        assert torch.allclose(merged[ids], E[ids] + s * Ae[t][ids] @ Be[t], atol=1e-5)
    assert not torch.allclose(jc.merge_lora(W, A, B, 0, s, False), jc.merge_lora(W, A, B, 1, s, False))


def test_captions_are_truncated_at_1024_tokens():
    r = build_reward("clip_score", "tiny")
    assert r.max_length == 1024
    long, at_limit = "x " * 3000, "x " * 1022
    t = r.tokenizer([long], truncation=True, max_length=r.max_length, return_tensors="pt")["input_ids"]
    assert t.shape[1] == 1024 and t[0, 0].item() == 0 and t[0, -1].item() == 2
    feats = r.encode_images(torch.randn(1, 3, 224, 224)).repeat(3, 1)
    s = r.score_features(feats, [long, at_limit, "x " * 500])
    assert torch.allclose(s[0], s[1], atol=1e-6) and not torch.allclose(s[0], s[2], atol=1e-4)


def test_tiny_clip_score_scores_pil_images_and_shares_features():
    r = build_reward("clip_score", "tiny")
    assert r.key == "clip_score" and r.shares_image_features
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 200), (240, 320))]
    x = r.view.prepare(pils)
    assert x.shape == (2, 3, r.config.image_size, r.config.image_size)
    s = r.score(x, CAPS[:2])
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    rep = repeat_features(r.encode_images(x), torch.tensor([2, 1]))
    caps = [CAPS[0], CAPS[1], CAPS[1]]
    assert torch.allclose(r.score_features(rep, caps), r.score(torch.stack([x[0], x[0], x[1]]), caps), atol=1e-5)
    assert torch.equal(build_reward("clip_score", "tiny").score(x, CAPS[:2]), s)  # seeded


def test_full_size_variants_build_on_meta_and_use_the_512_view():
    r = build_reward("clip_score", "random")
    assert not r.materialized and all(p.is_meta for p in r.model.parameters())
    assert r.view.name == "clip512" and r.model.vision_model.pos_embed.shape == (1, 1297, 1024)


def test_deferred_random_weights_materialise_on_first_use_as_seeded():
    lazy = jc.JinaClipReward(random_init=True, materialize=False, config=jc.tiny_config(), seed=7)
    eager = jc.JinaClipReward(random_init=True, config=jc.tiny_config(), seed=7)
    assert not lazy.materialized and eager.materialized
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(lazy.score(x, CAPS[:2]), eager.score(x, CAPS[:2])) and lazy.materialized


def test_released_tokenizer_reads_tokenizer_json(tmp_path):
    tiny = jc.tiny_tokenizer()
    tiny.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = jc.released_tokenizer(tmp_path)
    a = tok(CAPS, padding=True)["input_ids"]
    assert a == tiny(CAPS, padding=True)["input_ids"] and a[0][0] == 0 and tok.pad_token_id == 1
    with pytest.raises(FileNotFoundError):
        jc.released_tokenizer(tmp_path / "missing")
