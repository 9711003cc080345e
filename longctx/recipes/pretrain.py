"""Continued pretraining: packed documents, next-token cross-entropy on every real token.

training.dataset_path is raw documents (tokenized on the fly, every rank the whole stream: small
data) or a folder written by scripts/tokenize_corpus.py (each rank reads only its rows: any size)."""

import functools
from array import array

import torch

from longctx.base import MAX_SEQ_LEN
from longctx.data.documents import load_documents
from longctx.data.packing import PackedStream, next_token_labels
from longctx.data.token_shards import TokenCorpus, TokenStream, is_token_folder
from longctx.data.tokenizer import HFTokenizer, document_tokens
from longctx.models.common.loss import chunked_cross_entropy_sum

# Tokens of documents kept tokenized (int32: 64 MiB at most). A corpus smaller than a row is
# re-read many times per row (epochs wrap); one below this is tokenized once. It is the longest
# seq_len the config accepts, so a corpus the cache cannot hold is longer than a row: a row then
# tokenizes at most its own length of text, as with any corpus.
CACHED_TOKENS = MAX_SEQ_LEN


class PretrainRecipe:
    def __init__(self, job_config, section: str = "training"):
        self.tokenizer = HFTokenizer(job_config.model.hf_assets_path)
        data = getattr(job_config, section)  # training, or validation's held-out set
        if is_token_folder(data.dataset_path):
            self.documents = TokenCorpus(data.dataset_path, self.tokenizer)
        else:  # each document's text is checked (a string, UTF-8, valid JSON) as it is read: file:line
            self.documents = load_documents(data.dataset_path, data.dataset, job_config.recipe.text_field, section)
        self.text_field = job_config.recipe.text_field
        self.vocab_size = self.tokenizer.vocab_size
        self.cache: dict[str, array] = {}  # document text -> its tokens and EOS
        self.cached_tokens = 0

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        text = record[self.text_field]
        tokens = self.cache.get(text)
        if tokens is None:
            tokens = array("i", document_tokens(self.tokenizer, text))
            if self.cached_tokens + len(tokens) <= CACHED_TOKENS:
                self.cache[text] = tokens
                self.cached_tokens += len(tokens)
        tokens = tokens.tolist()
        return tokens, next_token_labels(tokens)

    def build_stream(self) -> PackedStream | TokenStream:
        if isinstance(self.documents, TokenCorpus):
            return TokenStream(self.documents, self.tokenizer.eos_id)
        return PackedStream(self.documents, self.encode, self.tokenizer.eos_id)

    def loss_sum(self, model, batch: dict[str, torch.Tensor], loss_chunk: int) -> tuple[torch.Tensor, dict]:
        """(sum of token losses on this rank's tokens, no recipe metrics)."""
        return next_token_loss_sum(model, batch, loss_chunk), {}


def next_token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Sum of the cross-entropy of every labelled token on this rank (pretraining and SFT: only
    their labels differ); the logits exist one chunk at a time, inside the model's forward."""
    head = functools.partial(chunked_cross_entropy_sum, labels=batch["labels"], chunk_size=chunk_size)
    return model(batch["input_ids"], batch["position_ids"], batch.get("document_ids"), head=head)
