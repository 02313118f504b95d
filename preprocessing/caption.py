#!/usr/bin/env python
r"""Synthetic captions with a transformers vision-language model (the caption stage; MIRO used
google/gemma-3-12b-it).

  torchrun --nproc_per_node 8 preprocessing/caption.py --shards 'data/{00000..00099}.tar' \
      --model google/gemma-3-12b-it --kinds long,short --out captions/

Writes `{out}/{stem}.captions.parquet` (key, status, error, caption_long, caption_short) per shard on
the shard-job runner (miro_scale/shard_jobs.py): atomic, resumable, split over RANK/WORLD_SIZE, a
failed shard retried by the next run. The encode, score and shard stages read these sidecars with
`--captions DIR`: each caption becomes `json["captions"][kind]` of its sample (caption source
`long`, `short`). Any AutoModelForImageTextToText model whose processor has a chat template works
(the model and processor load from a local directory or hub id).

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


def caption_shard(cap: "Captioner", shard: str, kinds, batch_size: int, max_tokens: dict, progress=None):
    from miro_scale.data.decode import decode_image
    from miro_scale.data.format import SampleError, image_ext
    from miro_scale.data.sidecars import count_index_problems, iter_members, open_source_shard
    from miro_scale.shard_jobs import shard_stem
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
    index = open_source_shard(shard)
    for key, members in iter_members(shard, index):
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
    failures, skipped = {}, {}
    for st in rows["status"]:
        if st != "ok":
            failures[st] = failures.get(st, 0) + 1
    count_index_problems(index, failures, skipped)
    counts = {"samples": len(rows["key"]), "failures": failures, "skipped_keys": skipped}
    return rows, counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="brace patterns / globs / paths / directories")
    p.add_argument("--model", default="google/gemma-3-12b-it", help="local directory or hub id")
    p.add_argument("--out", required=True, help="output directory of the caption sidecars")
    p.add_argument("--kinds", default="long,short", help=f"captions to write, of {sorted(PROMPTS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens-long", type=int, default=320)
    p.add_argument("--max-new-tokens-short", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--retries", type=int, default=1, help="retries of a failed shard within this run")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import pyarrow as pa
    import torch

    from miro_scale import shard_jobs
    from miro_scale.data.plan import resolve_shards
    from miro_scale.atomic import write_parquet_atomic
    shard_jobs.setup_logging()
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PROMPTS]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown} (have {sorted(PROMPTS)})")
    try:
        shards = resolve_shards(a.shards)
    except FileNotFoundError as e:
        raise SystemExit(f"--shards: {e}")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    max_tokens = {"long": a.max_new_tokens_long, "short": a.max_new_tokens_short}
    state = {}  # the model is loaded on the first shard that needs it (a rerun may need none)

    def process(task):
        if "cap" not in state:
            state["cap"] = Captioner(a.model, device, a.precision)
        t0 = time.perf_counter()
        rows, counts = caption_shard(state["cap"], task.shard, kinds, a.batch_size, max_tokens, task.bar)
        t = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
        t = t.replace_schema_metadata({"miro_captions": json.dumps(
            {"model": a.model, "kinds": kinds, "prompts": {k: PROMPTS[k] for k in kinds}}, sort_keys=True)})
        write_parquet_atomic(t, task.path("{stem}.captions.parquet"))
        counts["timing"] = {"generate": time.perf_counter() - t0}
        return counts

    job = shard_jobs.ShardJob(
        stage="caption", out_dir=a.out, outputs=["{stem}.captions.parquet"], process=process,
        params={"model": a.model, "kinds": kinds, "prompts": {k: PROMPTS[k] for k in kinds},
                "max_new_tokens": {k: max_tokens[k] for k in kinds}, "precision": a.precision},
        retries=a.retries, progress=not a.no_progress)
    return shard_jobs.report(shard_jobs.run(job, shards))


if __name__ == "__main__":
    sys.exit(main())
