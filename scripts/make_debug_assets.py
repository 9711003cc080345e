"""Writes the embedded default run's data and tokenizer into assets/debug/ (deterministic).

    python scripts/make_debug_assets.py

A synthetic corpus with learnable structure (templated sentences, small arithmetic) and a byte-level
BPE tokenizer trained on it, with Qwen's special tokens. Nothing is downloaded."""

import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NOUNS = "cat dog bird fox horse mouse river tree house city robot farmer child teacher ship garden".split()
ADJS = "small big red green quiet loud old young bright dark happy tired clever slow fast".split()
VERBS = "sees follows helps finds watches likes carries paints builds visits".split()
PLACES = "near the river|in the garden|on the hill|under the tree|inside the house|across the city".split("|")


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
                f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)} .")
    if kind < 0.85:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} plus {b} is {a + b} ."
    n = rng.randint(2, 6)
    start = rng.randint(0, 50)
    return "count : " + " ".join(str(start + i) for i in range(n)) + " ."


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(3, 24))) for _ in range(n_docs)]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main(out_dir: str = "assets/debug", n_docs: int = 2000, vocab_size: int = 2048) -> None:
    os.makedirs(out_dir, exist_ok=True)
    texts = make_corpus(n_docs)
    with open(os.path.join(out_dir, "corpus.jsonl"), "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    train_tokenizer(texts, vocab_size).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 4096}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:2])
