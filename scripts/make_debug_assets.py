"""Writes the embedded default run's data and tokenizer into assets/debug/ (deterministic).

    python scripts/make_debug_assets.py

A synthetic corpus with learnable structure (templated sentences, small arithmetic) and a byte-level
BPE tokenizer trained on it, with Qwen's special tokens; chat records for the SFT recipe
(sft.jsonl) and scored rollouts for the policy recipe (rollouts.jsonl). Nothing is downloaded."""

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


def chat_turn(rng: random.Random) -> tuple[str, str]:
    """(user question, correct assistant answer) over the corpus' own vocabulary."""
    kind = rng.random()
    if kind < 0.5:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"what is {a} plus {b} ?", f"{a} plus {b} is {a + b} ."
    if kind < 0.75:
        start, n = rng.randint(0, 50), rng.randint(2, 6)
        return f"count from {start} to {start + n - 1} .", "count : " + " ".join(str(start + i) for i in range(n)) + " ."
    noun = rng.choice(NOUNS)
    return f"what does the {noun} do ?", f"the {noun} {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(PLACES)} ."


def make_sft_records(n_records: int, seed: int = 1) -> list[dict]:
    """Chat records: an optional system turn, then one to three user/assistant exchanges."""
    rng = random.Random(seed)
    records = []
    for _ in range(n_records):
        messages = [{"role": "system", "content": "answer in one short sentence ."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            question, answer = chat_turn(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def make_rollouts(n_prompts: int, group_size: int = 4, seed: int = 2) -> list[dict]:
    """GRPO-style groups: several sampled answers per arithmetic prompt, reward 1 if right, and
    advantage = reward - the group's mean reward. Text fields; the policy recipe tokenizes them."""
    rng = random.Random(seed)
    rollouts = []
    for _ in range(n_prompts):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        prompt = f"<|im_start|>user\nwhat is {a} plus {b} ?<|im_end|>\n<|im_start|>assistant\n"
        answers = [a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2]) for _ in range(group_size)]
        rewards = [float(x == a + b) for x in answers]
        mean = sum(rewards) / group_size
        for answer, reward in zip(answers, rewards):
            # Short and long answers: responses of unequal length, as sampled ones are.
            response = f"{a} plus {b} is {answer} .<|im_end|>" if rng.random() < 0.5 else f"{answer} .<|im_end|>"
            rollouts.append({"prompt": prompt, "response": response, "reward": reward, "advantage": reward - mean})
    return rollouts


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(out_dir: str = "assets/debug", n_docs: int = 2000, vocab_size: int = 2048) -> None:
    os.makedirs(out_dir, exist_ok=True)
    texts = make_corpus(n_docs)
    with open(os.path.join(out_dir, "corpus.jsonl"), "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    train_tokenizer(texts, vocab_size).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 4096}, f, indent=2)
    write_jsonl(os.path.join(out_dir, "sft.jsonl"), make_sft_records(500))
    write_jsonl(os.path.join(out_dir, "rollouts.jsonl"), make_rollouts(128))


if __name__ == "__main__":
    main(*sys.argv[1:2])
