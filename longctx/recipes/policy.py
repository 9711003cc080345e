"""Offline policy training: a clipped policy-gradient loss (PPO/GRPO style) on rollouts from a file.

A rollout is one JSON line:
    {"prompt_ids": [...], "response_ids": [...], "advantage": float, "old_logprobs": [...]}
("prompt"/"response" text instead of ids when model.hf_assets_path holds a tokenizer; old_logprobs
is optional: one per response token, from the sampler or scripts/compute_logprobs.py). With
recipe.apply_chat_template, text is rendered with the model's chat template (data/chat.py): the
prompt as the user turn, the response as the assistant's (without the <|im_end|> the template adds).

Per response token, with ratio r = exp(log p - old log p) and the rollout's advantage A:
    loss = -min(r * A, clip(r, 1 - eps, 1 + eps) * A)     (PPO, Schulman et al. 2017, arXiv:1707.06347)
loss_sum returns the sum over this rank's response tokens and train_step divides by the GLOBAL
count of response tokens (their labels): a token mean over the whole batch, the same under every
layout. Without old_logprobs the ratio is 1 (old = log p detached): on-policy REINFORCE with A.

log p comes from chunked_token_logprobs inside the model's forward, so under any dp/tp/cp layout a
rank holds per-token scalars of its own tokens only, never logits. Rollouts are packed whole,
never split across rows: a token's log-probability is the policy's only if it sees its prompt.
"""

import functools
import math
import os

import torch

from longctx.base import IGNORE_INDEX, DataError
from longctx.data.chat import ChatTemplate
from longctx.data.documents import load_documents
from longctx.data.packing import PackedStream
from longctx.data.tokenizer import HFTokenizer
from longctx.models.common.loss import chunked_token_logprobs

EXTRA_FIELDS = ("advantages", "old_logprobs")  # per-token floats packed next to the tokens


class PolicyRecipe:
    def __init__(self, job_config, section: str = "training"):
        self.job_config = job_config
        assets = job_config.model.hf_assets_path
        has_tokenizer = bool(assets) and os.path.isfile(os.path.join(assets, "tokenizer.json"))
        self.tokenizer = HFTokenizer(assets) if has_tokenizer else None  # ids-only rollouts need none
        self.vocab_size = self.tokenizer.vocab_size if self.tokenizer else 0
        self.pad_id = self.tokenizer.eos_id if self.tokenizer else 0
        self.clip_eps = job_config.recipe.clip_eps
        self.chat = None  # with recipe.apply_chat_template: prompt/response text through the model's template
        if job_config.recipe.apply_chat_template:
            if self.tokenizer is None:
                raise DataError(f"recipe.apply_chat_template needs a tokenizer.json in model.hf_assets_path={assets!r}")
            self.chat = ChatTemplate(self.tokenizer, assets, job_config.recipe.chat_template_kwargs)
        data = getattr(job_config, section)  # training, or validation's held-out set
        self.dataset_path = data.dataset_path
        self.documents = load_documents(data.dataset_path, data.dataset, text_field=None, section=section)
        self.largest_token_id, self.longest_document = self.check_rollouts(data.dataset_path)

    def check_rollouts(self, path: str) -> tuple[tuple[int, str], tuple[int, str]]:
        """Every rollout, before step 1 (a rollouts file is bounded in size): a bad one would
        otherwise stop the run at the step that reaches it, hours in. Returns the largest token id
        and the longest rollout, each with its file:line, which launch.validate holds against the
        model's vocab_size and the longest row."""
        largest, longest, labelled = (-1, ""), (0, ""), 0
        for index in range(len(self.documents)):
            record = self.documents[index]  # malformed JSON / not UTF-8: refused here, file:line
            try:
                tokens, labels, _, _ = self.encode(record)
            except DataError as e:
                raise DataError(f"{self.documents.where(index)}: {e}") from None
            largest = max(largest, (max(tokens), self.documents.where(index)))
            longest = max(longest, (len(tokens), self.documents.where(index)))
            labelled += len(labels) - labels.count(IGNORE_INDEX)
        if labelled == 0:
            raise DataError(f"no rollout in {path!r} has a response token: nothing to train on")
        return largest, longest

    def token_ids(self, record: dict, name: str) -> list[int]:
        ids = record.get(f"{name}_ids")
        if ids is not None:
            bad = next((t for t in ids if type(t) is not int or t < 0), None) if isinstance(ids, list) else ids
            if bad is not None:
                raise DataError(f"{name}_ids holds {bad!r}; token ids are integers >= 0")
            return list(ids)
        return self.tokenizer.encode(self.text(record, name))

    def text(self, record: dict, name: str) -> str:
        if record.get(name) is None:
            raise DataError(f"the rollout has no {name}_ids or {name}; rollouts need prompt_ids/prompt, "
                            "response_ids/response and advantage")
        if not isinstance(record[name], str):
            raise DataError(f"{name} is a {type(record[name]).__name__}, not a string")
        if self.tokenizer is None:
            raise DataError(f"the rollout has {name!r} text but no {name}_ids, and model.hf_assets_path="
                            f"{self.job_config.model.hf_assets_path!r} has no tokenizer.json; give ids or a tokenizer")
        return record[name]

    def encode(self, record: dict) -> tuple[list[int], list[int], list[float], list[float]]:
        """(tokens, labels, advantages, old_logprobs): labels mark the response tokens."""
        if self.chat is not None and record.get("prompt_ids") is None and record.get("response_ids") is None:
            texts = self.chat.prompt_and_response(self.text(record, "prompt"), self.text(record, "response"))
            prompt, response = map(self.tokenizer.encode, texts)
        else:
            prompt, response = self.token_ids(record, "prompt"), self.token_ids(record, "response")
        if not prompt:
            raise DataError("the rollout has an empty prompt; the first response token needs at least one token before it")
        advantage = record.get("advantage")
        if not _is_number(advantage) or not math.isfinite(advantage):
            raise DataError(f"advantage={advantage!r}; give every rollout a finite number (e.g. reward - group mean)")
        old = record.get("old_logprobs")
        if old is None:
            old = [math.nan] * len(response)  # NaN: "take the current log p", see loss_sum
        elif not isinstance(old, list) or len(old) != len(response):
            count = len(old) if isinstance(old, list) else f"non-list {old!r:.40}"
            raise DataError(f"the rollout has {count} old_logprobs for {len(response)} response tokens; give one per response token")
        else:
            # A log-probability is finite and <= 0: anything else makes the importance ratio inf or NaN.
            bad = next((x for x in old if not _is_number(x) or not (math.isfinite(x) and x <= 0)), None)
            if bad is not None:
                raise DataError(f"old_logprobs holds {bad!r}; a log-probability is a finite number <= 0")
        # Position i predicts token i+1: the last prompt token predicts the first response token.
        before, after = [IGNORE_INDEX] * (len(prompt) - 1), [IGNORE_INDEX]
        labels = before + response + after
        advantages = [0.0] * len(before) + [float(advantage)] * len(response) + [0.0]
        old_logprobs = [0.0] * len(before) + [float(x) for x in old] + [0.0]
        return prompt + response, labels, advantages, old_logprobs

    def build_stream(self) -> PackedStream:
        # Whole rollouts: a token's log-probability is the policy's only if it sees its prompt. Under
        # a seq_len_schedule a stage shorter than a rollout cuts its tail (counted per pass).
        return PackedStream(self.documents, self.encode, self.pad_id, extra_fields=EXTRA_FIELDS, split_documents=False,
                            name=f"policy: rollouts of {self.dataset_path}")

    def token_logprobs(self, model, batch: dict[str, torch.Tensor], loss_chunk: int) -> torch.Tensor:
        """log p(label) per local token, [B, T_local] fp32, 0 where there is no label."""
        head = functools.partial(chunked_token_logprobs, labels=batch["labels"], chunk_size=loss_chunk)
        return model(batch["input_ids"], batch["position_ids"], batch.get("document_ids"), head=head)

    def loss_sum(self, model, batch: dict[str, torch.Tensor], loss_chunk: int):
        """(sum of token losses, metric sums) on this rank's tokens."""
        logp = self.token_logprobs(model, batch, loss_chunk)
        mask = batch["labels"] != IGNORE_INDEX
        old = torch.where(batch["old_logprobs"].isnan(), logp.detach(), batch["old_logprobs"])
        ratio = torch.exp(logp - old)
        advantages = batch["advantages"]
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * advantages
        loss = torch.where(mask, -torch.minimum(unclipped, clipped), 0.0).sum()
        # Tokens whose clipped term wins get no gradient; train_step turns sums into token means.
        metric_sums = {
            "clip_fraction": (mask & (clipped < unclipped)).sum().float(),
            "ratio_mean": torch.where(mask, ratio.detach(), 0.0).sum(),
        }
        return loss, metric_sums


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
