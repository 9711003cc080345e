"""Per-token log-probabilities of a model for a rollouts file: the old_logprobs of the policy recipe.

    python scripts/compute_logprobs.py --model-dir HF_DIR --input ROLLOUTS.jsonl --output OUT.jsonl
    torchrun --nproc_per_node 8 scripts/compute_logprobs.py --model-dir HF_DIR --input R.jsonl --output O.jsonl \\
        --parallelism.context_parallel_degree 4 --parallelism.tensor_parallel_degree 2
    python scripts/compute_logprobs.py --job.config_file CONFIG --input R.jsonl --output O.jsonl \\
        --checkpoint.enable    # the run's own latest checkpoint (or checkpoint.load_step), or instead
        --checkpoint.initial_load_path DCP_OR_HF_DIR [--checkpoint.initial_load_in_hf]

Each output line is the input record plus "response_logprobs": one float per response token.
Rollouts take the policy recipe's format (ids, or text with model.hf_assets_path's tokenizer).
Any further --section.key arguments override the job config, as for train.py.

The model is built, loaded and sharded by train.py's own functions, under any dp/tp/cp layout.
Rollouts are packed whole into rows (document-masked, as in training) of training.seq_len tokens,
or of the longest rollout if that is longer; dp groups score different rows, and only per-token
scalars cross ranks.
"""

import argparse
import json

import torch
import torch.distributed as dist

from longctx.base import IGNORE_INDEX, ConfigError, log, pack_greedy
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.data.documents import load_documents
from longctx.data.packing import collate, pack_row
from longctx.launch import check_output, distributed, run_command, validate
from longctx.modeling import build_model, hf_folder_args
from longctx.parallelisms.context_parallel import unshard_row
from longctx.parallelisms.settings import forward_context, loss_context
from longctx.recipes.policy import EXTRA_FIELDS


def config_args(model_dir: str | None, input_path: str, overrides: list[str]) -> list[str]:
    """Job-config arguments: the policy recipe on the input, the HF model folder if given, then overrides."""
    args = ["--recipe.name", "policy", "--training.dataset_path", input_path, "--training.dataset", "json"]
    return args + (hf_folder_args(model_dir) if model_dir else []) + overrides


def read_jsonl(path: str) -> list[dict]:
    return list(load_documents(path, "json", text_field=None))


@torch.no_grad()
def score_row(model, recipe, row: dict, parallel_dims, settings, device) -> torch.Tensor:
    """log p(label) over the whole row [T]: each cp rank scores its tokens, then they are gathered
    and put back in token order (cp ranks hold head-tail chunks when the sequence is sharded)."""
    batch = parallel_dims.shard_for_cp({k: v.to(device) for k, v in collate([row]).items()})
    with loss_context(settings), forward_context(settings, device.type):
        local = recipe.token_logprobs(model, batch, settings.loss_chunk)[0]  # [T/cp]
    if parallel_dims.cp == 1:
        return local
    chunks = [torch.empty_like(local) for _ in range(parallel_dims.cp)]
    dist.all_gather(chunks, local.contiguous(), group=parallel_dims.mesh("cp").get_group())
    return unshard_row(chunks, parallel_dims.cp_shard)


def compute_logprobs(job_config, job, rollouts: list[dict], device) -> dict[int, list[float]]:
    """{rollout index: response log-probs} for the rows of this rank's dp group (a process group must exist)."""
    spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
    # The run's own step (checkpoint.enable) is read like any model-only checkpoint: no optimizer.
    model = build_model(spec, model_args, parallel_dims, settings, device, weight_source(job_config).model_only())
    segments = [recipe.encode(rollout) for rollout in rollouts]
    row_len = max([job_config.training.seq_len] + [len(s[0]) for s in segments])
    padded_len = parallel_dims.padded_len(row_len)
    rows = pack_greedy([len(s[0]) for s in segments], row_len)  # whole rollouts, in file order
    dp, dp_rank = parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank()
    results = {}
    # Every rank runs the same number of forwards (FSDP gathers weights collectively): a dp group
    # without a row left scores an empty one.
    for first in range(0, len(rows), dp):
        indices = rows[first + dp_rank] if first + dp_rank < len(rows) else []
        row = pack_row([segments[i] for i in indices], padded_len, recipe.pad_id, EXTRA_FIELDS)
        logprobs = score_row(model, recipe, row, parallel_dims, settings, device)
        response = logprobs[row["labels"] != IGNORE_INDEX].tolist()  # response tokens, rollout after rollout
        for i in indices:
            n = sum(label != IGNORE_INDEX for label in segments[i][1])
            results[i], response = response[:n], response[n:]
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="Hugging Face model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--input", required=True, help="rollouts, JSON lines")
    parser.add_argument("--output", required=True, help="where to write the rollouts with response_logprobs")
    args, overrides = parser.parse_known_args(argv)
    if not args.model_dir and not any(a.split("=")[0] == "--job.config_file" for a in overrides):
        raise ConfigError("give --model-dir HF_DIR, or --job.config_file CONFIG with the checkpoint to score")
    check_output("--output", args.output)  # before any forward: a bad path would fail after all of them
    job_config = parse_config(config_args(args.model_dir, args.input, overrides))
    job = validate(job_config)
    rollouts = read_jsonl(args.input)
    with distributed(job_config) as device:
        results = compute_logprobs(job_config, job, rollouts, device)
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if dist.get_rank() == 0:
            merged = {i: lp for part in gathered for i, lp in part.items()}
            with open(args.output, "w") as f:
                for i, rollout in enumerate(rollouts):
                    f.write(json.dumps({**rollout, "response_logprobs": merged[i]}) + "\n")
            log(f"wrote {len(rollouts)} rollouts with response_logprobs to {args.output}")


if __name__ == "__main__":
    run_command(main)
