"""The run's own training checkpoints: DCP save/resume of model, optimizer, LR schedule, data
position and RNG; complete-only resume, damaged steps moved aside, HF exports."""

import dataclasses
import functools
import io
import json
import os
import shutil

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpoint import CheckpointManager

from longctx.base import CheckpointError, barrier, global_rank, log
from longctx.checkpoint.dcp import is_complete, list_steps
from longctx.checkpoint.files import dcp_error_line
from longctx.checkpoint.hf import export_hf
from longctx.checkpoint.source import WeightSource, checkpoint_folder


class TrainState(Stateful):
    """The step and the RNG states. No step draws random numbers today; dropout or sampling would."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        buffer = io.BytesIO()
        torch.save(rng, buffer)  # one opaque entry: a CPU checkpoint resumes on GPU and back
        return {"step": torch.tensor(self.step), "rng": buffer}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        state["rng"].seek(0)  # DCP round-trips the BytesIO object itself
        rng = torch.load(state["rng"], weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])



class LoaderState(Stateful):
    """The data position as one JSON string: every rank packs the same global stream, so one copy
    serves any dp degree on resume, and its nested lists are not flattened into DCP keys."""

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.loader.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(json.loads(state["json"]))



@functools.cache
def _stager_closes_itself() -> bool:
    """Whether this torch's DefaultStager fails at its second stage (see Checkpointer._drop_closed_stager).
    Asked of the behaviour, not the version number: the fix may be backported."""
    stager = DefaultStager(StagingOptions(False, False, False, False))  # CPU copies, this thread: no CUDA, no pool
    try:
        stager.stage({"x": torch.zeros(1)})
        stager.stage({"x": torch.zeros(1)})
        return False
    except KeyError:
        return True
    finally:
        stager.close()



class Checkpointer:
    """save(step) after every step; resume() once before the loop. HF exports go to
    {dump_folder}/hf/step-N every checkpoint.export_interval steps and, with last_save_in_hf, at the end."""

    def __init__(self, job_config, model, optimizers, lr_schedulers, loader, spec, model_args, source: WeightSource):
        ckpt = job_config.checkpoint  # keep_latest_k=1 is refused at config time (components/config.py)
        self.job_config, self.model, self.spec, self.model_args, self.source = job_config, model, spec, model_args, source
        self.folder = checkpoint_folder(job_config)
        self.train_state = TrainState()
        self.stale: set[int] = set()
        # The manager does what it does well: DCP save/load, async, keep_latest_k. Initial loads
        # are ours (checked, explicit precedence), and the last save is a full one so that a
        # finished run resumes or extends; HF goes to its own folder, never among step-N.
        config = dataclasses.replace(ckpt, initial_load_path=None, initial_load_in_hf=False,
                                     last_save_model_only=False, last_save_in_hf=False)
        self.manager = CheckpointManager(LoaderState(loader), [model], optimizers, lr_schedulers,
                                         {"train_state": self.train_state}, config, sd_adapter=None,
                                         base_folder=job_config.job.dump_folder)

    def resume(self) -> int:
        """Loads the run's own checkpoint if the weight source is one; returns the last step done."""
        ckpt = self.job_config.checkpoint
        start = self.source.step or 0
        # Folders past the resumed step belong to an abandoned future. Damaged ones move aside, out
        # of reach of keep_latest_k and of the save that reuses their name. Incomplete ones (a
        # killed save) go now, so keep_latest_k never counts them; complete ones (a run rewound
        # with load_step) go when the run reaches their step, before that step is written again,
        # so no half-overwritten folder keeps an old `.metadata`.
        if ckpt.enable and not ckpt.load_only:
            self._move_damaged(self.source.damaged)
            later = {s: p for s, p in list_steps(self.folder).items() if s > start}
            self._remove([p for p in later.values() if not is_complete(p)])
            self.stale = {s for s, p in later.items() if is_complete(p)}
        if self.source.kind != "resume":
            return 0
        try:
            self.manager.load(self.source.step)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise CheckpointError(f"cannot resume from {self.source.path}: {dcp_error_line(e)}") from None
        return self.train_state.step

    def save(self, step: int, last_step: bool = False, now: bool = False) -> None:
        """now: whatever checkpoint.interval says, and synchronously (a preempted run's last save)."""
        self.train_state.step = step
        self._drop_closed_stager()
        if step in self.stale:
            self._remove([os.path.join(self.folder, f"step-{step}")])
            self.stale.discard(step)
        self.manager.save(step, last_step=last_step or now)
        ckpt = self.job_config.checkpoint
        if (ckpt.export_interval > 0 and step % ckpt.export_interval == 0) or (last_step and ckpt.last_save_in_hf):
            self.export(os.path.join(self.job_config.job.dump_folder, "hf", f"step-{step}"))

    def export(self, out_dir: str) -> None:
        ckpt = self.job_config.checkpoint
        export_hf(self.model, self.spec, self.model_args, out_dir, ckpt.export_dtype,
                  self.job_config.model.hf_assets_path, ckpt.export_max_shard_gb, overwrite=True)

    def _move_damaged(self, paths: tuple[str, ...]) -> None:
        """Into {folder}/damaged/ (whose name matches no step pattern: torchtitan's keep_latest_k
        purge searches for `step-N` in names), for the user to inspect; never deleted."""
        barrier()
        if global_rank() == 0:
            for path in paths:
                target, n = os.path.join(self.folder, "damaged", os.path.basename(path)), 1
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(self.folder, "damaged", f"{os.path.basename(path)}.{n}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.rename(path, target)
                log(f"checkpoint: moved the damaged {path} to {target}")
        barrier()

    def _remove(self, paths: list[str]) -> None:
        """Collective: every rank listed the folders before rank 0 deletes any."""
        barrier()
        if global_rank() == 0:
            for path in paths:
                metadata = os.path.join(path, ".metadata")
                if os.path.exists(metadata):
                    os.remove(metadata)  # first: a kill during rmtree must not leave a "complete" folder
                shutil.rmtree(path, ignore_errors=True)
        barrier()

    def _drop_closed_stager(self) -> None:
        """async_with_pinned_mem: torchtitan builds one DefaultStager and stages every save with it,
        but torch 2.11's stager closes its deep copier at the end of each stage (pytorch#170431), so
        the next save dies in it with `KeyError: <class 'type'>` (pytorch#183413; 2.13 keeps it open,
        pytorch#183424). Under such a torch, once a save is staged its stager is closed (which also
        ends its staging thread) and dropped: torchtitan builds a new one at the next save. Cost: new
        pinned buffers every save, which that torch allocates anyway (the close released the old)."""
        if self.manager.enable_staging and self.manager.stager is not None and _stager_closes_itself():
            self.manager.maybe_wait_for_staging()
            self.manager.stager.close()
            self.manager.stager = None

    def maybe_wait_for_staging(self) -> None:
        """Before the optimizer step: async_with_pinned_mem may still be copying the weights to host."""
        self.manager.maybe_wait_for_staging()

    def close(self) -> None:
        if self.manager.enable:
            self.manager._async_wait()  # a save in flight ends before the process group does; close() leaves it
        self.manager.close()

