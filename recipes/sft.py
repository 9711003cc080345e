"""Supervised fine-tuning on chat records: Qwen's chat format, loss on assistant turns only.

A record is {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]},
rendered the way Qwen's chat template renders plain turns (no default system prompt is added):
    <|im_start|>{role}\\n{content}<|im_end|>\\n
The model learns each assistant turn's content and its closing <|im_end|> (where it must stop);
role headers, the other turns and the newline after <|im_end|> carry no loss. Labels are shifted
on the whole conversation before packing, so they shard with the tokens under any dp/tp/cp layout.
"""

from models.common.loss import IGNORE_INDEX
from recipes.data import DataError, HFTokenizer, PackedStream, load_documents
from recipes.pretrain import PretrainRecipe

ROLES = ("system", "user", "assistant")


class SFTRecipe:
    def __init__(self, job_config):
        self.job_config = job_config
        self.tokenizer = HFTokenizer(job_config.model.hf_assets_path)
        self.im_start, self.im_end = self.tokenizer.token_id("<|im_start|>"), self.tokenizer.token_id("<|im_end|>")
        self.newline = self.tokenizer.encode("\n")
        self.field = job_config.recipe.messages_field
        training = job_config.training
        self.documents = load_documents(training.dataset_path, training.dataset, text_field=None)
        if self.field not in self.documents.column_names:
            raise DataError(f"{training.dataset_path!r} has no column {self.field!r} (columns: "
                            f"{self.documents.column_names}); set recipe.messages_field")
        self.vocab_size = self.tokenizer.vocab_size

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        tokens, trained = [], []
        for message in record[self.field]:
            role = message["role"]
            if role not in ROLES:
                raise DataError(f"message role {role!r} is not one of {', '.join(ROLES)}; convert the record to Qwen's roles")
            header = [self.im_start] + self.tokenizer.encode(f"{role}\n")
            body = self.tokenizer.encode(message["content"]) + [self.im_end]
            tokens += header + body + self.newline
            trained += [False] * len(header) + [role == "assistant"] * len(body) + [False] * len(self.newline)
        # Truncate rather than split: a split-off tail would learn replies without their prompt.
        seq_len = self.job_config.training.seq_len
        tokens, trained = tokens[:seq_len], trained[:seq_len]
        # Position i predicts token i+1; it carries loss only when token i+1 is an assistant token.
        labels = [nxt if learn else IGNORE_INDEX for nxt, learn in zip(tokens[1:], trained[1:])] + [IGNORE_INDEX]
        return tokens, labels

    def build_stream(self, padded_len: int) -> PackedStream:
        return PackedStream(self.documents, self.encode, self.job_config.training.seq_len, padded_len,
                            self.tokenizer.eos_id, split_documents=False)

    # The same next-token loss as pretraining; only the labels differ.
    loss_sum = PretrainRecipe.loss_sum
