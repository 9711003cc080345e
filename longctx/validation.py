"""[validation]: a held-out loss every `validation.freq` steps.

The held-out documents go through the run's own recipe and packing (a copy of the job config
whose training data is validation.dataset_path), so they are tokenized, packed and masked exactly
like training rows. train.validation_loss sums token losses over `validation.steps` batches on
every rank and divides by their global count of labelled tokens, as train_step does: every
dp/tp/cp layout reports the one-process value. Each evaluation reads the same batches, so the
values are comparable from step to step.
"""

import dataclasses

from longctx.config import JobConfig
from longctx.data.loader import RowSchedule, StepLoader
from longctx.recipes import build_recipe


def held_out_config(job_config: JobConfig) -> JobConfig:
    """The job config whose training data is the held-out set: what the recipe reads."""
    v, training = job_config.validation, job_config.training
    held_out = dataclasses.replace(
        training, dataset_path=v.dataset_path, dataset=v.dataset,
        seq_len=training.seq_len if v.seq_len == -1 else v.seq_len,
        local_batch_size=training.local_batch_size if v.local_batch_size == -1 else v.local_batch_size,
    )
    return dataclasses.replace(job_config, training=held_out)


class Validator:
    """The held-out recipe, built once; `batches` packs the same validation.steps batches each time."""

    def __init__(self, job_config: JobConfig, parallel_dims):
        self.config = held_out_config(job_config)
        self.recipe = build_recipe(self.config)
        self.freq, self.steps = job_config.validation.freq, job_config.validation.steps
        self.schedule = RowSchedule.constant(self.config.training.seq_len, parallel_dims.seq_multiple)
        self.parallel_dims = parallel_dims

    def due(self, step: int) -> bool:
        return step == 1 or step % self.freq == 0  # torchtitan's rule: an early reading, then every freq

    def batches(self):
        """Per validation step, this rank's micro-batch (one: validation has no gradient to accumulate)."""
        dims, local_batch = self.parallel_dims, self.config.training.local_batch_size
        loader = StepLoader(self.recipe.build_stream(), self.schedule, local_batch, local_batch * dims.dp,
                            dims.dp, dims.mesh("dp").get_local_rank())
        try:
            for step in range(1, self.steps + 1):
                yield loader.next_step(step).microbatches
        finally:
            loader.close()
