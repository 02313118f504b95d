"""A web page for a MIRO model (Gradio): a prompt, a slider for each of the model's rewards for s+ and
for s-, guidance, steps, seed and best-of-N, a Generate button and the image.

Best-of-N draws N candidates (candidate k from seed + k, so N = 1 is plain sampling with the seed)
and keeps the one a chosen reward scores highest (miro_scale.evaluation.search). The rewards offered
for that choice: the synthetic world's pixel rewards when the model is conditioned on them (no
weights needed), else those given to the command (registry keys, weights via --reward-config);
none: no best-of-N. ``launchers/web_demo.py`` serves it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

DISPLAY_SIDE = 256  # small images (the synthetic world's 32 px) are shown enlarged, pixels kept sharp


def pixel_reward_keys() -> List[str]:
    """The synthetic world's rewards: computed from pixels, no weights."""
    from miro_scale.synthetic import rewards

    return [cls.key for cls in (rewards.CaptionAlignmentReward, rewards.SharpnessReward, rewards.ContrastReward,
                                rewards.ColourfulnessReward)]


def default_select_rewards(reward_keys: Sequence[str]) -> List[str]:
    """The model's own rewards when all of them are pixel rewards (a synthetic-world model), else none."""
    pixel = set(pixel_reward_keys())
    return list(reward_keys) if reward_keys and set(reward_keys) <= pixel else []


class DemoModel:
    """A pipeline plus the rewards best-of-N may select on (an evaluator over ``select_keys``)."""

    def __init__(self, pipe, evaluator=None):
        self.pipe, self.evaluator = pipe, evaluator
        self.reward_keys: List[str] = list(pipe.cfg.model.reward_keys)
        self.select_keys: List[str] = [r.key for r in evaluator.rewards] if evaluator is not None else []
        s = pipe.cfg.sampling
        self.positive_defaults = {k: float(s.reward_targets.get(k, 1.0)) for k in self.reward_keys}
        self.negative_defaults = {k: float(s.negative_reward_targets.get(k, 0.0)) for k in self.reward_keys}
        self.guidance, self.steps = float(s.guidance_scale), int(s.num_steps)

    @torch.no_grad()
    def generate(self, prompt: str, positive: Dict[str, float], negative: Dict[str, float], guidance: float,
                 steps: int, seed: int, best_of: int = 1, select: Optional[str] = None) -> Tuple[Image.Image, str]:
        """(the image, a line saying how it was made)."""
        from torchvision.transforms.functional import to_pil_image

        if not prompt.strip():
            raise ValueError("enter a prompt")
        kwargs = dict(reward_targets=positive, negative_reward_targets=negative, guidance_scale=float(guidance),
                      num_inference_steps=int(steps))
        info = f"seed {int(seed)}, {int(steps)} steps, guidance {float(guidance):g}"
        if best_of > 1:
            if select not in self.select_keys:
                raise ValueError(f"best-of-{best_of} needs a reward to select on, one of {self.select_keys}")
            from miro_scale.evaluation.search import best_of_n_search

            result = best_of_n_search(self.pipe, [prompt], self.evaluator, int(best_of), select, seed=int(seed),
                                      **kwargs)
            image = result.images[0]
            scores = ", ".join(f"{k} {v[0]:.3f}" for k, v in result.chosen_scores().items())
            info += f"; best of {int(best_of)} by {select}: candidate {int(result.chosen[0])} ({scores})"
        else:
            generator = torch.Generator(self.pipe.device).manual_seed(int(seed))
            image = self.pipe(prompt, generator=generator, output_type="pt", **kwargs)[0]
        pil = to_pil_image(image.float().cpu().clamp(0, 1))
        if max(pil.size) < DISPLAY_SIDE:
            factor = DISPLAY_SIDE // max(pil.size)
            pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
        return pil, info


def build_app(demo: DemoModel, title: str = "MIRO", max_best_of: int = 16):
    """The Gradio page. Element ids: prompt, s_plus_<key>, s_minus_<key>, guidance, steps, seed,
    best_of, select, generate, image, info."""
    import gradio as gr

    keys = demo.reward_keys
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nReward dials: s+ is what the image should score (0 to 1, in the training "
                    "data's bins), s- what guidance steers away from.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**s+** (positive targets)")
                        plus = [gr.Slider(0, 1, demo.positive_defaults[k], step=0.05, label=k, elem_id=f"s_plus_{k}")
                                for k in keys]
                    with gr.Column():
                        gr.Markdown("**s-** (negative targets)")
                        minus = [gr.Slider(0, 1, demo.negative_defaults[k], step=0.05, label=k, elem_id=f"s_minus_{k}")
                                 for k in keys]
                guidance = gr.Slider(0, 15, demo.guidance, step=0.5, label="guidance", elem_id="guidance")
                steps = gr.Slider(1, 100, demo.steps, step=1, label="steps", elem_id="steps")
                seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                with gr.Row(visible=bool(demo.select_keys)):
                    best_of = gr.Slider(1, max_best_of, 1, step=1, label="best of N", elem_id="best_of")
                    select = gr.Dropdown(demo.select_keys, value=demo.select_keys[0] if demo.select_keys else None,
                                         label="select on", elem_id="select")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(label="image", type="pil", format="png", elem_id="image")
                info = gr.Textbox(label="settings", interactive=False, elem_id="info")

        def run(text, guidance_value, steps_value, seed_value, n, select_key, *dials):
            try:
                return demo.generate(text, dict(zip(keys, dials[:len(keys)])), dict(zip(keys, dials[len(keys):])),
                                     guidance_value, steps_value, seed_value or 0, int(n), select_key)
            except (KeyError, ValueError) as e:  # an empty prompt, a target the model refuses
                raise gr.Error(str(e.args[0])) from None

        button.click(run, [prompt, guidance, steps, seed, best_of, select, *plus, *minus], [image, info])
    return app


__all__ = ["DemoModel", "build_app", "default_select_rewards", "pixel_reward_keys"]
