"""Writes the embedded default run's data and tokenizer into assets/debug/ (deterministic).

    python scripts/make_debug_assets.py
    python scripts/make_debug_assets.py --out-dir OUT --corpus-docs 200000 --corpus-only   # more of the same text

The corpus's first 2,000 documents are the shipped ones whatever --corpus-docs is, so a larger
corpus is more text of the same grammar and vocabulary, tokenized by the shipped tokenizer as well.

A synthetic corpus with learnable structure (templated sentences, small arithmetic) and a byte-level
BPE tokenizer trained on it, with Qwen's special tokens, Qwen3's thinking and tool-call tags and a
Qwen3-style chat template (written here); chat records for the SFT recipe (sft.jsonl) and scored
rollouts for the policy recipe (rollouts.jsonl). Nothing is downloaded."""

import argparse
import json
import os
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from longctx.base import ConfigError
from longctx.launch import run_command

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The shipped corpus's documents, the tokenizer's training text for any --corpus-docs.
SHIPPED_DOCS = 2000
# Added after training, as plain (non-special) tokens as in Qwen3's tokenizer: the BPE merges, and so
# every corpus token id, stay what they were without them.
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen3's chat behaviour in a template of our own: reasoning in a <think> block for the assistant
# turns after the last user query (an empty block for the final turn without reasoning), dropped for
# earlier turns; tool calls as <tool_call> JSON; tool results as one user turn of <tool_response>s;
# tools listed in the system turn; enable_thinking=false closes an empty <think> in the generation prompt.
CHAT_TEMPLATE = """\
{%- set tail = namespace(query=messages|length - 1, found=false) -%}
{%- for m in messages|reverse -%}
  {%- if not tail.found and m.role == 'user' and not (m.content is string and m.content.startswith('<tool_response>')) -%}
    {%- set tail.query = messages|length - 1 - loop.index0 -%}
    {%- set tail.found = true -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif -%}
  {{- '# Tools\n\nFunction signatures, one JSON object per line:\n<tools>' -}}
  {%- for tool in tools %}{{ '\n' + tool|tojson }}{% endfor -%}
  {{- '\n</tools>\n\nTo call one, write {"name": ..., "arguments": ...} inside <tool_call></tool_call>.<|im_end|>\n' -}}
{%- elif messages[0].role == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set content = m.content if m.content is string else '' -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' -}}
  {%- elif m.role == 'assistant' -%}
    {%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if m.reasoning_content is not string and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
      {%- set content = content.split('</think>')[-1] -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if loop.index0 > tail.query and (loop.last or reasoning) -%}
      {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' -}}
    {%- endif -%}
    {{- content.lstrip('\n') if loop.index0 > tail.query else content -}}
    {%- for call in m.tool_calls or [] -%}
      {%- set call = call.function or call -%}
      {%- if content or not loop.first %}{{ '\n' }}{% endif -%}
      {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
      {{- call.arguments if call.arguments is string else call.arguments|tojson -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}
    {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif -%}
{%- endif -%}
"""
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
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="assets/debug")
    parser.add_argument("--corpus-docs", type=int, default=SHIPPED_DOCS, help="documents of corpus.jsonl")
    parser.add_argument("--corpus-only", action="store_true", help="write corpus.jsonl alone (no tokenizer, chat or rollouts)")
    args = parser.parse_args(argv)
    if args.corpus_docs < (1 if args.corpus_only else SHIPPED_DOCS):
        raise ConfigError(f"--corpus-docs {args.corpus_docs} must be >= 1 with --corpus-only, else >= {SHIPPED_DOCS} (the tokenizer's)")
    os.makedirs(args.out_dir, exist_ok=True)
    texts = make_corpus(args.corpus_docs)
    write_jsonl(os.path.join(args.out_dir, "corpus.jsonl"), [{"text": text} for text in texts])
    if args.corpus_only:
        return
    train_tokenizer(texts[:SHIPPED_DOCS], vocab_size=2048).save(os.path.join(args.out_dir, "tokenizer.json"))
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 4096,
                   "chat_template": CHAT_TEMPLATE}, f, indent=2)
    write_jsonl(os.path.join(args.out_dir, "sft.jsonl"), make_sft_records(500))
    write_jsonl(os.path.join(args.out_dir, "rollouts.jsonl"), make_rollouts(128))


if __name__ == "__main__":
    run_command(main)
