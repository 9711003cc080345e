"""An HF tokenizer.json through `tokenizers`, with the EOS of tokenizer_config.json."""

import json
import os

from tokenizers import Tokenizer

from longctx.base import DataError


class HFTokenizer:
    """tokenizer.json through `tokenizers`; EOS from tokenizer_config.json."""

    def __init__(self, assets_path: str):
        path = os.path.join(assets_path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"no tokenizer.json in model.hf_assets_path={assets_path!r}; point it at an HF tokenizer folder")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise DataError(f"{path} is not a readable tokenizer.json ({' '.join(str(e).split())[:200]}); "
                            "replace it with the model's own") from None
        self.config = _read_json(os.path.join(assets_path, "tokenizer_config.json"))  # also read by data/chat.py
        eos = self.config.get("eos_token") or "<|endoftext|>"
        eos = eos["content"] if isinstance(eos, dict) else eos
        self.eos_id = self.tokenizer.token_to_id(eos)
        if self.eos_id is None:
            raise DataError(f"EOS token {eos!r} is not in {path}")
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id



def _read_json(path: str) -> dict:
    """A JSON object file, {} when there is none."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object")
    return config


def document_tokens(tokenizer: HFTokenizer, text: str) -> list[int]:
    """A document as pretraining sees it: EOS closes it, so the model learns where text ends."""
    return tokenizer.encode(text) + [tokenizer.eos_id]
