"""PickScore and SciScore: transformers CLIPModel (ViT-H/14, GELU), score = logit_scale.exp() * cosine.

Weights: a local directory or hub id (yuvalkirstain/PickScore_v1, Jialuo21/SciScore) holding a
CLIPModel (config.json + model.safetensors or pytorch_model.bin, sharded or not). The model is built
from its config on the meta device, materialised on the target device in the target dtype and
loaded tensor by tensor (loading.load_checkpoint_files), failing on any missing / unexpected /
mis-shaped key. `logit_scale` stays fp32: the score is logit_scale.exp() * cosine, and in bf16
exp(4.6052) = 100 would become exp(4.59375) = 98.9.

Images: the CLIPImageProcessor (224) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K is reproduced by the
shared "clip224" view. Text: that repo's tokenizer (CLIPTokenizerFast: NFC, whitespace runs -> " ",
lowercase; CLIP's regex split + byte-level BPE with "</w>" word ends; <|startoftext|> ... <|endoftext|>,
truncated and padded to 77 with <|endoftext|>, attention mask 1 on the tokens), built from the
vocab.json + merges.txt of the tokenizer source or of the weights directory, else from the CLIP BPE
file inside open_clip (the same vocabulary, derived as CLIP derives it). open_clip's own tokenizer is
not used: its ftfy / html.unescape / whitespace cleaning gives other ids for accents, curly quotes,
CJK and HTML entities, which moved PickScore by up to 9 points.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from .base import VIEWS, Reward
from .loading import dir_digest, init_on_meta, load_checkpoint_files, materialize, model_dir, resolve_file, weight_files

PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
KEEP_FP32 = ("logit_scale",)


def clip_bpe_tokenizer(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]):
    """The hub's CLIPTokenizerFast (the pipeline of its tokenizer.json) over a CLIP BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False,
                                                      add_prefix_space=False)
    # the hub's special tokens match the normalised text
    bos, eos = (AddedToken(t, normalized=True, special=True) for t in (BOS, EOS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos,
                                   model_max_length=CONTEXT_LENGTH)


def read_bpe_files(vocab_file, merges_file) -> Tuple[Dict[str, int], list]:
    """vocab.json and merges.txt (after its "#version" line) of a hub CLIP tokenizer."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").split("\n")
    return vocab, [tuple(m.split()) for m in lines if m and not m.startswith("#version")]


def open_clip_bpe() -> Tuple[Dict[str, int], list]:
    """CLIP's vocabulary and merges from the BPE file shipped in open_clip, derived as CLIP does: the
    256 byte characters, the same with "</w>", one token per merge of the first 49152-256-2 merges,
    then <|startoftext|> and <|endoftext|> (49408 tokens, the hub's vocab.json)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(*sources: Optional[str]):
    """The hub CLIP tokenizer from the first source (directory or hub repo id) with vocab.json and
    merges.txt, else from open_clip's copy of the BPE (same ids; a warning names the sources tried)."""
    tried = []
    for s in sources:
        if s is None:
            continue
        try:
            return clip_bpe_tokenizer(*read_bpe_files(resolve_file(s, "vocab.json"), resolve_file(s, "merges.txt")))
        except Exception as e:
            tried.append(f"{s} ({type(e).__name__})")
    if tried:
        warnings.warn(f"CLIP tokenizer files unavailable from {', '.join(tried)}; building the same tokenizer "
                      "from open_clip's copy of the CLIP BPE")
    return clip_bpe_tokenizer(*open_clip_bpe())


def load_clip_model(source: str, device="cpu", dtype=torch.float32):
    """(CLIPModel, its directory) from a local directory or hub id: built on meta from config.json,
    materialised on `device` in `dtype` (KEEP_FP32 in fp32), filled tensor by tensor, strictly."""
    from transformers import CLIPConfig, CLIPModel
    d = model_dir(source)
    with init_on_meta():
        model = CLIPModel(CLIPConfig.from_pretrained(str(d)))
    materialize(model, device, dtype, keep_fp32=KEEP_FP32)
    # position ids are computed at construction; checkpoints of older transformers also carry them
    load_checkpoint_files(model, weight_files(d), source=str(d), ignore=("*position_ids",))
    return model.eval(), d


class HFClipReward(Reward):
    needs_text = True
    batch_size = 64
    view = VIEWS["clip224"]
    default_weights = ""

    def __init__(self, weights: Optional[str] = None, config=None, tokenizer: Optional[str] = PROCESSOR_ID,
                 device="cpu", dtype=torch.float32):
        from transformers import CLIPModel
        if config is not None:  # random weights from a config (tests, benchmarks)
            self.model = materialize(CLIPModel(config).eval(), device, dtype, keep_fp32=KEEP_FP32)
            self.model_id = "random"
        else:
            weights = weights or self.default_weights
            self.model, d = load_clip_model(weights, device, dtype)
            self.model_id = weights
            self.checkpoint_digest = dir_digest(d)
        self.tokenizer = clip_tokenizer(tokenizer, weights)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_images(self, images):
        m = self.model
        out = m.vision_model(pixel_values=self._to_device(images).to(self.dtype))
        f = m.visual_projection(out.pooler_output)
        return f / f.norm(dim=-1, keepdim=True)

    def tokenize(self, captions):
        t = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=CONTEXT_LENGTH,
                           return_tensors="pt")
        return t["input_ids"], t["attention_mask"]

    @torch.no_grad()
    def encode_text(self, captions):
        m = self.model
        ids, mask = self.tokenize(captions)
        out = m.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        f = m.text_projection(out.pooler_output)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score_features(self, features, captions):
        t = self.encode_text(captions)
        return self.model.logit_scale.exp().float() * (features.float() * t.float()).sum(-1)


class PickScoreReward(HFClipReward):
    key = "pick_a_score_score"
    default_weights = "yuvalkirstain/PickScore_v1"


class SciScoreReward(HFClipReward):
    key = "sciscore_score"
    default_weights = "Jialuo21/SciScore"


def tiny_clip_config(**over):
    """A tiny CLIPConfig of the PickScore architecture family (GELU, 224 px, CLIP BPE vocab)."""
    from transformers import CLIPConfig
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                  patch_size=32, hidden_act="gelu")
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=over.pop("projection_dim", 24), **over)


def pickscore_full_config():
    """The PickScore_v1 / SciScore architecture (laion CLIP-ViT-H-14) as a CLIPConfig."""
    return tiny_clip_config(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14),
        projection_dim=1024)
