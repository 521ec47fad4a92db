"""A tiny character-level tokenizer for tests (no hub access needed).

``make_tiny_tokenizer()`` returns a ``PreTrainedTokenizerFast`` with 97 tokens
(the ``VOCAB`` of ``tests/conftest.py``), one token per character:

====  =================  ==========================================
id    token              role
====  =================  ==========================================
0     ``<pad>``          pad_token
1     ``<|endoftext|>``  bos_token
2     ``<|im_start|>``   chat turn start
3     ``<|im_end|>``     eos_token (chat turn end)
4     ``<unk>``          unk_token (tab, ``` ` ~ | ^ ```, non-ASCII)
5..   ``"\\n"``, then printable ASCII 32..126 minus the four above
====  =================  ==========================================

No special token is added when encoding (like SmolLM2's tokenizer). The chat
template is ChatML, as SmolLM2-Instruct's:
``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
_DROPPED = set("`~|^")
CHARS = ("\n",) + tuple(chr(c) for c in range(32, 127) if chr(c) not in _DROPPED)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer of 97 tokens with pad/bos/eos/unk tokens and,
    unless ``chat_template=False`` (a "base model" tokenizer), a ChatML chat
    template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == 97
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.padding_side = "right"
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok
