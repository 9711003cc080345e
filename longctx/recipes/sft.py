"""Supervised fine-tuning on chat records: the model's own chat template, loss on the assistant's tokens.

A record is {"messages": [...], "tools": [...]?} with the messages as the template reads them:
{"role", "content"}, and for Qwen3's template also "reasoning_content", "tool_calls" and "tool"
messages. data/chat.py renders it with model.hf_assets_path's template and marks the tokens the
assistant writes (thinking block, tool calls, answer and the closing <|im_end|>); role headers,
the other turns and the newline after <|im_end|> carry no loss. Labels are shifted on the whole
conversation before packing, so they shard with the tokens under any dp/tp/cp layout.
`scripts/show_sft.py` prints what this recipe trains on.
"""


from longctx.base import IGNORE_INDEX, DataError, log
from longctx.data.chat import ChatTemplate
from longctx.data.documents import load_documents
from longctx.data.packing import PackedStream
from longctx.data.tokenizer import HFTokenizer
from longctx.recipes.pretrain import next_token_loss_sum


class SFTRecipe:
    def __init__(self, job_config, section: str = "training"):
        assets = job_config.model.hf_assets_path
        self.tokenizer = HFTokenizer(assets)
        self.chat = ChatTemplate(self.tokenizer, assets, job_config.recipe.chat_template_kwargs)
        if not self.chat.from_folder:
            log(f"{assets} has no chat template (tokenizer_config.json or chat_template.jinja): "
                "rendering Qwen's plain <|im_start|>role ... <|im_end|> turns")
        self.field = job_config.recipe.messages_field
        data = getattr(job_config, section)  # training, or validation's held-out set
        self.documents = load_documents(data.dataset_path, data.dataset, text_field=None, section=section)
        if self.field not in self.documents.column_names:
            raise DataError(f"{section}.dataset_path={data.dataset_path!r} has no column {self.field!r} (columns: "
                            f"{self.documents.column_names}); set recipe.messages_field")
        self.vocab_size, self.dataset_path = self.tokenizer.vocab_size, data.dataset_path

    def tokens_and_trained(self, record: dict) -> tuple[list[int], list[bool]]:
        """What trains on `record`: its rendered tokens, and which are the assistant's."""
        return self.chat.encode(record.get(self.field), record.get("tools"))

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        tokens, trained = self.tokens_and_trained(record)
        # Position i predicts token i+1; it carries loss only when token i+1 is an assistant token.
        labels = [nxt if learn else IGNORE_INDEX for nxt, learn in zip(tokens[1:], trained[1:])] + [IGNORE_INDEX]
        return tokens, labels

    def located(self, index: int, fn):
        """fn(record `index`), a refusal naming the record's file and line."""
        try:
            return fn(self.documents[index])
        except DataError as e:
            raise DataError(f"{self.documents.where(index)}: {e}") from None

    def encode_at(self, index: int) -> tuple[list[int], list[int]]:
        """The stream's encode: it indexes the records, so that a refusal can name the file and line."""
        return self.located(index, self.encode)

    def build_stream(self) -> PackedStream:
        # Whole conversations, cut to the row when longer: a split-off tail would learn replies without their prompt.
        return PackedStream(range(len(self.documents)), self.encode_at, self.tokenizer.eos_id, split_documents=False,
                            name=f"sft: conversations of {self.dataset_path}")

    def loss_sum(self, model, batch, loss_chunk: int):
        """(sum of token losses on this rank's tokens, no recipe metrics): pretraining's loss, other labels."""
        return next_token_loss_sum(model, batch, loss_chunk), {}
