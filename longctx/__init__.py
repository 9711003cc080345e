"""Long-context training of Qwen2/Qwen2.5/Qwen3 models: FSDP2 x tensor parallel x Ulysses/sequence-shard
context parallel, torch.compile and activation checkpointing, Hugging Face weights in and out.

Layers, lowest first (docs/design.md, "Layers"; tests/test_layers.py enforces the imports):
  base           errors, the rank-0 log, shared constants
  config         the job config: TOML + --section.key overrides
  parallelisms   the mesh and every way of splitting or wrapping a model
  models         the decoder and its families (no config object, no process group)
  data           documents, tokenizer, packing, token shards, chat rendering, the step loader
  recipes        what a step computes from a batch: pretrain, sft, policy
  checkpoint     DCP and Hugging Face files, where the weights come from, training checkpoints
  planner        memory by term before launch, and the automatic layout
  launch, modeling, metrics, profiling, validation    what the commands share
  train          the training loop
"""
