"""Special tokens of the official processor, and a small byte-level BPE tokenizer builder.

Production loads the DeepSeek-LLM tokenizer directory; the embedded world and the tests train a
small tokenizer with HF `tokenizers` and save it as a transformers tokenizer directory, through the
same code path.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
BEGIN_OF_GENERATION = "<｜begin▁of▁generation｜>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"

# Order fixes the ids of a freshly built tokenizer: BOS = 0, EOS = 1, as the small presets assume.
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE, BEGIN_OF_GENERATION]
# The chat roles are ordinary text to DeepSeek's tokenizer; a small tokenizer keeps them whole.
ROLE_TOKENS = [USER, ASSISTANT]


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; it prepends BOS like DeepSeek's does."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + len(ROLE_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 2} "
                         f"(bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE, BEGIN_OF_GENERATION],
    )


def ensure_special_tokens(tokenizer) -> int:
    """Add the processor's special tokens a tokenizer lacks (as the official processor does).

    Returns how many were added; the caller must grow the embedding table to len(tokenizer).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE, BEGIN_OF_GENERATION) if t not in vocab]
    added = 0
    if missing:
        added += tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                              replace_extra_special_tokens=False)
    if PAD not in vocab:
        added += tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.pad_token = PAD
    return added
