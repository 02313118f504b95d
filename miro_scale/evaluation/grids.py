"""Sample grids of reward settings: rows are prompts, columns are (s+, s-, seed) settings.

The paper's settings, as column lists:
- isolation_columns: for each reward j, s+ = 1 and s- = 1 except s-_j = 0 (guidance points purely
  toward reward j), then "all" with s- = 0 (Fig. 9)
- interpolation_columns: s+ = 1, s- = 1 except s-_A = t and s-_B = 1 - t, t from 0 to 1 (pairwise
  exploration of two rewards)
- sweep_columns: one reward's positive target from 0 to 1, the rest as given (Fig. 12)
- seed_columns: one setting, one column per seed

generate_grid runs every (prompt, column) pair through MiroPipeline in chunks of ``batch_size``
images, each chunk one batched call with per-image reward targets. Column c's noise for prompt i is
row i of the [P, ...] draw from a generator seeded with the column's seed (what
``pipe(prompts, generator=manual_seed(seed))`` draws), so columns of one seed differ only in their
rewards and the result does not depend on the batch size. labelled_grid writes the PNG: the tiles
at full resolution, prompts on the left, column labels on top.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torchvision.utils import make_grid


@dataclass(frozen=True)
class Column:
    label: str
    positive: Dict[str, float] = field(default_factory=dict)  # s+ per reward key (the model's default elsewhere)
    negative: Dict[str, float] = field(default_factory=dict)  # s- per reward key
    seed: int = 0


def short(key: str) -> str:
    return key.removesuffix("_score")


def isolation_columns(keys: Sequence[str], seed: int = 0) -> List[Column]:
    ones = {k: 1.0 for k in keys}
    columns = [Column(short(k), dict(ones), {**ones, k: 0.0}, seed) for k in keys]
    return columns + [Column("all", dict(ones), {k: 0.0 for k in keys}, seed)]


def interpolation_columns(keys: Sequence[str], key_a: str, key_b: str, points: int, seed: int = 0) -> List[Column]:
    for key in (key_a, key_b):
        if key not in keys:
            raise KeyError(f"{key!r} is not among the model's reward keys {list(keys)}")
    if key_a == key_b or points < 2:
        raise ValueError(f"interpolation needs two different rewards and >= 2 points, got {key_a}, {key_b}, {points}")
    ones = {k: 1.0 for k in keys}
    columns = []
    for i in range(points):
        t = i / (points - 1)
        columns.append(Column(f"s- {short(key_a)}={t:.2g} {short(key_b)}={1 - t:.2g}", dict(ones),
                              {**ones, key_a: t, key_b: 1.0 - t}, seed))
    return columns


def sweep_columns(key: str, points: int, positive: Optional[Mapping[str, float]] = None,
                  negative: Optional[Mapping[str, float]] = None, seed: int = 0) -> List[Column]:
    if points < 2:
        raise ValueError(f"a sweep needs >= 2 points, got {points}")
    return [Column(f"s+ {short(key)}={i / (points - 1):.3g}", {**(positive or {}), key: i / (points - 1)},
                   dict(negative or {}), seed) for i in range(points)]


def seed_columns(seeds: Sequence[int], positive: Optional[Mapping[str, float]] = None,
                 negative: Optional[Mapping[str, float]] = None) -> List[Column]:
    return [Column(f"seed {s}", dict(positive or {}), dict(negative or {}), s) for s in seeds]


def prompt_noise(pipe, num_prompts: int, seed: int) -> torch.Tensor:
    """The starting noise MiroPipeline draws for ``num_prompts`` prompts from ``manual_seed(seed)``."""
    m = pipe.cfg.model
    g = torch.Generator(pipe.device).manual_seed(seed)
    return torch.randn((num_prompts, m.latent_channels, m.latent_size, m.latent_size), generator=g,
                       device=pipe.device, dtype=torch.float32)


@torch.no_grad()
def generate_grid(pipe, prompts: Sequence[str], columns: Sequence[Column], *, batch_size: int = 16,
                  progress: bool = False, **sample_kwargs) -> torch.Tensor:
    """[P, C, 3, H, W] in [0, 1]; ``sample_kwargs`` go to the pipeline (guidance_scale, solver...)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    noise = {s: prompt_noise(pipe, len(prompts), s) for s in sorted({c.seed for c in columns})}
    pairs = [(i, c) for i in range(len(prompts)) for c in range(len(columns))]
    out: Optional[torch.Tensor] = None
    for start in tqdm(range(0, len(pairs), batch_size), desc="sample", unit="batch", disable=not progress):
        chunk = pairs[start:start + batch_size]
        images = pipe([prompts[i] for i, _ in chunk], reward_targets=[columns[c].positive for _, c in chunk],
                      negative_reward_targets=[columns[c].negative for _, c in chunk],
                      latents=torch.stack([noise[columns[c].seed][i] for i, c in chunk]), output_type="pt",
                      **sample_kwargs).float().cpu()
        if out is None:
            out = torch.empty(len(prompts), len(columns), *images.shape[1:])
        for (i, c), image in zip(chunk, images):
            out[i, c] = image
    return out


def labelled_grid(images: torch.Tensor, path: Path, row_labels: Sequence[str], column_labels: Sequence[str],
                  padding: int = 2, label_width: int = 160, line_height: int = 12) -> Path:
    """images [R, C, 3, H, W] in [0, 1] -> a PNG: make_grid's tiles (H x W each, ``padding`` apart) with
    ``label_width`` pixels of wrapped row labels on the left and a header of column labels on top."""
    from PIL import Image, ImageDraw, ImageFont

    r, c, _, h, w = images.shape
    if len(row_labels) != r or len(column_labels) != c:
        raise ValueError(f"{len(row_labels)} row and {len(column_labels)} column labels for a {r} x {c} grid")
    tiles = make_grid(images.flatten(0, 1), nrow=c, padding=padding, pad_value=1.0)
    tiles = Image.fromarray((tiles.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    chars = max(4, (w + padding) // 6)  # the default font is about 6 px per character
    heads = [textwrap.wrap(label, chars) or [""] for label in column_labels]
    header = line_height * max(len(lines) for lines in heads) + padding
    canvas = Image.new("RGB", (label_width + tiles.width, header + tiles.height), "white")
    canvas.paste(tiles, (label_width, header))
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(heads):
        for k, line in enumerate(lines):
            draw.text((label_width + padding + j * (w + padding), k * line_height), line, fill="black", font=font)
    for i, label in enumerate(row_labels):
        lines = textwrap.wrap(label, max(4, label_width // 6 - 1))[: max(1, (h + padding) // line_height)]
        for k, line in enumerate(lines):
            draw.text((2, header + padding + i * (h + padding) + k * line_height), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

