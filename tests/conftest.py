import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_dir():
    if not SHARED.exists():
        pytest.skip("../shared is not beside this checkout")
    return SHARED


def tiny_config_dict(**sections):
    """A model small enough for unit tests on a CPU (about 0.3M parameters)."""
    base = {
        "model": {
            "latent_channels": 4, "latent_size": 8, "patch_size": 2, "data_dim": 32, "num_latents": 8,
            "latents_dim": 64, "num_blocks": 2, "num_processing_layers": 1, "read_write_heads": 2,
            "compute_heads": 4, "text_dim": 16, "num_text_registers": 2, "cond_blocks": 2, "cond_heads": 2,
            "reward_keys": ["clip_score", "aesthetic_score", "image_reward_score"],
        },
        "data": {"num_samples": 64, "text_len": 6},
        "optim": {"warmup_steps": 0, "ema_decay": 0.9},
        "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32",
                  "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 2},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


@pytest.fixture
def tiny_cfg():
    from miro_scale.config import config_from_dict

    return lambda **sections: config_from_dict(tiny_config_dict(**sections))
