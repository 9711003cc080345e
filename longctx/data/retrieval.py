"""The retrieval tasks, in tokens: eval_long.py scores them and make_retrieval_data.py writes them for
training, from this one definition.

- passkey (Mohtashami & Jaggi 2023, arXiv:2305.16300): a 5-digit key hidden at a depth of repeated
  filler text, asked for at the end;
- multi-key: several "The magic number of the NAME is VALUE." needles at their depths of natural
  text, one asked for at the end.
A row ends with its answer; every insertion falls before a word, so a document written as text
tokenizes back to exactly its tokens.
"""

import random

import numpy as np

from longctx.base import ConfigError, DataError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
MULTIKEY_INTRO = "Some magic numbers are hidden in the text below. Memorize them. I will ask for one of them."
MULTIKEY_NEEDLE = " The magic number of the {name} is {value}."
MULTIKEY_QUESTION = " What is the magic number of the {name}? The magic number of the {name} is"
TASKS = ("passkey", "multikey")  # as eval_long.json names them
NAMES = ("fox", "river", "robot", "garden", "ship", "horse", "teacher", "bird", "farmer", "tree", "mouse", "city",
         "child", "house", "dog", "cat")


class Words:
    """A tokenizer's token ids with where words start: a piece of text that begins with a space may
    go before such a token, and text cut before one tokenizes back to the same tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encoded: dict[str, list[int]] = {}
        self.is_start = np.full(tokenizer.vocab_size, -1, dtype=np.int8)  # per id: 1 begins with a space, -1 not known yet

    def encode(self, text: str) -> list[int]:
        if text not in self.encoded:
            self.encoded[text] = self.tokenizer.encode(text)
        return self.encoded[text]

    def word_starts(self, tokens) -> np.ndarray:
        """[len(tokens) + 1] bool: a word starts at token i; the end counts as one."""
        ids = np.asarray(tokens, dtype=np.int64)
        for t in np.unique(ids[self.is_start[ids] < 0]).tolist():
            self.is_start[t] = self.tokenizer.tokenizer.decode([t]).startswith(" ")
        return np.append(self.is_start[ids] == 1, True)


class NaturalText:
    """Windows of a token stream that start at a word (the stream wraps around)."""

    def __init__(self, words: Words, stream: np.ndarray):
        self.stream = stream
        self.starts = np.flatnonzero(words.word_starts(stream.tolist())[:-1])

    def window(self, rng: random.Random, length: int) -> np.ndarray:
        start = int(self.starts[rng.randrange(len(self.starts))])
        repeats = -(-(start + length) // len(self.stream))
        return np.tile(self.stream, repeats)[start : start + length] if repeats > 1 else self.stream[start : start + length]


def word_start_near(starts: np.ndarray, index: int) -> int:
    """The word start nearest to `index` (the earlier one on a tie)."""
    candidates = np.flatnonzero(starts)
    return int(candidates[np.argmin(np.abs(candidates - index))])


def passkey_tokens(words: Words, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """`length` tokens: the key hidden at `depth` of the filler, then the question and the answer;
    and the answer's token count (the last tokens)."""
    intro, needle = words.encode(INTRO), words.encode(NEEDLE.format(key=key))
    question, answer = words.encode(QUESTION), words.encode(f" {key}")
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ConfigError(f"a passkey row of {length} tokens is shorter than its prompt ({length - room} tokens)")
    filler = words.encode(FILLER)
    filler = (filler * (room // len(filler) + 1))[:room]
    before = word_start_near(words.word_starts(filler), round(depth * room))
    return intro + filler[:before] + needle + filler[before:] + question + answer, len(answer)


def multikey_tokens(words: Words, haystack, length: int, pairs: list[tuple[str, int]], depths: list[float],
                    asked: int) -> tuple[list[int], int]:
    """`length` tokens: each (name, value) of `pairs` hidden at its depth of the haystack (natural
    text starting at a word), then the question for pairs[asked] and its answer; and the answer's
    token count."""
    intro = words.encode(MULTIKEY_INTRO)
    needles = [words.encode(MULTIKEY_NEEDLE.format(name=name, value=value)) for name, value in pairs]
    question = words.encode(MULTIKEY_QUESTION.format(name=pairs[asked][0]))
    answer = words.encode(f" {pairs[asked][1]}")
    room = length - len(intro) - sum(map(len, needles)) - len(question) - len(answer)
    if room < 0:
        raise ConfigError(f"a multi-key row of {length} tokens is shorter than its prompt ({length - room} tokens)")
    if len(haystack) < room:
        raise DataError(f"the haystack holds {len(haystack)} tokens, fewer than the {room} a multi-key row of {length} needs")
    filler = np.asarray(haystack[:room]).tolist()
    starts = words.word_starts(filler)
    cuts = sorted((word_start_near(starts, round(d * room)), i) for i, d in enumerate(depths))
    tokens, done = list(intro), 0
    for cut, i in cuts:
        tokens += filler[done:cut] + needles[i]
        done = cut
    return tokens + filler[done:] + question + answer, len(answer)


def fmt_tokens(n: int) -> str:
    """A token count as the reports print it: 2048 -> 2K, 1000 -> 1000."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
