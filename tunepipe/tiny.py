"""Tokenizers trained locally with the `tokenizers` library: for from-scratch models, tests and offline demos."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000,
                              lowercase: bool = True):
    """A BERT-style WordPiece tokenizer saved in save_pretrained layout (loads with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(str(out_dir))
    return fast


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000, min_frequency: int = 2):
    """A GPT-2-style byte-level BPE tokenizer (no unknown characters) saved in save_pretrained layout.

    Distinct <s>/</s>/<pad>/<mask> tokens: causal LMs get an eos to stop on and a pad that is not the eos; masked
    LMs get a mask token. No template adds them: causal-LM preprocessing appends the eos itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<pad>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", model_max_length=1024,
                                   model_input_names=["input_ids", "attention_mask"])  # GPT-2 would embed type ids
    fast.save_pretrained(str(out_dir))
    return fast


TOKENIZER_TRAINERS = {"wordpiece": train_wordpiece_tokenizer, "bpe": train_bpe_tokenizer}


def train_tokenizer(kind: str, texts: Iterable[str], out_dir: str | Path, **options):
    """Train a tokenizer of ``kind`` ('wordpiece' for BERT-style encoders, 'bpe' for GPT-2/LLaMA-style decoders)."""
    return TOKENIZER_TRAINERS[kind](texts, out_dir, **options)


def train_unigram_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2000):
    """A T5-style Unigram tokenizer (Metaspace) for encoder-decoders built from config.

    Ids follow T5's config defaults (<pad>=0 is also the decoder start, </s>=1, <unk>=2), and every encoded text
    ends with </s>, so seq2seq targets teach the decoder where to stop."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(list(texts), trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                 unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(out_dir))
    return fast


TOKENIZER_TRAINERS["unigram"] = train_unigram_tokenizer
