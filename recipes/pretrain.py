"""Continued pretraining: packed documents, next-token cross-entropy on every real token."""

import functools

import torch

from models.common.loss import chunked_cross_entropy_sum
from recipes.data import HFTokenizer, PackedStream, load_documents, next_token_labels


class PretrainRecipe:
    def __init__(self, job_config):
        self.job_config = job_config
        self.tokenizer = HFTokenizer(job_config.model.hf_assets_path)
        training = job_config.training
        self.documents = load_documents(training.dataset_path, training.dataset, job_config.recipe.text_field)
        self.text_field = job_config.recipe.text_field
        self.vocab_size = self.tokenizer.vocab_size

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        tokens = self.tokenizer.encode(record[self.text_field]) + [self.tokenizer.eos_id]
        return tokens, next_token_labels(tokens)

    def build_stream(self, padded_len: int) -> PackedStream:
        return PackedStream(self.documents, self.encode, self.job_config.training.seq_len, padded_len, self.tokenizer.eos_id)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(sum of token losses on this rank's tokens, no recipe metrics)."""
        return next_token_loss_sum(model, batch, self.job_config.recipe.loss_chunk_size), {}


def next_token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Sum of the cross-entropy of every labelled token on this rank (pretraining and SFT: only
    their labels differ); the logits exist one chunk at a time, inside the model's forward."""
    head = functools.partial(chunked_cross_entropy_sum, labels=batch["labels"], chunk_size=chunk_size)
    return model(batch["input_ids"], batch["position_ids"], batch.get("document_ids"), head=head)
