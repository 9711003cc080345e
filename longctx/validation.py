"""[validation]: a held-out loss every `validation.freq` steps.

The held-out documents go through the run's own recipe and packing (build_recipe(job_config,
"validation"), built and checked by launch.validate before any process group, as the training
recipe is), so they are tokenized, packed and masked exactly like training rows.
train.validation_loss sums token losses over `validation.steps` batches on every rank and divides
by their global count of labelled tokens, as train_step does: every dp/tp/cp layout reports the
one-process value. Each evaluation reads the same batches, so the
values are comparable from step to step.
"""

from longctx.config import JobConfig
from longctx.data.loader import RowSchedule, StepLoader
from longctx.recipes import Recipe


def held_out_rows(job_config: JobConfig) -> tuple[tuple[str, int], int]:
    """((the key that sets it, seq_len), local_batch_size) of validation rows; -1 takes training's."""
    v, training = job_config.validation, job_config.training
    seq_len = ("training.seq_len", training.seq_len) if v.seq_len == -1 else ("validation.seq_len", v.seq_len)
    return seq_len, training.local_batch_size if v.local_batch_size == -1 else v.local_batch_size


class Validator:
    """The held-out recipe (launch.validate's Job.held_out); `batches` packs the same
    validation.steps batches each time."""

    def __init__(self, job_config: JobConfig, parallel_dims, recipe: Recipe):
        self.recipe = recipe
        (_, seq_len), self.local_batch_size = held_out_rows(job_config)
        self.freq, self.steps = job_config.validation.freq, job_config.validation.steps
        self.schedule = RowSchedule.constant(seq_len, parallel_dims.seq_multiple)
        self.parallel_dims = parallel_dims

    def due(self, step: int) -> bool:
        return step == 1 or step % self.freq == 0  # torchtitan's rule: an early reading, then every freq

    def batches(self):
        """Per validation step, this rank's micro-batch (one: validation has no gradient to accumulate)."""
        dims, local_batch = self.parallel_dims, self.local_batch_size
        loader = StepLoader(self.recipe.build_stream(), self.schedule, local_batch, local_batch * dims.dp,
                            dims.dp, dims.mesh("dp").get_local_rank())
        try:
            for step in range(1, self.steps + 1):
                yield loader.next_step(step).microbatches
        finally:
            loader.close()
