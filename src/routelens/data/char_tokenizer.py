"""A character-level tokenizer as a real Hugging Face fast tokenizer.

Saved with `save_pretrained`, it loads back with `AutoTokenizer.from_pretrained(folder)`,
like any checkpoint's tokenizer. Ids 0/1/2 are <pad>/<bos>/<eos>, 3 is <unk>; each
character of `alphabet` gets one id after those. With special tokens, text is prefixed
with <bos>.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({char: len(SPECIALS) + index for index, char in enumerate(alphabet)})
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
    )
