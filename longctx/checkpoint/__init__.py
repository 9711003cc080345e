"""Checkpoints: DCP and Hugging Face files, where a run's weights come from, and training checkpoints."""
