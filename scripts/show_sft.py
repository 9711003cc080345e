"""What the SFT recipe trains on, token by token: check chat data and its template before a long run.

    python scripts/show_sft.py --job.config_file train_configs/debug_sft.toml --output OUT.jsonl [--limit N]
    python scripts/show_sft.py --job.config_file CONFIG --model.hf_assets_path DIR --training.dataset_path DATA \\
        --recipe.chat_template_kwargs enable_thinking False --output OUT.jsonl

Prints the first records as the model sees them, trained tokens highlighted (color in a terminal,
[[brackets]] otherwise), and writes one JSON line per record, {"input_ids": [...], "trained": [0/1
per token]}: the SFT recipe's own rendering, masking and truncation to training.seq_len (position
i's label is token i+1 when token i+1 is trained). Any --section.key overrides the job config.
No model is built and no process group started.
"""

import argparse
import json
import sys

from longctx.base import ConfigError
from longctx.config import parse_config
from longctx.launch import check_output, run_command
from longctx.recipes.sft import SFTRecipe

GREEN, RESET = "\033[1;32m", "\033[0m"


def highlight(tokenizer, ids: list[int], trained: list[bool], color: bool) -> str:
    """The decoded text, each run of trained tokens in green (color) or [[brackets]]."""
    text, start = "", 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            piece = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            if trained[start]:
                piece = f"{GREEN}{piece}{RESET}" if color else f"[[{piece}]]"
            text, start = text + piece, end
    return text


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="where to write the JSON lines")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records (default: all)")
    parser.add_argument("--print", type=int, default=3, dest="n_print", help="records printed (default 3)")
    args, overrides = parser.parse_known_args(argv)
    for flag, value in (("--limit", args.limit), ("--print", args.n_print)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} {value} must be >= 0 (a number of records)")
    check_output("--output", args.output)
    job_config = parse_config(overrides)
    if job_config.recipe.name != "sft":
        raise ConfigError(f"recipe.name = {job_config.recipe.name!r}; show_sft.py shows an SFT config's data")
    recipe = SFTRecipe(job_config)
    n = len(recipe.documents) if args.limit is None else min(args.limit, len(recipe.documents))
    color, seq_len, cut = sys.stdout.isatty(), job_config.training.seq_len, 0
    with open(args.output, "w") as f:
        for index in range(n):
            ids, trained = recipe.located(index, recipe.tokens_and_trained)
            cut += len(ids) > seq_len  # as training cuts a conversation to its row
            ids, trained = ids[:seq_len], trained[:seq_len]
            f.write(json.dumps({"input_ids": ids, "trained": [int(t) for t in trained]}) + "\n")
            if index < args.n_print:
                print(f"--- record {index}: {len(ids)} tokens, {sum(trained)} trained")
                print(highlight(recipe.tokenizer.tokenizer, ids, trained, color))
    print(f"wrote {n} records to {args.output}; {cut} cut to training.seq_len={seq_len}")


if __name__ == "__main__":
    run_command(main)
