"""Documents, tokenizer, packing, token shards, chat rendering, and the step loader: the CPU side of a batch."""
