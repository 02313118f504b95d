"""Evaluation: prompt sets (PartiPrompts, GenEval) and reward scoring of generated images."""
