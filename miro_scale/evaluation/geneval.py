"""GenEval (Ghosh et al., 2023): object-focused text-image alignment, the protocol of its public
``evaluation/evaluate_images.py`` with the detector and colour classifier behind small protocols.

Per image and prompt metadata ({"tag", "include": [{"class", "count", "color"?, "position"?}],
"exclude"?: [{"class", "count"}]}):

1. detections of each class scoring above a threshold (0.3; 0.9 for the counting prompts) are kept,
   best first, at most 16 per class, optionally de-duplicated by box IoU (``max_overlap``; 1: off);
2. every "include" clause needs ``count`` of its class (only the first ``count`` are looked at
   further); a "color" clause needs that many of them classified as that colour by a CLIP zero-shot
   classifier over GenEval's ten colours (three prompt templates), run on the object's mask over a
   grey (#999) background, cropped to its box; a "position" clause needs every one of them to stand
   in the relation to every object of the clause it names, by box centres once each offset is reduced
   by 0.1 x the two boxes' summed sides (the margin rule of ``relative_position``);
3. an "exclude" clause fails the image when ``count`` or more of its class are found.

An image is correct when every clause holds. Per category: the share of correct images; overall: the
mean of the six categories (the paper's Table 1).

Detectors (``Detector``: images -> every candidate detection with its score; thresholds are the
protocol's): ``TransformersDetector`` (a COCO Mask2Former or DETR-style model from transformers, by
local path or hub id) and ``SyntheticDetector`` (the synthetic world's pixel shape detector, whose
classes are its shapes and which sees colour directly). Colour classifiers: ``ClipColourClassifier``
(a transformers CLIPModel, loaded by the reward package's CLIP loader) and ``DetectedColours``.
Images in GenEval's layout: ``<root>/<index:05d>/metadata.jsonl`` (one JSON object) and
``<root>/<index:05d>/samples/<n:05d>.png``. docs/evaluation.md says how the transformers detector
relates to the mmdet Mask2Former GenEval ships.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image

# Table 1's column order
TAGS = ("single_object", "two_object", "position", "counting", "colors", "color_attr")
TAG_TITLES = {"single_object": "Single Obj.", "two_object": "Two Obj.", "position": "Position",
              "counting": "Counting", "colors": "Colors", "color_attr": "Color Attr."}
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}",
                    "a photo of a {colour} object")
# COCO label spellings of detector configs -> GenEval's class names (evaluation_metadata.jsonl)
COCO_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                "tvmonitor": "tv", "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
                "motorbike": "motorcycle", "aeroplane": "airplane", "hair dryer": "hair drier"}
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
SAMPLE_NAME = re.compile(r"\d+\.png")


@dataclass(frozen=True)
class Settings:
    """GenEval's options (evaluate_images.py --options), with its defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS box IoU; 1 keeps overlapping boxes
    position_threshold: float = 0.1
    background: str = "#999"  # what replaces the pixels outside an object's mask before colour classification
    crop: bool = True


@dataclass
class Detection:
    label: str  # a GenEval class name
    score: float
    box: Tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    mask: Optional[np.ndarray] = None  # bool [H, W] at the image's size
    colour: Optional[str] = None  # set by detectors that see colour directly


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image]) -> List[List[Detection]]: ...


class ColourClassifier(Protocol):
    def classify(self, image: Image.Image, objects: Sequence[Detection], label: str) -> List[str]: ...


# ----------------------------------------------------------------------------- the protocol
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (a box from x0 to x1 is x1 - x0 + 1 wide)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_objects(detections: Sequence[Detection], tag: str, settings: Settings = Settings()
                 ) -> Dict[str, List[Detection]]:
    """Per class, the detections above the tag's threshold, best first, capped and de-duplicated."""
    threshold = settings.counting_threshold if tag == "counting" else settings.threshold
    by_class: Dict[str, List[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold:
            by_class.setdefault(d.label, []).append(d)
    kept = {}
    for label, ranked in by_class.items():
        ranked, chosen = ranked[:settings.max_objects], []
        while ranked:
            best = ranked.pop(0)
            chosen.append(best)
            if settings.max_overlap < 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < settings.max_overlap]
        kept[label] = chosen
    return kept


def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> Set[str]:
    """Where a is relative to b: box centres, each axis' offset reduced by threshold x the summed
    sides of the two boxes; a relation holds when the reduced offset's share of the full offset's
    length exceeds 0.5 along it (image y grows downwards)."""
    boxes = np.array([a.box, b.box], np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=1)
    sides = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    reduced = np.maximum(np.abs(offset) - threshold * sides.sum(0), 0) * np.sign(offset)
    if np.all(np.abs(reduced) < 1e-3):
        return set()
    dx, dy = reduced / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def check(image: Image.Image, objects: Mapping[str, List[Detection]], metadata: Mapping,
          colours: ColourClassifier, settings: Settings = Settings()) -> Tuple[bool, List[str]]:
    """Whether the kept objects satisfy every clause of the prompt's metadata, and why not."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        label, count = req["class"], req["count"]
        found = objects.get(label, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {label}>={count}, found {len(found)}")
        if ok and "color" in req:
            named = colours.classify(image, found, label)
            if named.count(req["color"]) < count:
                ok = False
                reasons.append(f"expected {req['color']} {label}>={count}, found "
                               + ", ".join(f"{named.count(c)} {c}" for c in COLOURS if c in named))
        if ok and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {label} to be {relation}")
            else:
                for obj in found:
                    held = [relative_position(obj, t, settings.position_threshold) for t in groups[target]]
                    wrong = next((h for h in held if relation not in h), None)
                    if wrong is not None:
                        ok = False
                        found_relations = " and ".join(sorted(wrong)) or "no relation"
                        reasons.append(f"expected {label} {relation} target, found {found_relations}")
                        break
        groups.append(found if ok else None)
        correct = correct and ok
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, reasons


def evaluate_image(image: Image.Image, detections: Sequence[Detection], metadata: Mapping,
                   colours: ColourClassifier, settings: Settings = Settings()) -> Dict:
    """One results.jsonl row (GenEval's fields: metadata and details are JSON strings)."""
    objects = keep_objects(detections, metadata["tag"], settings)
    correct, reasons = check(image, objects, metadata, colours, settings)
    return {"tag": metadata["tag"], "prompt": metadata.get("prompt", ""), "correct": bool(correct),
            "reason": "\n".join(reasons), "metadata": json.dumps(dict(metadata)),
            "details": json.dumps({k: [[*map(float, d.box), d.score] for d in v] for k, v in objects.items()})}


def evaluate_images(images: Sequence[Image.Image], metadatas: Sequence[Mapping], detector: Detector,
                    colours: ColourClassifier, settings: Settings = Settings()) -> List[Dict]:
    """Rows for images with their prompts' metadata (one detector call for all of them)."""
    if len(images) != len(metadatas):
        raise ValueError(f"evaluate_images: {len(images)} images but {len(metadatas)} metadata rows")
    detections = detector.detect(images) if len(images) else []
    return [evaluate_image(im, dets, meta, colours, settings) for im, dets, meta in zip(images, detections, metadatas)]


def summarise(rows: Sequence[Mapping]) -> Dict:
    """{"categories": {tag: {"accuracy", "correct", "count"}}, "overall": mean accuracy over the
    categories present, "images": share of correct images, "prompts": share of prompts with at least
    one correct image}."""
    by_tag: Dict[str, List[bool]] = {}
    by_prompt: Dict[str, List[bool]] = {}
    for r in rows:
        by_tag.setdefault(r["tag"], []).append(bool(r["correct"]))
        by_prompt.setdefault(r["metadata"], []).append(bool(r["correct"]))
    order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    categories = {t: {"accuracy": sum(by_tag[t]) / len(by_tag[t]), "correct": sum(by_tag[t]),
                      "count": len(by_tag[t])} for t in order}
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"overall": mean([c["accuracy"] for c in categories.values()]), "categories": categories,
            "images": mean([bool(r["correct"]) for r in rows]),
            "prompts": mean([any(v) for v in by_prompt.values()]), "num_images": len(rows),
            "num_prompts": len(by_prompt)}


def table_markdown(summaries: Mapping[str, Mapping]) -> str:
    """Table 1's GenEval columns (percent) for one or more named summaries."""
    from miro_scale.evaluation.metrics import summary_table

    rows = {name: {"Overall": 100 * s["overall"],
                   **{TAG_TITLES.get(t, t): 100 * c["accuracy"] for t, c in s["categories"].items()}}
            for name, s in summaries.items()}
    keys = ["Overall"] + [TAG_TITLES[t] for t in TAGS]
    keys += sorted({k for r in rows.values() for k in r} - set(keys))
    return summary_table(rows, keys, fmt="{:.1f}")


def write_results(rows: Sequence[Mapping], out: str | Path, name: str = "model", **info) -> Dict:
    """results.jsonl (one row per image), table.json (summary and ``info``) and table.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = summarise(rows)
    clash = sorted(set(info) & set(summary) | ({"name"} & set(info)))
    if clash:
        raise ValueError(f"write_results: info keys {clash} would overwrite the summary's")
    (out / "table.json").write_text(json.dumps({"name": name, **summary, **info}, indent=2) + "\n")
    (out / "table.md").write_text(table_markdown({name: summary}) + "\n")
    return summary


# ----------------------------------------------------------------------------- GenEval's folder layout
def read_image_folder(root: str | Path) -> Iterator[Tuple[Path, Dict]]:
    """(image path, prompt metadata) for every ``<root>/<digits>/samples/<digits>.png``, in order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder (GenEval layout <root>/<index>/samples/*.png)")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not folders:
        raise ValueError(f"{root}: no <index>/ folders (GenEval layout <root>/<index>/samples/*.png)")
    for folder in folders:
        meta_path = folder / "metadata.jsonl"
        try:
            metadata = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{meta_path}: missing (each prompt folder needs its metadata)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: invalid JSON: {err.msg}") from None
        if not isinstance(metadata, dict) or "tag" not in metadata or "include" not in metadata:
            raise ValueError(f"{meta_path}: expected a GenEval metadata object with 'tag' and 'include'")
        samples = folder / "samples"
        names = sorted(p.name for p in samples.iterdir() if SAMPLE_NAME.fullmatch(p.name)) if samples.is_dir() else []
        for name in names:
            yield samples / name, metadata


def evaluate_folder(root: str | Path, detector: Detector, colours: ColourClassifier,
                    settings: Settings = Settings(), batch_size: int = 16, progress: bool = True) -> List[Dict]:
    """Rows for every image of a GenEval-layout folder (``filename`` relative to ``root``)."""
    from tqdm import tqdm

    items = list(read_image_folder(root))
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc="geneval", unit="batch", disable=not progress):
        batch = items[start:start + batch_size]
        images = []
        for path, _ in batch:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        for (path, _), row in zip(batch, evaluate_images(images, [m for _, m in batch], detector, colours, settings)):
            rows.append({"filename": str(path.relative_to(root)), **row})
    return rows


@torch.no_grad()
def generate_folder(pipeline, metadatas: Sequence[Mapping], out: str | Path, *, images_per_prompt: int = 4,
                    batch_size: int = 16, seed: int = 0, progress: bool = True, **sample_kwargs) -> Path:
    """Write GenEval's layout for ``metadatas`` from a MiroPipeline. The noise of prompt i is drawn
    from a generator seeded with seed + i, so its images do not depend on the batching; folders that
    already hold all their images are kept (an interrupted run continues). ``batch_size`` counts images."""
    from tqdm import tqdm

    out, m = Path(out), pipeline.cfg.model
    todo = [i for i in range(len(metadatas))
            if not all((out / f"{i:05d}" / "samples" / f"{n:05d}.png").exists() for n in range(images_per_prompt))]
    per_batch = max(1, batch_size // images_per_prompt)
    for start in tqdm(range(0, len(todo), per_batch), desc="generate", unit="batch", disable=not progress):
        indices = todo[start:start + per_batch]
        noise = torch.cat([torch.randn((images_per_prompt, m.latent_channels, m.latent_size, m.latent_size),
                                       generator=torch.Generator().manual_seed(seed + i)) for i in indices])
        images = pipeline([metadatas[i]["prompt"] for i in indices], num_images_per_prompt=images_per_prompt,
                          latents=noise, output_type="pil", **sample_kwargs)
        for k, i in enumerate(indices):
            folder = out / f"{i:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(dict(metadatas[i])))
            for n in range(images_per_prompt):
                images[k * images_per_prompt + n].save(folder / "samples" / f"{n:05d}.png")
    return out


def read_metadata(path: str | Path, limit: Optional[int] = None) -> List[Dict]:
    """GenEval's evaluation_metadata.jsonl (via the prompt reader), every row checked for its clauses."""
    from miro_scale.evaluation.prompts import read_geneval

    rows = []
    for lineno, p in enumerate(read_geneval(path), 1):
        meta = {**p.metadata, "prompt": p.text}
        if "tag" not in meta or not isinstance(meta.get("include"), list):
            raise ValueError(f"{path}: prompt {lineno} ({p.text!r}) has no 'tag' or 'include' list")
        rows.append(meta)
    return rows[:limit] if limit else rows


# ----------------------------------------------------------------------------- transformers models
def coco_label(name: str) -> str:
    return COCO_ALIASES.get(name, name)


class TransformersDetector:
    """A COCO detector from transformers: Mask2Former (instance masks; score = class probability x
    mean mask probability, as mmdet's Mask2Former) or a DETR-style object detector (boxes only)."""

    def __init__(self, model, processor, device="cpu"):
        self.model, self.processor, self.device = model.eval(), processor, torch.device(device)
        self.segments = model.config.model_type == "mask2former"
        self.labels = {int(i): coco_label(n) for i, n in model.config.id2label.items()}

    @classmethod
    def from_pretrained(cls, source: str, device="cpu") -> "TransformersDetector":
        """A local directory or hub id holding the model and its image processor config."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection

        config = AutoConfig.from_pretrained(source)
        if config.model_type == "mask2former":
            from transformers import Mask2FormerForUniversalSegmentation as model_cls
        else:
            model_cls = AutoModelForObjectDetection
        model = model_cls.from_pretrained(source).to(device)
        return cls(model, AutoImageProcessor.from_pretrained(source), device)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> List[List[Detection]]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        outputs = self.model(pixel_values=inputs["pixel_values"])
        sizes = [im.size[::-1] for im in images]
        results = []
        if self.segments:
            # threshold 0: every top-k (query, class) pair comes back; the protocol thresholds
            for res in self.processor.post_process_instance_segmentation(
                    outputs, threshold=0.0, target_sizes=sizes, return_binary_maps=True):
                dets = []
                for info in res["segments_info"]:
                    mask = res["segmentation"][info["id"]].bool().cpu().numpy()
                    ys, xs = np.nonzero(mask)
                    if len(xs) and info["label_id"] in self.labels:
                        # the mask's bounding box, as mmdet derives Mask2Former's boxes
                        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                        dets.append(Detection(self.labels[info["label_id"]], float(info["score"]), box, mask))
                results.append(dets)
        else:
            for res in self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes):
                results.append([Detection(self.labels[int(lab)], float(s), tuple(map(float, box)))
                                for s, lab, box in zip(res["scores"], res["labels"], res["boxes"])
                                if int(lab) in self.labels])
        return results


class ClipColourClassifier:
    """GenEval's colour check: a CLIP zero-shot classifier over COLOURS (each colour's text embedding
    the renormalised mean of its three templates' for the object's class) on the object's pixels over
    a flat background, cropped to its box."""

    def __init__(self, clip, settings: Settings = Settings()):
        from miro_scale.rewards.base import VIEWS

        self.clip, self.settings, self.view = clip, settings, VIEWS["clip224"]  # CLIP's resize + centre crop
        self._weights: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_CLIP, device="cpu", settings: Settings = Settings()):
        """A transformers CLIPModel directory or hub id (its vocab.json + merges.txt give the tokenizer)."""
        from miro_scale.rewards.hf_clip import HFClipReward

        return cls(HFClipReward(weights=source, tokenizer=source, device=device), settings)

    def class_weights(self, label: str) -> torch.Tensor:
        if label not in self._weights:
            texts = [t.format(colour=c, object=label) for c in COLOURS for t in COLOUR_TEMPLATES]
            emb = self.clip.encode_text(texts).float().view(len(COLOURS), len(COLOUR_TEMPLATES), -1).mean(1)
            self._weights[label] = emb / emb.norm(dim=-1, keepdim=True)
        return self._weights[label]

    def crops(self, image: Image.Image, objects: Sequence[Detection]) -> List[Image.Image]:
        image = image.convert("RGB")
        blank = image.copy() if self.settings.background == "original" else Image.new("RGB", image.size,
                                                                                      self.settings.background)
        out = []
        for d in objects:
            if d.mask is not None:
                if d.mask.shape != image.size[::-1]:
                    raise ValueError(f"mask of shape {d.mask.shape} for an image of {image.size[::-1]}")
                crop = Image.composite(image, blank, Image.fromarray(d.mask.astype(np.uint8) * 255))
            else:
                crop = image
            out.append(crop.crop(tuple(round(v) for v in d.box)) if self.settings.crop else crop)
        return out

    @torch.no_grad()
    def classify(self, image: Image.Image, objects: Sequence[Detection], label: str) -> List[str]:
        if not objects:
            return []
        features = self.clip.encode_images(self.view.prepare(self.crops(image, objects))).float()
        return [COLOURS[i] for i in (features @ self.class_weights(label).T).argmax(1).tolist()]


# ----------------------------------------------------------------------------- the synthetic world
class SyntheticDetector:
    """The synthetic world's pixel shape detector as a GenEval detector: one detection per found
    object and shape it may be, scored by the detector's shape probability, with the colour it reads.
    Its box is the square of the object's area around its centroid (the detector reports no box)."""

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> List[List[Detection]]:
        from miro_scale.synthetic.rewards import detect_objects

        results = []
        for im in images:
            w, h = im.size
            dets = []
            for obj in detect_objects(np.asarray(im.convert("RGB"))):
                half = math.sqrt(obj.area * w * h) / 2
                box = (obj.cx * w - half, obj.cy * h - half, obj.cx * w + half, obj.cy * h + half)
                probs = obj.shape_probs or {obj.shape: 1.0}
                dets += [Detection(shape, float(p), box, colour=obj.colour) for shape, p in probs.items()]
            results.append(dets)
        return results


class DetectedColours:
    """Colours as the detector read them (``Detection.colour``)."""

    def classify(self, image: Image.Image, objects: Sequence[Detection], label: str) -> List[str]:
        return [d.colour or "" for d in objects]


def synthetic_metadata(tag: str, scene: Mapping, prompt: str = "") -> Dict:
    """GenEval metadata for a synthetic-world caption of ``scene`` in category ``tag`` (the world's
    captions follow GenEval's templates; classes are shape names)."""
    objs = scene["objects"]
    one = lambda i, **kw: {"class": objs[i]["shape"], "count": 1, **kw}  # noqa: E731
    if tag == "single_object":
        include, exclude = [one(0)], []
    elif tag == "colors":
        include, exclude = [one(0, color=objs[0]["color"])], []
    elif tag == "counting":
        n = len(objs)
        include, exclude = [{"class": objs[0]["shape"], "count": n}], [{"class": objs[0]["shape"], "count": n + 1}]
    elif tag == "two_object":
        include, exclude = [one(0), one(1)], []
    elif tag == "color_attr":
        include, exclude = [one(0, color=objs[0]["color"]), one(1, color=objs[1]["color"])], []
    elif tag == "position":
        rel = scene["relations"][0]
        include, exclude = [one(rel["object"]), one(rel["subject"], position=[rel["relation"], 0])], []
    else:
        raise ValueError(f"synthetic_metadata: unknown tag {tag!r}")
    meta = {"tag": tag, "include": include, "prompt": prompt}
    if exclude:
        meta["exclude"] = exclude
    return meta


__all__ = ["TAGS", "COLOURS", "COLOUR_TEMPLATES", "Settings", "Detection", "Detector", "ColourClassifier",
           "box_iou", "keep_objects", "relative_position", "check", "evaluate_image", "evaluate_images",
           "summarise", "table_markdown", "write_results", "read_image_folder", "evaluate_folder",
           "generate_folder", "read_metadata", "TransformersDetector", "ClipColourClassifier",
           "SyntheticDetector", "DetectedColours", "synthetic_metadata"]
