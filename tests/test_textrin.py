import subprocess
import sys

import pytest
import torch

from miro_scale.config import ModelConfig, load_config
from miro_scale.flow import MiroFlowModel
from miro_scale.models.textrin import TextRIN, count_parameters, swiglu_hidden_dim
from tests.conftest import ROOT


def make_inputs(cfg, batch=2, text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.randn(batch, m.latent_channels, m.latent_size, m.latent_size, generator=g)
    gamma = torch.rand(batch, generator=g)
    text = torch.randn(batch, text_len, m.text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, 3:] = False
    rewards = torch.rand(batch, len(m.reward_keys), generator=g)
    return x, gamma, text, mask, rewards


def test_miro_16m_has_360m_parameters_on_meta():
    cfg = load_config(ROOT / "configs/miro_16m.json")
    with torch.device("meta"):
        net = TextRIN(cfg.model)
    assert abs(count_parameters(net) - 360.4e6) / 360.4e6 < 0.01
    assert swiglu_hidden_dim(1024, 4) == 2816 and swiglu_hidden_dim(512, 4) == 1536


def test_released_module_names_map_one_to_one():
    with torch.device("meta"):
        keys = set(TextRIN(ModelConfig()).state_dict())
    expected = [
        "patch_extractor.weight", "data_pos_embedding", "data_ln.weight", "latents",
        "time_embedder.encode_time.freqs", "time_embedder.map_time_input.weight",
        "time_embedder.map_time_output.bias",
        "rin_blocks.0.retrieve_cond.ca.q.weight", "rin_blocks.0.retrieve_cond.ca.kv.weight",
        "rin_blocks.0.retrieve_cond.ca.q_norm.weight", "rin_blocks.0.retrieve_cond.ca.q_norm.bias",
        "rin_blocks.3.retriever_ca.ffn.linear_packed.weight", "rin_blocks.3.retriever_ca.ffn.linear_out.bias",
        "rin_blocks.1.processer_sa.3.sa.qkv.weight", "rin_blocks.1.processer_sa.3.initial_ln.weight",
        "rin_blocks.2.writer_ca.middle_ln.weight", "rin_blocks.2.writer_ca.initial_to_ln.weight",
        "transformers_blocks.1.sa.qkv.bias", "transformers_blocks.0.layer_scale_1",
        "transformers_blocks.0.ffn.linear_1.weight", "transformers_blocks.0.initial_ln.bias",
        "coherence_embedder.vqa_score_coherence.map_time_input.weight",
        "coherence_embedder.sciscore_score_coherence.encode_time.phases",
        "coherence_positional_embedding", "map_text_tokens.weight", "text_registers",
        "ln_previous_1.weight", "linear_previous.linear_2.weight", "ln_previous_2.bias",
        "map_tokens_to_patches.0.weight", "map_tokens_to_patches.1.weight",
    ]
    missing = [k for k in expected if k not in keys]
    assert not missing, missing
    sd = TextRIN(ModelConfig(latents_dim=64, data_dim=32, num_latents=4, num_blocks=1, num_processing_layers=1,
                             read_write_heads=2, compute_heads=2, cond_heads=2, text_dim=8)).state_dict()
    assert sd["rin_blocks.0.retriever_ca.ca.kv.weight"].shape == (2 * 32, 32)  # width min(dq, dkv)


@pytest.mark.parametrize("keys", [[], ["aesthetic_score"],
                                  ["clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score",
                                   "hpsv2_score", "vqa_score"],
                                  ["clip_score", "aesthetic_score", "image_reward_score", "pick_a_score_score",
                                   "hpsv2_score", "vqa_score", "sciscore_score"]])
def test_any_list_of_reward_keys(tiny_cfg, keys):
    cfg = tiny_cfg(model={"reward_keys": keys})
    net = TextRIN(cfg.model)
    x, gamma, text, mask, rewards = make_inputs(cfg)
    out, latents = net(x, gamma, text, mask, rewards if keys else None)
    assert out.shape == x.shape and latents.shape == (2, cfg.model.num_latents, cfg.model.latents_dim)
    assert len(net.coherence_embedder) == len(keys)
    assert torch.isfinite(out).all()


def test_reward_values_change_the_output_and_nan_drops_a_reward(tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = TextRIN(cfg.model).eval()
    x, gamma, text, mask, rewards = make_inputs(cfg)
    base = net(x, gamma, text, mask, rewards)[0]
    for i in range(rewards.shape[1]):
        changed = rewards.clone()
        changed[:, i] = 1.0 - changed[:, i]
        assert not torch.allclose(net(x, gamma, text, mask, changed)[0], base, atol=1e-6), i
    dropped = rewards.clone()
    dropped[:, 0] = float("nan")
    out = net(x, gamma, text, mask, dropped)[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-6)
    with pytest.raises(ValueError, match=r"rewards must be \[batch, 3\]"):
        net(x, gamma, text, mask, rewards[:, :2])


def test_padded_text_tokens_are_ignored(tiny_cfg):
    cfg = tiny_cfg()
    net = TextRIN(cfg.model).eval()
    x, gamma, text, mask, rewards = make_inputs(cfg)
    noisy = text.clone()
    noisy[0, 3:] = 100.0  # masked positions of sample 0
    a, b = net(x, gamma, text, mask, rewards)[0], net(x, gamma, noisy, mask, rewards)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_every_reward_embedder_receives_gradient(tiny_cfg, embedding):
    cfg = tiny_cfg(model={"reward_embedding": embedding})
    model = MiroFlowModel(cfg.model, cfg.flow)
    x, gamma, text, mask, rewards = make_inputs(cfg)
    out = model(x, gamma, text, mask, rewards)
    (out.velocity.square().mean() + out.log_weight.sum()).backward()
    for name, embedder in model.net.coherence_embedder.items():
        grads = [p.grad for p in embedder.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert model.net.coherence_positional_embedding.grad.abs().sum() > 0


def test_self_conditioning_starts_as_a_no_op(tiny_cfg):
    cfg = tiny_cfg()
    net = TextRIN(cfg.model).eval()
    x, gamma, text, mask, rewards = make_inputs(cfg)
    prev = torch.randn(2, cfg.model.num_latents, cfg.model.latents_dim)
    torch.testing.assert_close(net(x, gamma, text, mask, rewards, prev)[0], net(x, gamma, text, mask, rewards)[0])


def test_model_stats_tool_prints_counts_and_flops():
    out = subprocess.run([sys.executable, "-m", "miro_scale.tools.model_stats", "--config",
                          str(ROOT / "configs/miro_16m.json"), "--text-len", "77"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "360,411,793" in out
    fwd = float(out.split("GFLOP per sample forward")[0].split()[-1].replace(",", ""))
    assert 150 < fwd < 200  # ~2 x 0.36B x 256 tokens-ish plus attention: 173 GFLOP measured


def test_sincos_position_init_encodes_row_and_column(tiny_cfg):
    """model.data_pos_init=sincos: half the channels a function of the patch row, half of its column,
    every patch distinct and of unit scale (the demo's small model needs positions from step 0)."""
    from miro_scale.config import ConfigError
    from miro_scale.models.textrin import sincos_2d

    table = sincos_2d(4, 8).view(4, 4, 8)
    assert torch.equal(table[:, :1, :4].expand(4, 4, 4), table[..., :4])  # rows: same along a row
    assert torch.equal(table[:1, :, 4:].expand(4, 4, 4), table[..., 4:])  # columns: same down a column
    assert torch.cdist(table.view(16, 8), table.view(16, 8)).add(torch.eye(16)).min() > 0.1
    assert torch.allclose(table.pow(2).mean(), torch.tensor(0.5))
    cfg = tiny_cfg(model={"data_pos_init": "sincos"})
    net = TextRIN(cfg.model)
    grid = cfg.model.latent_size // cfg.model.patch_size
    assert torch.equal(net.data_pos_embedding.detach().view(grid * grid, -1), sincos_2d(grid, cfg.model.data_dim))
    assert TextRIN(tiny_cfg().model).data_pos_embedding.abs().max() <= 0.04  # the released init by default
    with pytest.raises(ConfigError, match="model.data_pos_init"):
        tiny_cfg(model={"data_pos_init": "sincos", "data_dim": 30})


def test_overlapping_patches_read_and_write_their_neighbours(tiny_cfg):
    """model.patch_context=3: a token's embedding depends on its own and the 8 neighbouring patches
    and on nothing further; its output block covers the same 3 x 3 patches, summed where blocks
    overlap; 1 keeps the released linear patches."""
    from miro_scale.config import ConfigError

    cfg = tiny_cfg(model={"patch_context": 3})
    net = TextRIN(cfg.model)
    m = cfg.model
    p, grid = m.patch_size, m.latent_size // m.patch_size
    x = torch.randn(1, m.latent_channels, m.latent_size, m.latent_size, requires_grad=True)
    token = 1 * grid + 1  # row 1, column 1
    net.embed_patches(x)[0, token].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros_like(touched)
    expected[0:3 * p, 0:3 * p] = True  # rows/columns 0-2 of patches around (1, 1)
    assert torch.equal(touched, expected)

    c = m.latent_channels
    block = torch.zeros(1, grid * grid, c * (3 * p) ** 2)
    block[0, token] = 1.0
    image = net.tokens_to_image(block, m.latent_size, m.latent_size)
    assert torch.equal(image[0, 0] != 0, expected)
    block[0, token + 1] = 1.0  # the next token's block overlaps two patch columns of this one
    image = net.tokens_to_image(block, m.latent_size, m.latent_size)
    assert image.max() == 2.0 and int((image[0, 0] == 2.0).sum()) == 3 * p * 2 * p

    out, _ = net(*make_inputs(cfg))
    assert out.shape == (2, c, m.latent_size, m.latent_size) and torch.isfinite(out).all()
    assert isinstance(TextRIN(tiny_cfg().model).patch_extractor, torch.nn.Linear)  # released by default
    for bad in (0, 2):
        with pytest.raises(ConfigError, match="model.patch_context"):
            tiny_cfg(model={"patch_context": bad})
