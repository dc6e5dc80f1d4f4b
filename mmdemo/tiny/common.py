"""What every tiny builder shares: toy sizes, a local corpus, learnt tokenizers, seeding."""

from __future__ import annotations

import string
import zlib
from collections import Counter
from collections.abc import Iterable

# Shared toy sizes.
HIDDEN = 32
LAYERS = 2
HEADS = 2
FFN = 37
IMAGE = 32
PATCH = 8
# Every tiny transformer (vision towers, text encoders/decoders) has these sizes.
TINY_TRANSFORMER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)

# Answers the tiny ViLT "knows" (a few of the commonest VQA answers).
VQA_ANSWERS = (
    "yes", "no", "0", "1", "2", "3", "4", "red", "blue", "green", "white", "black",
    "dog", "cat", "man", "woman", "tennis", "pizza", "left", "right",
)

_SENTENCES = (
    "a photo of a cat sitting on a couch",
    "a dog running on the grass in the park",
    "two people riding bikes down a city street",
    "a man holding a tennis racket on a court",
    "a woman eating a slice of pizza at a table",
    "a red car parked next to a blue truck",
    "a plate of food with broccoli and rice",
    "an airplane flying in a clear blue sky",
    "a group of children playing soccer on a field",
    "a bowl of fruit with apples, oranges and bananas",
    "a black and white photo of an old building",
    "a train traveling down the tracks near a station",
    "a kitchen with a stove, a sink and a refrigerator",
    "a bird standing on a branch of a tree",
    "a boat floating on the water at sunset",
    "what color is the car? how many dogs are there? is it raining?",
    "where is the cat? what is the man holding? who is on the left or right?",
    "is there a person in the picture? yes. no. maybe!",
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the speech recognition system.",
    "please transcribe this sentence and translate it into english.",
    "astronaut riding a horse, oil painting, high quality, 4k",
    "a cozy cabin in snowy mountains at night, digital art",
    "one two three four five six seven eight nine ten",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024",
    " ".join(VQA_ANSWERS),
)


def corpus() -> list[str]:
    """Small training corpus; every printable ASCII character appears on its own and in text,
    so punctuation and digits never become unknown tokens."""
    printable = [ch for ch in string.printable if not ch.isspace()]
    return [*_SENTENCES, " ".join(printable), "".join(printable), *(s.upper() for s in _SENTENCES[:4])]


def learn_subwords(
    tokenizer, vocab_size: int, alphabet: Iterable[str] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn a subword vocabulary for an (empty) transformers tokenizer from the local corpus.

    Plain byte-pair encoding on the words that the tokenizer's own normaliser and pre-tokeniser
    make of the corpus, honouring its WordPiece "##" prefix or BPE "</w>" suffix.  Returns the
    tokens (alphabet first) and the merges in order.  Ties are broken alphabetically, so the same
    corpus always gives the same vocabulary (the ``tokenizers`` trainers break ties in hash
    order, which changes from run to run)."""
    backend = tokenizer.backend_tokenizer
    prefix = getattr(backend.model, "continuing_subword_prefix", None) or ""
    suffix = getattr(backend.model, "end_of_word_suffix", None) or ""
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus():
        text = backend.normalizer.normalize_str(text) if backend.normalizer else text
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            symbols = [word[0], *(prefix + ch for ch in word[1:])]
            symbols[-1] += suffix
            words[tuple(symbols)] += 1

    tokens = sorted({*alphabet, *(symbol for word in words for symbol in word)})
    known, merges = set(tokens), []
    while len(tokens) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=pairs.__getitem__)  # most frequent, then alphabetical
        merged = best[0] + best[1].removeprefix(prefix)
        merges.append(best)
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        merged_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged_words[merge_pair(word, best, merged)] += count
        words = merged_words
    return tokens, merges


def merge_pair(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_tokenizer(tokenizer_cls, vocab_size: int, **init_kwargs):
    """A WordPiece (BERT) or BPE (CLIP) tokenizer of ``tokenizer_cls`` with a vocabulary of about
    ``vocab_size`` learnt from the local corpus; its special tokens come first."""
    from tokenizers.models import BPE

    empty = tokenizer_cls(**init_kwargs)
    specials = list(dict.fromkeys(empty.all_special_tokens))
    tokens, merges = learn_subwords(empty, vocab_size - len(specials))
    vocab = {token: i for i, token in enumerate([*specials, *(t for t in tokens if t not in specials)])}
    if isinstance(empty.backend_tokenizer.model, BPE):
        return tokenizer_cls(vocab=vocab, merges=merges, **init_kwargs)
    return tokenizer_cls(vocab=vocab, **init_kwargs)


def seed(name: str) -> None:
    import torch

    torch.manual_seed(zlib.crc32(name.encode()))
