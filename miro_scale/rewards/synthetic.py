"""Pixel-based rewards for the synthetic shapes world (no weights, CPU, deterministic).

caption_alignment_score  parses the caption into object phrases ("two red circles") and spatial
                         relations ("a blue square left of a green triangle"), detects coloured
                         shapes in the pixels and returns the fraction of requirements met, in [0, 1]
                         (NaN when the caption names no shape).
sharpness_score          log1p(variance of the Laplacian of luminance, 0-255 scale)
contrast_score           RMS contrast: std of luminance in [0, 1]
colourfulness_score      Hasler & Suesstrunk (2003) colourfulness M, 0-255 scale

Detector: the background is modelled as a per-channel plane a + b*x + c*y fitted to the border
pixels (so flat and linear-gradient backgrounds both work); pixels far from it are foreground; each
foreground pixel is labelled with its nearest named colour, connected components per colour are the
objects; a shape is classified from the radial profile r(theta) of its boundary around the centroid
(number of corners and min/max radius ratio: circle ~1, hexagon .87, pentagon .81, square .71,
triangle .5, star with 5 deep valleys).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import VIEWS, Reward

# Named colours (sRGB). The synthetic world's palette, when it exposes one, can be passed instead.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "cyan": (30, 200, 220),
    "brown": (130, 80, 35),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
COLOUR_SYNONYMS = {"grey": "gray", "violet": "purple", "magenta": "pink", "teal": "cyan"}

SHAPES = ("circle", "square", "triangle", "rectangle", "star", "hexagon", "pentagon", "ellipse", "diamond")
SHAPE_SYNONYMS = {"circles": "circle", "squares": "square", "triangles": "triangle",
                  "rectangles": "rectangle", "stars": "star", "hexagons": "hexagon",
                  "pentagons": "pentagon", "ellipses": "ellipse", "ovals": "ellipse", "oval": "ellipse",
                  "diamonds": "diamond", "disc": "circle", "discs": "circle", "disk": "circle",
                  "disks": "circle", "dot": "circle", "dots": "circle", "box": "square", "boxes": "square"}
# Shapes a detector may confuse by design (same polygon, other pose or aspect).
SHAPE_FAMILY = {"square": "quad", "rectangle": "quad", "diamond": "quad", "circle": "round", "ellipse": "round"}

NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
           "seven": 7, "eight": 8, "nine": 9, "ten": 10, "pair": 2}
RELATIONS = [
    ("to the left of", "left"), ("left of", "left"), ("on the left of", "left"),
    ("to the right of", "right"), ("right of", "right"), ("on the right of", "right"),
    ("on top of", "above"), ("above", "above"), ("over", "above"),
    ("below", "below"), ("under", "below"), ("beneath", "below"), ("underneath", "below"),
]


# ----------------------------------------------------------------------------- caption parsing
@dataclass
class Phrase:
    count: Optional[int]   # None: unspecified singular; -1: unspecified plural (>= 2)
    colour: Optional[str]
    shape: str


@dataclass
class ParsedCaption:
    phrases: List[Phrase]
    relations: List[Tuple[int, str, int]]  # (phrase index, relation, phrase index)


def _norm_shape(tok: str) -> Optional[str]:
    if tok in SHAPES:
        return tok
    return SHAPE_SYNONYMS.get(tok)


def parse_caption(caption: str, colours: Sequence[str] = tuple(COLOURS)) -> ParsedCaption:
    """Parse a shapes-world caption. Unknown words are ignored; no shape -> no phrases."""
    text = " " + re.sub(r"[^a-z0-9 ]+", " ", caption.lower()) + " "
    text = re.sub(r"\s+", " ", text)
    # mark relations with a single token so that phrase splitting sees them
    for pat, rel in sorted(RELATIONS, key=lambda r: -len(r[0])):
        text = text.replace(f" {pat} ", f" __rel_{rel}__ ")
    toks = text.split()
    colour_set = set(colours)
    phrases: List[Phrase] = []
    relations: List[Tuple[int, str, int]] = []
    pending_rel: Optional[str] = None
    count: Optional[int] = None
    colour: Optional[str] = None
    for tok in toks:
        if tok.startswith("__rel_"):
            pending_rel = tok[6:-2]
            count, colour = None, None
            continue
        if tok in NUMBERS:
            count = NUMBERS[tok]
            continue
        if tok.isdigit():
            count = int(tok)
            continue
        c = COLOUR_SYNONYMS.get(tok, tok)
        if c in colour_set:
            colour = c
            continue
        shape = _norm_shape(tok)
        if shape is not None:
            plural = tok != shape and tok not in ("disc", "disk", "dot", "box", "oval")
            n = count if count is not None else (-1 if plural else None)
            phrases.append(Phrase(n, colour, shape))
            if pending_rel is not None and len(phrases) >= 2:
                relations.append((len(phrases) - 2, pending_rel, len(phrases) - 1))
            pending_rel = None
            count, colour = None, None
            continue
        if tok in ("and", "with", "next", "to", "of", "the", "photo", "image", "picture"):
            if tok == "and":
                count, colour = None, None
    return ParsedCaption(phrases, relations)


# ----------------------------------------------------------------------------- detection
@dataclass
class Detection:
    colour: str
    shape: str
    cx: float  # centroid, fraction of width
    cy: float  # centroid, fraction of height
    area: float  # fraction of image area


def _background_model(img: np.ndarray) -> np.ndarray:
    """Fit rgb = a + b*x + c*y on the border pixels (robustly: two passes dropping outliers)."""
    h, w, _ = img.shape
    b = max(1, min(h, w) // 64)
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), bool)
    border[:b] = border[-b:] = True
    border[:, :b] = border[:, -b:] = True
    X = np.stack([np.ones(border.sum()), xs[border] / w, ys[border] / h], 1)
    Y = img[border].astype(np.float64)
    keep = np.ones(len(Y), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(X[keep], Y[keep], rcond=None)
        resid = np.linalg.norm(Y - X @ coef, axis=1)
        thr = max(8.0, 3 * np.median(resid[keep]) + 1e-6)
        keep = resid < thr
        if keep.sum() < 8:
            keep[:] = True
            break
    full = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], 1) @ coef
    return full.reshape(h, w, 3)


def _label(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    try:
        from scipy import ndimage
        return ndimage.label(mask)
    except ImportError:  # pragma: no cover - fallback without scipy: min-label propagation in torch
        m = torch.from_numpy(mask)
        h, w = mask.shape
        big = h * w + 1
        lab = torch.where(m, torch.arange(h * w, dtype=torch.float32).view(h, w) + 1, torch.full((h, w), float(big)))
        while True:
            new = -torch.nn.functional.max_pool2d(-lab[None, None], 3, 1, 1)[0, 0]
            new = torch.where(m, torch.minimum(new, lab), lab)
            if torch.equal(new, lab):
                break
            lab = new
        lab = torch.where(m, lab, torch.zeros_like(lab))
        uniq = torch.unique(lab[m])
        out = torch.zeros(h, w, dtype=torch.int64)
        for i, u in enumerate(uniq.tolist()):
            out[lab == u] = i + 1
        return out.numpy(), len(uniq)


def _count_peaks(r: np.ndarray, prominence: float) -> int:
    n = len(r)
    peaks = 0
    for i in range(n):
        if r[i] >= r[i - 1] and r[i] > r[(i + 1) % n]:
            # prominence: drop to the lowest point before reaching a higher peak, both directions
            lo_l, lo_r = r[i], r[i]
            for k in range(1, n // 2):
                v = r[(i - k) % n]
                if v > r[i]:
                    break
                lo_l = min(lo_l, v)
            for k in range(1, n // 2):
                v = r[(i + k) % n]
                if v > r[i]:
                    break
                lo_r = min(lo_r, v)
            if r[i] - max(lo_l, lo_r) >= prominence:
                peaks += 1
    return peaks


def classify_shape(mask: np.ndarray) -> str:
    """Name the shape of one connected binary mask."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    # boundary pixels: in the mask with a 4-neighbour outside
    pad = np.pad(mask, 1)
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inner)
    ang = np.arctan2(by - cy, bx - cx)
    dist = np.hypot(by - cy, bx - cx) + 0.5
    nb = 72
    idx = ((ang + math.pi) / (2 * math.pi) * nb).astype(int) % nb
    r = np.zeros(nb)
    np.maximum.at(r, idx, dist)
    # fill empty angle bins (tiny shapes) by circular interpolation
    if (r == 0).any():
        good = np.nonzero(r > 0)[0]
        r = np.interp(np.arange(nb), good, r[good], period=nb)
    r = (r + np.roll(r, 1) + np.roll(r, -1)) / 3  # light smoothing
    r = r / r.max()
    ratio = r.min()
    # second moments: elongation
    cov = np.cov(np.stack([xs - cx, ys - cy]))
    ev = np.sort(np.linalg.eigvalsh(cov))
    elong = math.sqrt(ev[1] / max(ev[0], 1e-9))
    area = len(xs)
    bbox_fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    if ratio > 0.9:
        return "circle"
    peaks = _count_peaks(r, prominence=max(0.03, 0.35 * (1 - ratio)))
    if elong > 1.35:
        if peaks == 2 or (bbox_fill > 0.7 and bbox_fill < 0.83 and peaks not in (3, 4)):
            return "ellipse"
        if peaks == 4 or bbox_fill > 0.85:
            return "rectangle"
        if peaks == 3:
            return "triangle"
    if peaks >= 5 and ratio < 0.62:
        return "star"
    if peaks == 3 or (ratio < 0.6 and peaks < 5):
        return "triangle"
    if peaks == 4:
        # square vs diamond: are the corners on the axes (diamond) or the diagonals (square)?
        return "square" if bbox_fill > 0.75 else "diamond"
    if peaks == 5:
        return "pentagon"
    if peaks == 6:
        return "hexagon"
    # fall back on the radius ratio of regular polygons
    table = {"triangle": 0.5, "square": 0.707, "pentagon": 0.809, "hexagon": 0.866, "circle": 1.0}
    return min(table, key=lambda k: abs(table[k] - ratio))


def detect_objects(img: np.ndarray, colours: Optional[Dict[str, Tuple[int, int, int]]] = None,
                   min_area: float = 0.0015, max_side: int = 256) -> List[Detection]:
    """Detect coloured shapes in an RGB uint8 image (H, W, 3)."""
    colours = colours or COLOURS
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"detect_objects: expected HxWx3 uint8, got shape {img.shape}")
    h, w, _ = img.shape
    step = max(1, int(math.ceil(max(h, w) / max_side)))
    if step > 1:  # box-free subsample: nearest pixels keep colours pure
        img = img[::step, ::step]
        h, w, _ = img.shape
    f = img.astype(np.float64)
    bg = _background_model(f)
    fg = np.linalg.norm(f - bg, axis=2) > 40.0
    names = list(colours)
    pal = np.array([colours[n] for n in names], dtype=np.float64)
    d = np.linalg.norm(f[:, :, None, :] - pal[None, None], axis=3)  # H W K
    lab = d.argmin(2)
    # a colour equal to the background cannot be seen: those pixels stay background
    mean_bg = bg.reshape(-1, 3).mean(0)
    bg_like = np.linalg.norm(pal - mean_bg, axis=1) < 40.0
    dets: List[Detection] = []
    total = h * w
    for k, name in enumerate(names):
        if bg_like[k]:
            continue
        m = fg & (lab == k)
        if m.sum() < max(6, min_area * total):
            continue
        comp, n = _label(m)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        for ci in range(1, n + 1):
            if sizes[ci] < max(6, min_area * total):
                continue
            cm = comp == ci
            ys, xs = np.nonzero(cm)
            sub = cm[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            dets.append(Detection(name, classify_shape(sub), float(xs.mean() / w), float(ys.mean() / h),
                                  float(sizes[ci] / total)))
    return dets


# ----------------------------------------------------------------------------- alignment
def _shape_match(det: str, want: str, strict: bool) -> bool:
    if det == want:
        return True
    if strict:
        return False
    fam = SHAPE_FAMILY.get(want)
    return fam is not None and SHAPE_FAMILY.get(det) == fam


def alignment_score(caption: str, dets: List[Detection], colours: Sequence[str] = tuple(COLOURS),
                    margin: float = 0.02) -> float:
    """Fraction of the caption's requirements the detections satisfy; NaN if no shape is named.

    Per object phrase: 0.25 if the shape is present (any colour), 0.25 if present in the named
    colour, 0.5 * count agreement (min/max of detected and wanted counts; 'a'/unspecified singular
    wants exactly 1, an unspecified plural wants >= 2). Per relation: 1 if some pair of matching
    objects satisfies it by centroid (margin as a fraction of the image). The mean of the terms.
    A square/rectangle/diamond or circle/ellipse confusion earns half credit on the shape terms.
    """
    parsed = parse_caption(caption, colours)
    if not parsed.phrases:
        return float("nan")
    terms: List[float] = []
    matched: List[List[Detection]] = []
    for p in parsed.phrases:
        exact_shape = [d for d in dets if d.shape == p.shape]
        near_shape = [d for d in dets if _shape_match(d.shape, p.shape, strict=False)]
        col = (lambda ds: [d for d in ds if p.colour is None or d.colour == p.colour])
        exact = col(exact_shape)
        near = col(near_shape)
        t = 0.25 if exact_shape else (0.125 if near_shape else 0.0)
        t += 0.25 if exact else (0.125 if near else 0.0)
        n = len(exact) if exact else len(near) * 0.5
        if p.count == -1:
            cnt = 1.0 if len(exact) >= 2 else (0.5 if len(exact) == 1 else 0.0)
        else:
            want = p.count if p.count is not None else 1
            have = len(exact)
            cnt = min(have, want) / max(have, want) if max(have, want) > 0 else 1.0
            if not exact and near:
                cnt = 0.5 * min(len(near), want) / max(len(near), want)
        t += 0.5 * cnt
        terms.append(t)
        matched.append(exact or near)
    for a, rel, b in parsed.relations:
        ok = 0.0
        for da in matched[a]:
            for db in matched[b]:
                if da is db:
                    continue
                if rel == "left" and da.cx < db.cx - margin:
                    ok = 1.0
                elif rel == "right" and da.cx > db.cx + margin:
                    ok = 1.0
                elif rel == "above" and da.cy < db.cy - margin:
                    ok = 1.0
                elif rel == "below" and da.cy > db.cy + margin:
                    ok = 1.0
        terms.append(ok)
    return float(np.mean(terms))


# ----------------------------------------------------------------------------- pixel statistics
def _luma(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def sharpness(img: np.ndarray) -> float:
    y = _luma(img)
    if min(y.shape) < 3:
        return 0.0
    lap = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1])
    return float(np.log1p(lap.var()))


def contrast(img: np.ndarray) -> float:
    return float((_luma(img) / 255.0).std())


def colourfulness(img: np.ndarray) -> float:
    f = img.astype(np.float64)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


class _PixelReward(Reward):
    view = VIEWS["pixels"]
    needs_text = False
    batch_size = 64
    model_id = "pixel-statistics-v1"
    fn = None

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device("cpu"), torch.float32

    @torch.no_grad()
    def score(self, images, captions=None):
        return torch.tensor([type(self).fn(im) for im in images], dtype=torch.float32)


class SharpnessReward(_PixelReward):
    key = "sharpness_score"
    fn = staticmethod(sharpness)


class ContrastReward(_PixelReward):
    key = "contrast_score"
    fn = staticmethod(contrast)


class ColourfulnessReward(_PixelReward):
    key = "colourfulness_score"
    fn = staticmethod(colourfulness)


class CaptionAlignmentReward(Reward):
    key = "caption_alignment_score"
    view = VIEWS["pixels"]
    needs_text = True
    batch_size = 64
    model_id = "shape-detector-v1"

    def __init__(self, device="cpu", dtype=torch.float32, colours: Optional[Dict[str, Tuple[int, int, int]]] = None):
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.colours = dict(colours or COLOURS)

    def encode_images(self, images):
        return [detect_objects(im, self.colours) for im in images]

    def score_features(self, features, captions):
        if captions is None:
            raise ValueError(f"{self.key}: captions are required")
        return torch.tensor([alignment_score(c, d, tuple(self.colours)) for d, c in zip(features, captions)],
                            dtype=torch.float32)
