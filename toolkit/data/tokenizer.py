"""The built-in character tokenizer: built offline, deterministically, from a fixed alphabet.

Tiny presets use it, so nothing is downloaded. One token per printable ASCII character, plus the
usual special tokens, a BOS added in front like LLaMA's tokenizer, and a plain chat template.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Roles in plain words; the eos after each assistant turn is what a model learns to stop on.
CHAT_TEMPLATE = (
    # the newline goes before a turn, not after it, so an assistant turn ends exactly at its EOS
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}assistant: {% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with one id per printable ASCII character; identical on every call."""
    alphabet = list(SPECIAL_TOKENS.values()) + sorted(set(string.printable))
    vocab = {token: index for index, token in enumerate(alphabet)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
