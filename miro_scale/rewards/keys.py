"""Canonical reward keys: the names a config, a shard's json and a scorer's output share.

MIRO_REWARD_KEYS are the seven rewards of the paper, named as the released code names them.
SYNTHETIC_REWARD_KEYS are pixel-based rewards for the project's synthetic image-text world.
"""
MIRO_REWARD_KEYS = (
    "clip_score",
    "aesthetic_score",
    "image_reward_score",
    "pick_a_score_score",
    "hpsv2_score",
    "vqa_score",
    "sciscore_score",
)

SYNTHETIC_REWARD_KEYS = (
    "caption_alignment_score",
    "sharpness_score",
    "contrast_score",
    "colourfulness_score",
)

REWARD_KEYS = MIRO_REWARD_KEYS + SYNTHETIC_REWARD_KEYS
