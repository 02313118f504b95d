"""The synthetic shapes world: a dataset, its rewards and its evaluation, with no weights to download.

  world.py    procedural scenes (coloured shapes, GenEval's caption categories), rendered, captioned,
              perhaps mismatched or degraded; written as img2dataset-style shards
              (``python -m miro_scale.synthetic.world --out DIR --num-samples N``)
  rewards.py  the pixel rewards registered as caption_alignment_score, sharpness_score,
              contrast_score and colourfulness_score: a caption parser and shape detector, and
              image statistics (no weights, CPU, deterministic)

The rewards are reached through the registry (``miro_scale.rewards.registry.build_reward``) like
every other reward model.
"""
