import json

import pytest

from miro_scale.config import ConfigError, config_from_dict, load_config
from tests.conftest import ROOT, tiny_config_dict


def test_shipped_configs_load():
    big = load_config(ROOT / "configs/miro_16m.json")
    assert big.model.latents_dim == 1024 and len(big.model.reward_keys) == 7
    assert big.model.reward_bins == 64 and big.optim.name == "lamb" and big.train.global_batch_size == 1024
    assert big.train.steps == 500_000 and big.optim.ema_decay == 0.9999 and big.optim.cosine_rate == 0.8
    assert big.text_encoder.name_or_path == "google/flan-t5-xl" and big.model.text_dim == 2048
    assert (big.engine.kind, big.engine.zero_stage) == ("deepspeed", 2)  # with LAMB: docs/training.md


def test_tiny_cpu_config_is_fp32():
    tiny = load_config(ROOT / "configs/tiny_cpu.json")
    assert tiny.train.precision == "fp32"


def test_unknown_key_names_dotted_path_and_nearest():
    data = tiny_config_dict()
    data["model"]["latent_dim"] = 512
    with pytest.raises(ConfigError, match=r"model\.latent_dim: unknown key \(did you mean 'latents_dim'\?\)"):
        config_from_dict(data)


@pytest.mark.parametrize("section,key,value,message", [
    ("optim", "lr", 0.0, r"optim\.lr: must be > 0"),
    ("optim", "lr", "fast", r"optim\.lr: expected a finite number"),
    ("model", "reward_bins", 1, r"model\.reward_bins: must be >= 2"),
    ("model", "patch_size", 3, r"model\.patch_size: 3 does not divide latent_size 8"),
    ("model", "reward_keys", ["clip_score", "aestetic_score"],
     r"model\.reward_keys\[1\]: unknown reward key 'aestetic_score' \(did you mean 'aesthetic_score'\?\)"),
    ("model", "num_blocks", 2.5, r"model\.num_blocks: expected an integer"),
    ("model", "self_conditioning", "yes", r"model\.self_conditioning: expected true or false"),
    ("model", "qk_norm", "batch", r"model\.qk_norm: 'batch' is not one of"),
    ("model", "compute_heads", 5, r"model\.compute_heads: 5 heads do not divide attention width 64"),
    ("train", "global_batch_size", 10, r"train\.global_batch_size: 10 is not a multiple of micro_batch_size 4"),
    ("flow", "latent_shift", [0.0, 0.0], r"flow\.latent_scale: has 4 channels but latent_shift has 2"),
])
def test_bad_values_name_the_field(section, key, value, message):
    data = tiny_config_dict()
    data.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_sampling_targets_must_be_model_reward_keys():
    data = tiny_config_dict(sampling={"reward_targets": {"hpsv2_score": 1.0}})
    with pytest.raises(ConfigError, match=r"sampling\.reward_targets\.hpsv2_score: not one of model\.reward_keys"):
        config_from_dict(data)


def test_dotted_overrides_parse_json_values(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config_dict()))
    cfg = load_config(path, ["model.latents_dim=128", "optim.lr=3e-4", "model.reward_keys=[\"clip_score\"]",
                             "train.output_dir=/tmp/x"])
    assert cfg.model.latents_dim == 128 and cfg.optim.lr == 3e-4
    assert cfg.model.reward_keys == ["clip_score"] and cfg.train.output_dir == "/tmp/x"
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["optim.lr"])


def test_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": {')
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 1"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"missing\.json: config file not found"):
        load_config(tmp_path / "missing.json")


def test_variants_extend_a_base_config(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps(tiny_config_dict()))
    (tmp_path / "variant.json").write_text(json.dumps({"extends": "base.json", "model": {"reward_keys": []}}))
    cfg = load_config(tmp_path / "variant.json")
    assert cfg.model.reward_keys == [] and cfg.model.latents_dim == 64
    (tmp_path / "loop.json").write_text(json.dumps({"extends": "loop.json"}))
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_config(tmp_path / "loop.json")
    for name, keys in [("baseline_16m", 0), ("specialist_aesthetic_16m", 1), ("leave_one_out_vqa_16m", 6),
                       ("miro_16m_8gpu", 7), ("post_training_16m", 7)]:
        assert len(load_config(ROOT / f"configs/{name}.json").model.reward_keys) == keys


def test_impossible_data_settings_are_refused():
    shards = {"source": "shards", "shards": "train/"}
    with pytest.raises(ConfigError, match=r"data\.loader: 'dali' decodes images; latent mode"):
        config_from_dict(tiny_config_dict(data={**shards, "loader": "dali", "mode": "latent"}))
    with pytest.raises(ConfigError, match=r"data\.loader: 'dali' does not read precomputed text embeddings"):
        config_from_dict(tiny_config_dict(data={**shards, "loader": "dali", "mode": "image", "resolution": 64,
                                                "precomputed_text": True}))
    with pytest.raises(ConfigError, match=r"data\.caption_source: weights must be >= 0"):
        config_from_dict(tiny_config_dict(data={"caption_source": {"txt": -1.0, "long": 1.0}}))
    cfg = config_from_dict(tiny_config_dict(data={**shards, "caption_source": {"txt": 0.5, "long": 0.5}}))
    assert cfg.data.caption_mix() == {"txt": 0.5, "long": 0.5}


def test_the_recipe_trains_on_precomputed_shards():
    cfg = load_config(ROOT / "configs/miro_16m.json")
    d = cfg.data
    assert (d.source, d.mode, d.loader, d.precomputed_text, d.max_text_len) == ("shards", "latent", "pil", True, 256)
    assert d.caption_mix() == {"txt": 0.5, "long": 0.5} and cfg.flow.sample_posterior
    assert load_config(ROOT / "configs/miro_16m_random_tensors.json").data.source == "synthetic_tensors"
