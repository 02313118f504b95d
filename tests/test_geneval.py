"""GenEval's protocol on hand-made detections (thresholds, counting, overlap, position margins,
colours, the per-category table), the synthetic world through it, and the command end to end on a
tiny random Mask2Former + tiny CLIP (no downloads) and on a tiny synthetic-world bundle."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from miro_scale.evaluation import geneval
from miro_scale.evaluation.geneval import Detection, DetectedColours, Settings
from tests.conftest import tiny_config_dict

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_KEYS = ["caption_alignment_score", "sharpness_score", "contrast_score", "colourfulness_score"]
BLANK = Image.new("RGB", (100, 100))


def det(label, score, box, colour=None):
    return Detection(label, score, box, colour=colour)


def run(detections, metadata, settings=Settings()):
    return geneval.evaluate_image(BLANK, detections, metadata, DetectedColours(), settings)


def test_presence_needs_a_score_above_the_threshold():
    meta = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
    assert not run([det("cow", 0.3, (0, 0, 10, 10))], meta)["correct"]  # strictly above 0.3
    assert run([det("cow", 0.31, (0, 0, 10, 10))], meta)["correct"]
    row = run([det("horse", 0.99, (0, 0, 10, 10))], meta)
    assert not row["correct"] and "expected cow>=1, found 0" in row["reason"]
    assert json.loads(row["details"]) == {"horse": [[0.0, 0.0, 10.0, 10.0, 0.99]]}


def test_counting_uses_its_stricter_threshold_and_the_exclude_clause():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    two = [det("clock", 0.95, (0, 0, 10, 10)), det("clock", 0.92, (50, 50, 60, 60))]
    assert run(two + [det("clock", 0.8, (20, 20, 30, 30))], meta)["correct"]  # 0.8 < 0.9 is not counted
    row = run(two + [det("clock", 0.91, (20, 20, 30, 30))], meta)
    assert not row["correct"] and "expected clock<3, found 3" in row["reason"]
    assert not run(two[:1] + [det("clock", 0.85, (50, 50, 60, 60))], meta)["correct"]
    # the same detections under a non-counting tag use 0.3
    assert len(geneval.keep_objects(two[:1] + [det("clock", 0.85, (50, 50, 60, 60))], "two_object")["clock"]) == 2


def test_overlapping_boxes_are_merged_only_when_max_overlap_is_below_one():
    dets = [det("cup", 0.9, (0, 0, 10, 10)), det("cup", 0.8, (1, 1, 11, 11)), det("cup", 0.7, (40, 40, 50, 50))]
    assert len(geneval.keep_objects(dets, "two_object")["cup"]) == 3  # GenEval's default: max_overlap 1
    kept = geneval.keep_objects(dets, "two_object", Settings(max_overlap=0.5))["cup"]
    assert [d.score for d in kept] == [0.9, 0.7]
    assert geneval.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert geneval.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # inclusive pixels
    capped = geneval.keep_objects([det("cup", 0.5 + i / 100, (i, 0, i + 1, 1)) for i in range(20)], "colors")
    assert len(capped["cup"]) == 16 and capped["cup"][0].score == 0.69


def test_position_margin_rule():
    a = det("dog", 1, (0, 40, 20, 60))   # centre (10, 50), 20 wide
    near = det("cat", 1, (12, 40, 32, 60))   # offset 12 less the margin 0.1 x (20 + 20): 8 / 12 > 0.5
    touching = det("cat", 1, (3, 40, 23, 60))  # offset 3 within the margin 4: no relation at all
    assert geneval.relative_position(a, near) == {"left of"}
    assert geneval.relative_position(near, a) == {"right of"}
    assert geneval.relative_position(a, touching) == set()
    # diagonal: both components survive the margin and exceed half the offset's length
    b = det("cat", 1, (25, 70, 35, 80))  # centre (30, 75) vs (10, 50): offset (-20, -25)
    assert geneval.relative_position(a, b) == {"left of", "above"}
    # mostly vertical: the horizontal share stays under 0.5
    c = det("cat", 1, (5, 0, 15, 10))  # centre (10, 5): straight above a
    assert geneval.relative_position(a, c) == {"below"}
    d = det("cat", 1, (25, 85, 35, 95))  # offset (-20, -40), reduced (-17, -37): shares 0.38 and 0.83
    assert geneval.relative_position(a, d) == {"above"}
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                            {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert run([a, near], meta)["correct"]
    row = run([a, touching], meta)
    assert not row["correct"] and "expected dog left of target" in row["reason"]
    # a failed target clause fails the relation too
    assert "no target" in run([a], meta)["reason"]


def test_colour_and_colour_attribution_check_only_the_counted_objects():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                              {"class": "cup", "count": 1, "color": "purple"}]}
    bus, cup = det("bus", 0.9, (0, 0, 10, 10), "green"), det("cup", 0.8, (20, 20, 30, 30), "purple")
    assert run([bus, cup], meta)["correct"]
    swapped = run([det("bus", 0.9, (0, 0, 10, 10), "purple"), det("cup", 0.8, (20, 20, 30, 30), "green")], meta)
    assert not swapped["correct"] and "expected green bus>=1, found 1 purple" in swapped["reason"]
    # only the best-scored bus is classified
    assert not run([det("bus", 0.95, (40, 40, 50, 50), "red"), bus, cup], meta)["correct"]


def test_clip_crops_put_the_mask_on_grey_and_cut_the_box():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mask = np.zeros((30, 40), bool)
    mask[10:20, 5:15] = True
    mask[10, 5] = False
    classifier = geneval.ClipColourClassifier(clip=None)
    crop, = classifier.crops(image, [Detection("cup", 1.0, (5, 10, 15, 20), mask)])
    a = np.asarray(crop)
    assert crop.size == (10, 10)
    assert tuple(a[1, 1]) == (255, 0, 0) and tuple(a[0, 0]) == (0x99, 0x99, 0x99)
    with pytest.raises(ValueError, match="mask of shape"):
        classifier.crops(image, [Detection("cup", 1.0, (5, 10, 15, 20), mask.T)])


def test_summary_overall_is_the_mean_of_the_categories_and_the_table_has_table_1_columns():
    rows = ([{"tag": "single_object", "correct": True, "metadata": "a"}] * 4
            + [{"tag": "counting", "correct": c, "metadata": "b"} for c in (True, False, False, False)]
            + [{"tag": "counting", "correct": False, "metadata": "c"}] * 4)
    s = geneval.summarise(rows)
    assert s["categories"]["single_object"]["accuracy"] == 1.0
    assert s["categories"]["counting"] == {"accuracy": 1 / 8, "correct": 1, "count": 8}
    assert s["overall"] == pytest.approx((1 + 1 / 8) / 2)  # not the pooled 5 / 12
    assert s["images"] == pytest.approx(5 / 12) and s["prompts"] == pytest.approx(2 / 3)
    table = geneval.table_markdown({"m": s}).splitlines()
    assert table[0] == ("| model | Overall | Single Obj. | Two Obj. | Position | Counting | Colors | "
                        "Color Attr. |")
    assert table[2] == "| m | 56.2 | 100.0 | - | - | 12.5 | - | - |"


def test_the_synthetic_world_passes_its_own_geneval_and_fails_wrong_metadata():
    from miro_scale.synthetic import world

    prompts = world.evaluation_prompts(12, seed=1, vocab="simple", resolution=64)
    images = [world.render_scene(p.metadata["scene"], np.random.default_rng(0)) for p in prompts]
    metas = [geneval.synthetic_metadata(p.metadata["tag"], p.metadata["scene"], p.text) for p in prompts]
    rows = geneval.evaluate_images(images, metas, geneval.SyntheticDetector(), DetectedColours())
    assert sum(r["correct"] for r in rows) >= 10, [(r["prompt"], r["reason"]) for r in rows if not r["correct"]]
    position = next(m for m in metas if m["tag"] == "position")
    assert position["include"][1]["position"][1] == 0
    assert position["prompt"].split()[4] == position["include"][1]["class"]  # "a photo of a <subject> ..."
    counting = next(q for q in world.evaluation_prompts(6, seed=1) if q.metadata["tag"] == "counting")
    n, shape = len(counting.metadata["scene"]["objects"]), counting.metadata["scene"]["objects"][0]["shape"]
    assert geneval.synthetic_metadata("counting", counting.metadata["scene"]) == {
        "tag": "counting", "include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}],
        "prompt": ""}
    wrong = []
    for m in metas:  # every colour and relation flipped: nothing with a colour or relation may pass
        m = json.loads(json.dumps(m))
        for req in m["include"]:
            if "color" in req:
                req["color"] = "black"
            if "position" in req:
                req["position"][0] = {"left of": "right of", "right of": "left of", "above": "below",
                                      "below": "above"}[req["position"][0]]
        wrong.append(m)
    flipped = geneval.evaluate_images(images, wrong, geneval.SyntheticDetector(), DetectedColours())
    for m, r in zip(wrong, flipped):
        if m["tag"] in ("colors", "color_attr", "position"):
            assert not r["correct"], r["prompt"]


# ----------------------------------------------------------------------------- end to end
def tiny_synthetic_bundle(directory: Path, size: int = 16) -> Path:
    """A random synthetic-world model bundle (small text encoder, pixel space) small enough for CPU tests."""
    from miro_scale.config import config_from_dict
    from miro_scale.flow import MiroFlowModel
    from miro_scale.sampling import MiroPipeline

    cfg = config_from_dict(tiny_config_dict(
        model={"latent_channels": 3, "latent_size": size, "reward_keys": SYNTHETIC_KEYS, "self_conditioning": False},
        flow={"latent_shift": [0.0] * 3, "latent_scale": [0.5] * 3, "sample_posterior": False, "prediction": "sample"},
        sampling={"num_steps": 2, "guidance_scale": 1.5, "empty_prompt_negative": False},
        text_encoder={"kind": "small", "name_or_path": "", "max_length": 8},
        autoencoder={"kind": "identity", "name_or_path": "", "image_size": size}))
    torch.manual_seed(0)
    model = MiroFlowModel(cfg.model, cfg.flow)
    MiroPipeline(cfg, model, torch.zeros(1, cfg.model.text_dim)).save_pretrained(directory)
    return directory


def tiny_coco_models(directory: Path):
    """A random Mask2Former over GenEval's 80 COCO classes and a random CLIP, saved as from_pretrained loads them."""
    from transformers import CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation, \
        Mask2FormerImageProcessor, SwinConfig

    from miro_scale.rewards.hf_clip import open_clip_bpe, tiny_clip_config

    # GenEval's 80 class names where ../shared is beside the checkout; the test's own classes elsewhere
    listed = ROOT.parent / "shared" / "data" / "geneval" / "object_names.txt"
    names = [n for n in listed.read_text().split("\n") if n] if listed.exists() else ["cow", "cup", "person", "dog"]
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=12, id2label=dict(enumerate(names)),
                               label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory / "detector")
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(directory / "detector")
    clip = directory / "clip"
    CLIPModel(tiny_clip_config()).save_pretrained(clip)
    vocab, merges = open_clip_bpe()
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory / "detector", clip


def launch(*args):
    proc = subprocess.run([sys.executable, "launchers/geneval.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_command_scores_a_geneval_folder_with_a_tiny_mask2former_and_clip(tmp_path):
    detector, clip = tiny_coco_models(tmp_path / "models")
    metas = [{"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}],
              "prompt": "a photo of a red cup"},
             {"tag": "counting", "include": [{"class": "cow", "count": 2}], "exclude": [{"class": "cow", "count": 3}],
              "prompt": "a photo of two cows"},
             {"tag": "position", "include": [{"class": "cup", "count": 1},
                                             {"class": "cow", "count": 1, "position": ["left of", 0]}],
              "prompt": "a photo of a cow left of a cup"}]
    rng = np.random.default_rng(0)
    for i, meta in enumerate(metas):
        samples = tmp_path / "images" / f"{i:05d}" / "samples"
        samples.mkdir(parents=True)
        (samples.parent / "metadata.jsonl").write_text(json.dumps(meta))
        for n in range(2):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(samples / f"{n:05d}.png")
    (tmp_path / "images" / "00000" / "samples" / "grid.png").write_bytes(b"")  # not a sample: ignored
    # a detector that finds everything everywhere: scores are the protocol's to threshold
    launch("--images", tmp_path / "images", "--detector", detector, "--clip", clip, "--threshold", "0",
           "--counting-threshold", "0", "--device", "cpu", "--out", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["filename"] for r in rows] == [f"{i:05d}/samples/{n:05d}.png" for i in range(3) for n in range(2)]
    assert [r["tag"] for r in rows] == ["colors"] * 2 + ["counting"] * 2 + ["position"] * 2
    details = json.loads(rows[0]["details"])
    assert details and all(len(box) == 5 for boxes in details.values() for box in boxes)
    assert all(r["correct"] or r["reason"] for r in rows)
    for r in rows[2:4]:  # two cows, not three
        assert r["correct"] == (len(json.loads(r["details"]).get("cow", [])) == 2)
    for r in rows[:2]:
        assert r["correct"] <= ("cup" in json.loads(r["details"]))
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert list(table["categories"]) == ["position", "counting", "colors"]
    assert table["overall"] == pytest.approx(np.mean([c["accuracy"] for c in table["categories"].values()]))
    assert table["settings"]["threshold"] == 0 and table["clip"] == str(clip)
    assert (tmp_path / "out" / "table.md").read_text().startswith("| model | Overall | Single Obj.")


def test_a_detr_style_detector_gives_boxes_in_pixels_with_geneval_class_names(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    labels = ["cow", "N/A", "mouse", "remote"]  # COCO spellings in detector configs
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage4"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    DetrForObjectDetection(config).save_pretrained(tmp_path)
    DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(tmp_path)
    detector = geneval.TransformersDetector.from_pretrained(str(tmp_path))
    assert not detector.segments and detector.labels[2] == "computer mouse" and detector.labels[3] == "tv remote"
    dets, = detector.detect([Image.new("RGB", (40, 30), (200, 10, 10))])
    assert len(dets) == 5  # one per query, unthresholded: the protocol thresholds
    for d in dets:
        assert d.mask is None and d.label in {"cow", "N/A", "computer mouse", "tv remote"} and 0 <= d.score <= 1
        assert d.box[0] <= d.box[2] and d.box[1] <= d.box[3]
        assert 0 <= (d.box[0] + d.box[2]) / 2 <= 40 and 0 <= (d.box[1] + d.box[3]) / 2 <= 30  # in pixels


def test_command_generates_the_synthetic_world_and_scores_it_offline(tmp_path):
    bundle = tiny_synthetic_bundle(tmp_path / "bundle")
    launch("--model", bundle, "--world-prompts", 6, "--vocabulary", "simple", "--seeds", 2, "--steps", 2,
           "--detector", "synthetic", "--device", "cpu", "--out", tmp_path / "out")
    folders = sorted((tmp_path / "out" / "images").iterdir())
    assert [f.name for f in folders] == [f"{i:05d}" for i in range(6)]
    assert sorted(p.name for p in (folders[0] / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert Image.open(folders[0] / "samples" / "00000.png").size == (16, 16)
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table["num_images"] == 12 and table["generation"]["world_prompts"] == 6
    assert 0 <= table["images"] <= 1 and table["image_folder"] == str(tmp_path / "out" / "images")
    assert set(table["categories"]) == {"single_object", "colors", "two_object", "color_attr", "position"}
    # a prompt's images do not depend on the batching (the command batched 16 images, here 2)
    from miro_scale.sampling import MiroPipeline

    metas = [json.loads((f / "metadata.jsonl").read_text()) for f in folders]
    geneval.generate_folder(MiroPipeline.from_pretrained(str(bundle)), metas, tmp_path / "again", images_per_prompt=2,
                            batch_size=2, num_inference_steps=2, progress=False)
    for f in folders:
        for n in ("00000.png", "00001.png"):
            assert (tmp_path / "again" / f.name / "samples" / n).read_bytes() == (f / "samples" / n).read_bytes()


def test_bad_folders_and_metadata_are_named(tmp_path):
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(ValueError, match="00000/metadata.jsonl: missing"):
        list(geneval.read_image_folder(tmp_path))
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="'tag' and 'include'"):
        list(geneval.read_image_folder(tmp_path))
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"prompt": "a cow", "tag": "single_object"}\n')
    with pytest.raises(ValueError, match="prompt 1"):
        geneval.read_metadata(bad)
