#!/usr/bin/env python
"""Synthetic captions with a transformers vision-language model (MIRO used google/gemma-3-12b-it).

  torchrun --nproc_per_node 8 preprocessing/caption.py --shards 'data/{00000..00099}.tar' \
      --model google/gemma-3-12b-it --kinds long,short --out captions/

Writes `{out}/{shard}.captions.parquet` (key, status, error, caption_long, caption_short), atomically;
a rerun skips finished shards; shards are split over RANK/WORLD_SIZE as in score.py. With
--format json the sidecar is `{shard}.captions.json`: {key: {"captions": {"long": ..., "short": ...}}},
the layout of the shard format's json "captions" field. Any AutoModelForImageTextToText model whose
processor has a chat template works (the model and processor load from a local directory or hub id).

The long prompt is the one in the MIRO paper's appendix E; the paper does not give the prompt of
its short captions (used for the 77-token reward models), so SHORT_PROMPT is ours. A reply without
<CAPTION>...</CAPTION> tags keeps its whole text and gets status "no_caption_tags".
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LONG_PROMPT = (
    "Analyze the following image in detail. Identify all prominent objects, their attributes (color, material, "
    "shape, size, texture), their spatial relationships, the overall scene and setting, the lighting conditions, "
    "and any relevant style or composition details. "
    "Based on your analysis, generate a caption of the image. It should be descriptive enough to allow a diffusion "
    "model to accurately reconstruct the image. Include specific details rather than general descriptions. For "
    "example, instead of 'a blue car,' describe it as 'a shiny, dark blue vintage sedan with chrome bumpers parked "
    "on a cobblestone street.' "
    "Please ensure the caption is enclosed within <CAPTION> and </CAPTION> tags. "
)
SHORT_PROMPT = (
    "Write a short caption of the image: one sentence of at most 30 words naming the main objects, their colors "
    "and their positions. Please ensure the caption is enclosed within <CAPTION> and </CAPTION> tags. "
)
PROMPTS = {"long": LONG_PROMPT, "short": SHORT_PROMPT}
TAG = re.compile(r"<CAPTION>(.*?)(?:</CAPTION>|$)", re.S)


def extract_caption(text: str):
    """(caption, ok): the text inside <CAPTION> tags, or the whole reply stripped when they are missing."""
    m = TAG.search(text)
    if m and m.group(1).strip():
        return " ".join(m.group(1).split()), True
    return " ".join(text.replace("<CAPTION>", " ").replace("</CAPTION>", " ").split()), False


class Captioner:
    def __init__(self, model: str, device, precision: str = "bf16"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        if device.type == "cpu":
            dtype = torch.float32
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"
        self.model, info = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise RuntimeError(f"{model}: checkpoint does not match the architecture: {bad}")
        self.model.to(device).eval()
        self.device = device
        self.model_id = model

    def prompt(self, kind: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[kind]}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True)

    def caption(self, images, kind: str, max_new_tokens: int):
        import torch
        text = self.prompt(kind)
        inp = self.processor(images=[[im] for im in images], text=[text] * len(images), return_tensors="pt",
                             padding=True)
        inp = {k: v.to(self.device) for k, v in inp.items()}
        if "pixel_values" in inp:
            inp["pixel_values"] = inp["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)


def caption_shard(cap: Captioner, shard: str, kinds, batch_size: int, max_tokens: dict, progress=None):
    from miro_scale.data.decode import decode_image
    from miro_scale.data.format import SampleError, image_ext
    from miro_scale.data.tario import iter_samples
    from miro_scale.rewards.scoring import shard_stem
    rows = {"key": [], "status": [], "error": [], **{f"caption_{k}": [] for k in kinds}}
    batch = []

    def flush():
        if not batch:
            return
        idx = [i for i, im in batch]
        ims = [im for i, im in batch]
        for k in kinds:
            try:
                outs = cap.caption(ims, k, max_tokens[k])
            except Exception as e:  # a failing batch: mark its rows, keep going
                outs = [None] * len(ims)
                for i in idx:
                    rows["status"][i] = "generate_error"
                    rows["error"][i] = rows["error"][i] or f"{type(e).__name__}: {e}"
            for i, o in zip(idx, outs):
                if o is None:
                    continue
                c, ok = extract_caption(o)
                rows[f"caption_{k}"][i] = c
                if not ok and rows["status"][i] == "ok":
                    rows["status"][i] = "no_caption_tags"
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    stem = shard_stem(shard)
    for key, members in iter_samples(shard):
        i = len(rows["key"])
        rows["key"].append(key)
        rows["status"].append("ok")
        rows["error"].append(None)
        for k in kinds:
            rows[f"caption_{k}"].append(None)
        ext = image_ext(members)
        try:
            if ext is None:
                raise SampleError("missing_image", f"{stem}:{key}: no image member")
            im = decode_image(members[ext], f"{stem}:{key}")
        except SampleError as e:
            rows["status"][i] = e.reason
            rows["error"][i] = str(e)
            continue
        batch.append((i, im))
        if len(batch) >= batch_size:
            flush()
    flush()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+")
    p.add_argument("--model", default="google/gemma-3-12b-it", help="local directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", default="long,short")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens-long", type=int, default=320)
    p.add_argument("--max-new-tokens-short", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--format", default="parquet", choices=["parquet", "json"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from miro_scale.atomic import write_bytes_atomic
    from miro_scale.rewards.scores_io import write_table_atomic
    from miro_scale.data.plan import resolve_shards
    from miro_scale.rewards.scoring import assign_shards, shard_stem
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PROMPTS]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown} (have {sorted(PROMPTS)})")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    shards = resolve_shards(a.shards)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".captions.parquet" if a.format == "parquet" else ".captions.json"
    todo = [s for s in assign_shards(shards, rank, world) if not (out / f"{shard_stem(s)}{suffix}").exists()]
    if not todo:
        print(f"[rank {rank}] nothing to do")
        return 0
    cap = Captioner(a.model, device, a.precision)
    max_tokens = {"long": a.max_new_tokens_long, "short": a.max_new_tokens_short}
    bar = tqdm(unit="img", desc=f"rank {rank} captions", position=rank, disable=a.no_progress)
    t0 = time.perf_counter()
    n = 0
    for s in todo:
        rows = caption_shard(cap, s, kinds, a.batch_size, max_tokens, bar)
        n += len(rows["key"])
        target = out / f"{shard_stem(s)}{suffix}"
        if a.format == "parquet":
            t = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
            t = t.replace_schema_metadata({"miro_captions": json.dumps({"model": a.model, "kinds": kinds,
                                                                         "prompts": {k: PROMPTS[k] for k in kinds}})})
            write_table_atomic(t, target)
        else:
            doc = {key: {"captions": {k: rows[f"caption_{k}"][i] for k in kinds}, "status": rows["status"][i]}
                   for i, key in enumerate(rows["key"])}
            write_bytes_atomic(target, json.dumps(doc).encode())
    bar.close()
    dt = time.perf_counter() - t0
    print(json.dumps({"rank": rank, "shards": len(todo), "images": n, "images_per_s": round(n / dt, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
