"""Byte-level BPE tokenizer trained with HF ``tokenizers``, saved for ``AutoTokenizer.from_pretrained``."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmforge import storage
from llmforge.config import TokenizerConfig
from llmforge.errors import InputError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML. The {% generation %} markers let `apply_chat_template(..., return_assistant_tokens_mask=True)`
# tell assistant tokens apart, which fine-tuning uses to compute the loss on replies only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], cfg: TokenizerConfig, out_dir: str | Path,
                    model_max_length: int) -> int:
    """Train on ``texts`` (strings, or lists of them) and save to ``out_dir`` (a local dir); returns the
    vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def local_copy(uri: str) -> Path:
    """A local directory holding the tokenizer at ``uri`` (downloaded when it is on S3)."""
    if not storage.is_s3(uri):
        return Path(storage.resolve(uri)[1])
    return storage.download_dir(uri, tempfile.mkdtemp(prefix="llmforge-tok-"))


def load_fast(uri: str) -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` (fast, no transformers import) of a saved tokenizer dir."""
    path = local_copy(uri) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"No tokenizer.json in {uri}.", fix="point data.tokenizer.path at a saved HF tokenizer dir.")
    return Tokenizer.from_file(str(path))


def token_id(tok: Tokenizer, token: str, uri: str) -> int:
    value = tok.token_to_id(token)
    if value is None:
        raise InputError(f"Tokenizer {uri} has no {token!r} token.",
                         fix=f"use a tokenizer with the special tokens {SPECIAL_TOKENS} or let prepare train one.")
    return value
