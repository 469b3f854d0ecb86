"""Word-level tokenizer: every prompt word of `scenes` has a row, and a few rows are
reserved and never trained by the base, so a fine-tune can bind a new word to one without
changing any shape (the DreamBooth token)."""

import torch

PAD = "<pad>"
CONTEXT = 10                  # tokens per prompt; the longest scene prompt has 8 words
RESERVED = 4                  # rows the base never sees
SUBJECT_WORD = "sks"          # the DreamBooth token: bound to the first reserved row

WORDS = ("a at on small big left right top bottom center "
         "circle square triangle cross "
         "red green blue yellow purple orange white black gray").split()
VOCAB = [PAD] + WORDS + [f"<reserved{i}>" for i in range(RESERVED)]
INDEX = {w: i for i, w in enumerate(VOCAB)}
INDEX[SUBJECT_WORD] = INDEX["<reserved0>"]


def encode(prompt):
    """Token ids of one prompt, padded to CONTEXT. Unknown words are an error rather than
    silently dropped: a typo would otherwise sample an unconditioned picture."""
    words = prompt.lower().split()
    unknown = [w for w in words if w not in INDEX]
    if unknown:
        raise ValueError(f"unknown words {unknown}; known: {' '.join(WORDS)} {SUBJECT_WORD}")
    if len(words) > CONTEXT:
        raise ValueError(f"prompt longer than {CONTEXT} words: {prompt!r}")
    ids = [INDEX[w] for w in words]
    return ids + [INDEX[PAD]] * (CONTEXT - len(ids))


def encode_batch(prompts):
    return torch.tensor([encode(p) for p in prompts], dtype=torch.long)
