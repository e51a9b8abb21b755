"""A character-level tokenizer for the tiny evaluation model.

Every character of ``CHARS`` is one token; text is lower-cased; ``<bos>`` is
prepended by the post-processor.  It is a ``tokenizers`` WordLevel model wrapped as a
transformers ``PreTrainedTokenizerFast``, so a folder written by
``save_pretrained`` loads offline with ``AutoTokenizer.from_pretrained(folder)``.
"""
from __future__ import annotations

__all__ = ["SPECIAL_TOKENS", "CHARS", "build_tokenizer", "PAD", "BOS", "EOS", "UNK"]

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = 0, 1, 2, 3
# digits, letters, space and the punctuation the task formats use (61 characters; vocab 65)
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=<>?:,.;|()[]{}!&/'#_"


def build_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS + CHARS`` (right padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right",
                                   model_max_length=128)
