"""A synthetic image-text world: procedural shapes with captions in GenEval's categories.

Each sample is a scene graph (background, objects with shape, colour, position and size, and at most
one spatial relation), rendered with 4x supersampling, captioned from the graph in one of GenEval's
six categories, then perhaps *mismatched* (the caption's colour, count, position or object changed)
and perhaps *degraded* (blur, noise, low contrast, JPEG artefacts). Both happen at controlled rates
with random severities, so pixel-based rewards spread over a range the way they do on web data.

Captions follow GenEval's templates:

=============  =================================================
single_object  a photo of a circle
two_object     a photo of a circle and a star
counting       a photo of three triangles
colors         a photo of a red circle
position       a photo of a star left of a square   (left of / right of / above / below)
color_attr     a photo of a red circle and a blue star
=============  =================================================

Everything is stored in the sample's json (img2dataset fields plus ``tag``, ``scene``,
``corruption``, ``mismatch``, ``caption_matches``, ``captions`` {short, long}, ``world``) so that
reward models and tests can check the pixels against the graph. A sample depends only on
``(seed, index)``: shard size and worker count do not change it. Images are 64 px by default (any
size >= 16 works; 32 and 128 are the other tested sizes).

CLI (img2dataset-style shards ``00000.tar`` ... with DALI ``.idx`` files and ``manifest.json``)::

    python -m miro_scale.synthetic.world --out DIR --num-samples N --shard-size K \
        --resolution 64 --seed 0 [--mismatch-rate 0.25] [--degrade-rate 0.3] [--workers 2] [--vocabulary simple]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# GenEval's ten colours (sRGB); miro_scale.synthetic.rewards' detector uses this palette too.
PALETTE = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "brown": (130, 80, 35),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "rectangle", "star", "hexagon", "pentagon", "ellipse", "diamond")
PLURALS = {s: (s + "s") for s in SHAPES}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TAG_WEIGHTS = (0.15, 0.15, 0.2, 0.15, 0.2, 0.15)
DEGRADATIONS = ("blur", "noise", "low_contrast", "jpeg")
BACKGROUNDS = ("flat", "gradient", "texture")
BACKGROUND_WEIGHTS = (0.4, 0.4, 0.2)
WORLD_VERSION = 1


@dataclass(frozen=True)
class Vocabulary:
    """What a world draws and says: its shapes, colours, caption categories (with their weights) and
    a scale on object sizes. The default is the full world; a smaller one is easier to learn."""

    shapes: tuple = SHAPES
    colours: tuple = COLOURS
    tags: tuple = TAGS
    tag_weights: tuple = TAG_WEIGHTS
    size_scale: float = 1.0
    backgrounds: tuple = BACKGROUNDS

    def __post_init__(self):
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS)) | (set(self.tags) - set(TAGS))
        if unknown:
            raise ValueError(f"vocabulary: unknown shapes, colours or tags {sorted(unknown)}")
        if len(self.shapes) < 3 or len(self.colours) < 3:
            raise ValueError("vocabulary: at least 3 shapes and 3 colours (two-object scenes and mismatches)")
        if len(self.tag_weights) != len(self.tags) or min(self.tag_weights) <= 0:
            raise ValueError("vocabulary: one positive weight per tag")
        if not 0.5 <= self.size_scale <= 1.6:
            raise ValueError(f"vocabulary: size_scale must be in [0.5, 1.6], got {self.size_scale}")
        if not self.backgrounds or set(self.backgrounds) - set(BACKGROUNDS):
            raise ValueError(f"vocabulary: backgrounds must be some of {BACKGROUNDS}, got {self.backgrounds}")

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.tag_weights, np.float64)
        return w / w.sum()

    def settings(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# Named worlds. "full": every shape, colour and GenEval category (the default). "simple": four
# shapes and five saturated colours, one or two large objects on plain backgrounds: a CPU can learn
# to draw it in minutes.
VOCABULARIES = {
    "full": Vocabulary(),
    "simple": Vocabulary(shapes=("circle", "square", "triangle", "star"),
                         colours=("red", "green", "blue", "yellow", "white"),
                         tags=("single_object", "colors", "two_object", "color_attr", "position"),
                         tag_weights=(0.15, 0.45, 0.1, 0.15, 0.15), size_scale=1.4, backgrounds=("flat",)),
}


def vocabulary(name_or_vocab) -> Vocabulary:
    if isinstance(name_or_vocab, Vocabulary):
        return name_or_vocab
    if name_or_vocab is None:
        return VOCABULARIES["full"]
    if name_or_vocab not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name_or_vocab!r}; known: {', '.join(VOCABULARIES)}")
    return VOCABULARIES[name_or_vocab]
SUPERSAMPLE = 4  # antialiasing factor at <= 128 px; less above (render cost grows with S^2)


def _supersample(res: int) -> int:
    return max(1, min(SUPERSAMPLE, 512 // res))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(phrase_words: list) -> str:
    return " ".join(phrase_words)


# ----------------------------------------------------------------------------- scene sampling
def _background(rng: np.random.Generator, kinds: tuple = BACKGROUNDS) -> dict:
    """Muted, mid-luminance backgrounds (every palette colour, black and white included, stands out)."""
    base = rng.uniform(95, 185)
    tint = rng.normal(0, 14, 3)
    rgb = np.clip(base + tint, 80, 200).round().astype(int).tolist()
    w = np.array([BACKGROUND_WEIGHTS[BACKGROUNDS.index(k)] for k in kinds])
    kind = rng.choice(list(kinds), p=w / w.sum()).item()
    bg = {"kind": kind, "rgb": rgb}
    if kind == "gradient":
        rgb2 = np.clip(np.array(rgb) + rng.normal(0, 25, 3), 80, 200).round().astype(int).tolist()
        bg.update(rgb2=rgb2, angle=float(round(rng.uniform(0, 360), 2)))
    elif kind == "texture":
        bg.update(amplitude=float(round(rng.uniform(2, 5), 2)), scale=int(rng.integers(2, 6)))
    return bg


def _place(rng, n: int, sizes: list, constraint=None, tries: int = 200):
    """Centres (fractions) for n objects of the given sizes (diameter fractions), not overlapping."""
    for _ in range(tries):
        pts = []
        for s in sizes:
            r = s / 2
            pts.append((rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)))
        ok = all(math.hypot(pts[i][0] - pts[j][0], pts[i][1] - pts[j][1]) > (sizes[i] + sizes[j]) / 2 + 0.04
                 for i in range(n) for j in range(i + 1, n))
        if ok and (constraint is None or constraint(pts)):
            return pts
    return None


def _relation_holds(rel: str, subj, obj, margin: float = 0.12) -> bool:
    dx, dy = subj[0] - obj[0], subj[1] - obj[1]  # image y grows downwards
    if rel == "left of":
        return dx < -margin and abs(dx) > abs(dy)
    if rel == "right of":
        return dx > margin and abs(dx) > abs(dy)
    if rel == "above":
        return dy < -margin and abs(dy) > abs(dx)
    return dy > margin and abs(dy) > abs(dx)


def sample_scene(rng: np.random.Generator, resolution: int, vocab: Optional[Vocabulary] = None,
                 tag: Optional[str] = None) -> tuple:
    """Returns (tag, scene); ``tag`` forces the caption category."""
    v = vocab or VOCABULARIES["full"]
    SHAPES, COLOURS, k = v.shapes, v.colours, v.size_scale  # noqa: N806 - the vocabulary's lists
    drawn = v.tags[rng.choice(len(v.tags), p=v.probabilities)]
    tag = tag or drawn
    bg = _background(rng, v.backgrounds)
    relations = []
    if tag in ("single_object", "colors"):
        shapes = [rng.choice(SHAPES).item()]
        colours = [rng.choice(COLOURS).item()]
        sizes = [min(0.8, k * rng.uniform(0.3, 0.55))]
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        shapes = [rng.choice(SHAPES).item()] * n
        same = rng.random() < 0.5
        c0 = rng.choice(COLOURS).item()
        colours = [c0 if same else rng.choice(COLOURS).item() for _ in range(n)]
        sizes = [k * (rng.uniform(0.16, 0.24) if n > 2 else rng.uniform(0.2, 0.3)) for _ in range(n)]
    else:  # two objects: two_object, position, color_attr
        s = rng.choice(len(SHAPES), 2, replace=False)
        shapes = [SHAPES[s[0]], SHAPES[s[1]]]
        if tag == "color_attr":
            c = rng.choice(len(COLOURS), 2, replace=False)
            colours = [COLOURS[c[0]], COLOURS[c[1]]]
        else:
            colours = [rng.choice(COLOURS).item(), rng.choice(COLOURS).item()]
        sizes = [k * rng.uniform(0.22, 0.34), k * rng.uniform(0.22, 0.34)]
    constraint = None
    if tag == "position":
        rel = rng.choice(RELATIONS).item()
        relations = [{"subject": 0, "relation": rel, "object": 1}]
        constraint = lambda pts: _relation_holds(rel, pts[0], pts[1])  # noqa: E731
    pts = _place(rng, len(shapes), sizes, constraint)
    while pts is None:  # shrink until it fits (rare)
        sizes = [s * 0.85 for s in sizes]
        pts = _place(rng, len(shapes), sizes, constraint)
    objects = []
    for shp, col, sz, (cx, cy) in zip(shapes, colours, sizes, pts):
        aspect = 1.0
        if shp in ("rectangle", "ellipse"):
            aspect = float(rng.uniform(0.45, 0.65))
        angle = 0.0
        if shp in ("triangle", "star", "pentagon", "hexagon"):
            angle = float(rng.uniform(-12, 12))
        if shp in ("rectangle", "ellipse") and rng.random() < 0.5:
            angle = 90.0  # tall instead of wide
        jitter = rng.integers(-8, 9, 3)
        rgb = np.clip(np.array(PALETTE[col]) + jitter, 0, 255).astype(int).tolist()
        half = sz / 2
        objects.append({"shape": shp, "color": col, "rgb": rgb, "cx": round(float(cx), 4),
                        "cy": round(float(cy), 4), "size": round(float(sz), 4), "aspect": round(aspect, 4),
                        "angle": round(angle, 2),
                        "bbox": [round(float(cx - half), 4), round(float(cy - half), 4),
                                 round(float(cx + half), 4), round(float(cy + half), 4)]})
    scene = {"width": resolution, "height": resolution, "background": bg, "objects": objects,
             "relations": relations}
    return tag, scene


# ----------------------------------------------------------------------------- captions
def caption_for(tag: str, scene: dict, overrides: dict | None = None) -> str:
    """GenEval-style caption of the scene; ``overrides`` replace parts (used for mismatches):
    ``color`` {obj index: colour}, ``shape`` {obj index: shape}, ``count`` int, ``relation`` str."""
    o = overrides or {}
    objs = scene["objects"]
    col = lambda i: o.get("color", {}).get(i, objs[i]["color"])  # noqa: E731
    shp = lambda i: o.get("shape", {}).get(i, objs[i]["shape"])  # noqa: E731
    if tag == "single_object":
        return f"a photo of {_article(shp(0))} {shp(0)}"
    if tag == "colors":
        return f"a photo of {_article(col(0))} {col(0)} {shp(0)}"
    if tag == "counting":
        n = o.get("count", len(objs))
        if n == 1:
            return f"a photo of {_article(shp(0))} {shp(0)}"
        return f"a photo of {NUMBER_WORDS.get(n, str(n))} {PLURALS[shp(0)]}"
    if tag == "two_object":
        return f"a photo of {_article(shp(0))} {shp(0)} and {_article(shp(1))} {shp(1)}"
    if tag == "color_attr":
        return (f"a photo of {_article(col(0))} {col(0)} {shp(0)} and "
                f"{_article(col(1))} {col(1)} {shp(1)}")
    if tag == "position":
        r = scene["relations"][0]
        rel = o.get("relation", r["relation"])
        s, b = r["subject"], r["object"]
        return f"a photo of {_article(shp(s))} {shp(s)} {rel} {_article(shp(b))} {shp(b)}"
    raise ValueError(f"unknown tag {tag!r}")


def _where_words(cx: float, cy: float) -> str:
    v = "top" if cy < 0.38 else ("bottom" if cy > 0.62 else "middle")
    h = "left" if cx < 0.38 else ("right" if cx > 0.62 else "centre")
    if v == "middle" and h == "centre":
        return "in the centre"
    if v == "middle":
        return f"on the {h}"
    if h == "centre":
        return f"at the {v}"
    return f"at the {v} {h}"


def long_caption(scene: dict) -> str:
    """A dense, always-true description of the scene graph."""
    bg = scene["background"]
    kind = {"flat": "plain", "gradient": "gradient", "texture": "textured"}[bg["kind"]]
    parts = [f"{_article(o['color'])} {o['color']} {o['shape']} {_where_words(o['cx'], o['cy'])}"
             for o in scene["objects"]]
    n = len(parts)
    text = (f"{NUMBER_WORDS.get(n, str(n)).capitalize()} shape{'s' if n > 1 else ''} on a {kind} "
            f"background: " + ", ".join(parts) + ".")
    for r in scene["relations"]:
        s, b = scene["objects"][r["subject"]], scene["objects"][r["object"]]
        text += f" The {s['shape']} is {r['relation']} the {b['shape']}."
    return text


def mismatch(tag: str, scene: dict, rng: np.random.Generator, vocab: Optional[Vocabulary] = None) -> tuple:
    """A wrong caption for the scene: (caption, record). The record names what was changed."""
    v = vocab or VOCABULARIES["full"]
    SHAPES, COLOURS = v.shapes, v.colours  # noqa: N806
    objs = scene["objects"]
    if tag in ("colors", "color_attr"):
        i = int(rng.integers(len(objs)))
        used = {o["color"] for o in objs}
        wrong = rng.choice([c for c in COLOURS if c not in used]).item()
        return (caption_for(tag, scene, {"color": {i: wrong}}),
                {"type": "color", "object": i, "true": objs[i]["color"], "caption": wrong})
    if tag == "counting":
        n = len(objs)
        wrong = int(rng.choice([k for k in (1, 2, 3, 4) if k != n]))
        return (caption_for(tag, scene, {"count": wrong}),
                {"type": "count", "true": n, "caption": wrong})
    if tag == "position":
        true = scene["relations"][0]["relation"]
        return (caption_for(tag, scene, {"relation": OPPOSITE[true]}),
                {"type": "position", "true": true, "caption": OPPOSITE[true]})
    # single_object / two_object: name a shape that is not in the picture
    i = int(rng.integers(len(objs)))
    used = {o["shape"] for o in objs}
    wrong = rng.choice([s for s in SHAPES if s not in used]).item()
    return (caption_for(tag, scene, {"shape": {i: wrong}}),
            {"type": "object", "object": i, "true": objs[i]["shape"], "caption": wrong})


# ----------------------------------------------------------------------------- rendering
def _shape_points(shape: str, cx: float, cy: float, r: float, aspect: float, angle: float) -> list:
    def poly(k, start=-90.0, radii=None):
        pts = []
        for j in range(k):
            rad = r if radii is None else radii[j % len(radii)]
            t = math.radians(start + angle + 360.0 * j / k)
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
        return pts

    if shape == "triangle":
        return poly(3)
    if shape == "pentagon":
        return poly(5)
    if shape == "hexagon":
        return poly(6, start=0.0)
    if shape == "star":
        return poly(10, radii=[r, r * 0.45])
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "rectangle":
        hw, hh = r * 0.95, r * 0.95 * aspect
        if angle == 90.0:
            hw, hh = hh, hw
        return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
    raise ValueError(shape)


def render_scene(scene: dict, rng: np.random.Generator) -> Image.Image:
    """Render the clean image (RGB, scene's resolution)."""
    res = scene["width"]
    S = res * _supersample(res)
    bg = scene["background"]
    if bg["kind"] == "gradient":
        t = math.radians(bg["angle"])
        ys, xs = np.mgrid[0:S, 0:S] / (S - 1)
        u = (xs - 0.5) * math.cos(t) + (ys - 0.5) * math.sin(t)
        u = (u - u.min()) / max(u.max() - u.min(), 1e-6)
        a = np.array(bg["rgb"], np.float32) * (1 - u[..., None]) + np.array(bg["rgb2"], np.float32) * u[..., None]
    else:
        a = np.broadcast_to(np.array(bg["rgb"], np.float32), (S, S, 3)).copy()
    if bg["kind"] == "texture":
        cells = max(2, res // bg["scale"])
        noise = rng.normal(0, bg["amplitude"], (cells, cells, 1)).astype(np.float32)
        noise = np.asarray(Image.fromarray(noise[..., 0]).resize((S, S), Image.BICUBIC))[..., None]
        a = a + noise
    im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for o in scene["objects"]:
        cx, cy, r = o["cx"] * S, o["cy"] * S, o["size"] * S / 2
        fill = tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "ellipse":
            rx, ry = r, r * o["aspect"]
            if o["angle"] == 90.0:
                rx, ry = ry, rx
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            draw.polygon(_shape_points(o["shape"], cx, cy, r, o["aspect"], o["angle"]), fill=fill)
    return im.resize((res, res), Image.LANCZOS)


def degrade(im: Image.Image, rng: np.random.Generator) -> tuple:
    """Apply one random degradation; returns (image, record, jpeg quality or None)."""
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    res = im.size[0]
    if kind == "blur":
        radius = float(round(rng.uniform(0.6, 2.5) * res / 64, 3))
        return im.filter(ImageFilter.GaussianBlur(radius)), {"type": "blur", "radius": radius}, None
    if kind == "noise":
        sigma = float(round(rng.uniform(8, 45), 2))
        a = np.asarray(im, np.float32) + rng.normal(0, sigma, (res, res, 3)).astype(np.float32)
        return (Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB"),
                {"type": "noise", "sigma": sigma}, None)
    if kind == "low_contrast":
        factor = float(round(rng.uniform(0.15, 0.55), 3))
        a = np.asarray(im, np.float32)
        m = a.mean(axis=(0, 1), keepdims=True)
        return (Image.fromarray(np.clip(m + (a - m) * factor + 0.5, 0, 255).astype(np.uint8), "RGB"),
                {"type": "low_contrast", "factor": factor}, None)
    quality = int(rng.integers(3, 16))
    return im, {"type": "jpeg", "quality": quality}, quality


def make_sample(index: int, seed: int = 0, resolution: int = 64, mismatch_rate: float = 0.25,
                degrade_rate: float = 0.3, image_format: str = "jpg", vocab=None) -> tuple:
    """Sample ``index`` of the world ``seed``: ``(key, {"jpg"|"png": bytes, "txt": str, "json": dict})``.
    ``vocab``: a Vocabulary or the name of one (default "full")."""
    vocab = vocabulary(vocab)
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    rng = np.random.default_rng([int(seed), int(index), WORLD_VERSION])
    tag, scene = sample_scene(rng, resolution, vocab)
    true_caption = caption_for(tag, scene)
    mis = None
    caption = true_caption
    if rng.random() < mismatch_rate:
        caption, mis = mismatch(tag, scene, rng, vocab)
        mis["true_caption"] = true_caption
    im = render_scene(scene, rng)
    corruption = []
    quality = None
    if rng.random() < degrade_rate:
        im, rec, quality = degrade(im, rng)
        corruption.append(rec)
    buf = io.BytesIO()
    if image_format == "jpg":
        im.save(buf, "JPEG", quality=quality or 95, subsampling=0 if quality is None else 2)
    else:
        if quality is not None:  # JPEG artefacts in a PNG: round-trip through JPEG first
            tmp = io.BytesIO()
            im.save(tmp, "JPEG", quality=quality)
            im = Image.open(io.BytesIO(tmp.getvalue())).convert("RGB")
        im.save(buf, "PNG", optimize=False)
    data = buf.getvalue()
    key = f"{index:09d}"
    meta = {
        "key": key, "status": "success", "caption": caption,
        "url": f"synthetic://shapes/v{WORLD_VERSION}/seed={seed}/{index}",
        "width": resolution, "height": resolution,
        "original_width": resolution, "original_height": resolution,
        "exif": None, "sha256": hashlib.sha256(data).hexdigest(), "error_message": None,
        "tag": tag, "scene": scene, "corruption": corruption, "mismatch": mis,
        "caption_matches": mis is None,
        "captions": {"short": true_caption, "long": long_caption(scene)},
        "world": {"version": WORLD_VERSION, "seed": int(seed), "index": int(index)},
    }
    return key, {image_format: data, "txt": caption, "json": meta}


def evaluation_prompts(count: int, seed: int = 0, vocab=None, resolution: int = 64) -> list:
    """``count`` true captions of fresh scenes (not the training samples of any seed), the world's
    categories in turn: GenEval-like prompts, as :class:`miro_scale.evaluation.prompts.Prompt` with
    ``tag`` (the category) and ``scene`` in their metadata."""
    from miro_scale.evaluation.prompts import Prompt

    vocab = vocabulary(vocab)
    prompts = []
    for i in range(count):
        rng = np.random.default_rng([int(seed), int(i), WORLD_VERSION, 0xE7A1])
        tag, scene = sample_scene(rng, resolution, vocab, tag=vocab.tags[i % len(vocab.tags)])
        prompts.append(Prompt(caption_for(tag, scene), {"tag": tag, "scene": scene}))
    return prompts


def _make(args):
    return make_sample(*args)


def generate(out_dir: str, num_samples: int, shard_size: int = 1000, resolution: int = 64, seed: int = 0,
             mismatch_rate: float = 0.25, degrade_rate: float = 0.3, image_format: str = "jpg",
             workers: int = 1, start_index: int = 0, progress: bool = True, resume: bool = True,
             vocab=None) -> list:
    """Write ``num_samples`` samples (indices ``start_index + i``) as shards of ``shard_size`` into
    ``out_dir``; returns the manifest entries of all its shards. Identical output for any
    ``workers``. With ``resume``, shards that manifest.json already lists with the right sample count
    and keys for the same world settings are kept (skip-if-done), so an interrupted run continues.
    ``vocab``: a Vocabulary or the name of one (default "full")."""
    from miro_scale.data.writer import ShardWriter, keys_digest, read_manifest

    vocab = vocabulary(vocab)
    settings = {"version": WORLD_VERSION, "seed": seed, "resolution": resolution,
                "mismatch_rate": mismatch_rate, "degrade_rate": degrade_rate, "image_format": image_format}
    if vocab != VOCABULARIES["full"]:
        settings["vocabulary"] = vocab.settings()
    extra = {"synthetic_world": settings}
    man = read_manifest(out_dir) if os.path.isdir(out_dir) else None
    if man is not None and man.get("synthetic_world") not in (None, settings):
        raise ValueError(f"{out_dir}: manifest.json holds a synthetic world with settings "
                         f"{man.get('synthetic_world')}, not {settings}; use another --out")
    done = {e["name"]: e for e in (man or {}).get("shards", [])} if resume else {}
    todo = []  # (shard number, first index, count)
    for k, a in enumerate(range(0, num_samples, shard_size)):
        n = min(shard_size, num_samples - a)
        name = f"{k:05d}.tar"
        keys = [f"{start_index + a + i:09d}" for i in range(n)]
        e = done.get(name)
        if (e is not None and e["num_samples"] == n and e["keys_sha256"] == keys_digest(keys)
                and os.path.exists(os.path.join(out_dir, name))):
            continue
        todo.append((k, a, n))
    total = sum(n for _, _, n in todo)
    tasks: Iterable = ((start_index + a + i, seed, resolution, mismatch_rate, degrade_rate, image_format, vocab)
                       for _, a, n in todo for i in range(n))
    pool = None
    if workers > 1 and total:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers)
        results = pool.imap(_make, tasks, chunksize=16)
    else:
        results = map(_make, tasks)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=total, desc="synthetic world", unit="img")
    try:
        results = iter(results)
        for k, a, n in todo:
            with ShardWriter(out_dir, max_samples=shard_size, start_shard=k, manifest_extra=extra) as w:
                for _ in range(n):
                    key, members = next(results)
                    w.write(key, members)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if not todo and man is None:
        return []
    return (read_manifest(out_dir) or {}).get("shards", [])


def ensure_world(out_dir: str, num_samples: int = 10_000, resolution: int = 64, seed: int = 0,
                 shard_size: int = 1000, workers: int | None = None, **kw) -> str:
    """The embedded default dataset: make sure ``out_dir`` holds this synthetic world (generating or
    completing it if needed) and return ``out_dir`` for the loaders."""
    generate(out_dir, num_samples, shard_size, resolution, seed,
             workers=workers or max(1, os.cpu_count() or 1), resume=True, **kw)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (32, 64, 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mismatch-rate", type=float, default=0.25, help="share of wrong captions")
    p.add_argument("--degrade-rate", type=float, default=0.3, help="share of degraded images")
    p.add_argument("--format", default="jpg", choices=["jpg", "png"])
    p.add_argument("--vocabulary", default="full", choices=list(VOCABULARIES),
                   help="full: every shape, colour and GenEval category; simple: 4 shapes, 5 colours, large objects")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--start-index", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="rewrite shards that are already complete")
    a = p.parse_args(argv)
    entries = generate(a.out, a.num_samples, a.shard_size, a.resolution, a.seed, a.mismatch_rate,
                       a.degrade_rate, a.format, a.workers, a.start_index, resume=not a.no_resume,
                       vocab=a.vocabulary)
    print(f"wrote {sum(e['num_samples'] for e in entries)} samples in {len(entries)} shards to {a.out}")


if __name__ == "__main__":
    main()
