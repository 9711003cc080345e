"""The run's own training checkpoints over torch.distributed.checkpoint (DCP).

A step folder {dump_folder}/{checkpoint.folder}/step-N holds the model weights at the top level of
the state dict (so model-only loads and convert_dcp_to_hf read any step) and beside them
"optimizer", "lr_scheduler", "dataloader", "train_state" and the model record "model_args"
(torchtitan's layout, which checkpoints of earlier versions share). It counts once DCP has written
its `.metadata`, last. Saved every checkpoint.interval steps, in the background with
checkpoint.async_mode, and synchronously at the last step and when the run is stopped; the oldest
complete steps beyond keep_latest_k are deleted; HF exports go to {dump_folder}/hf/step-N."""

import contextlib
import functools
import io
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

from longctx.base import CheckpointError, barrier, global_rank, log
from longctx.checkpoint.dcp import complete_steps, is_complete, list_steps, model_record, read_dcp_metadata
from longctx.checkpoint.files import load_checkpoint
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


class OptimizerState(Stateful):
    """The optimizer's moments and step counts keyed by parameter name (optimizer.state.<name>.exp_avg),
    not by position: resharded on load like the weights, under any layout."""

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.OPTIONS)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=self.OPTIONS)


# async_with_pinned_mem's staging (torchtitan's): pinned, shared host memory, filled by a thread of
# the stager with non-blocking device-to-host copies.
PINNED_STAGING = StagingOptions(use_pinned_memory=True, use_shared_memory=True, use_async_staging=True,
                                use_non_blocking_copy=True)


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
    """resume() once before the loop, save(step) after every step, close() at the end (it waits for
    a save in flight). Every rank calls each of them at the same step."""

    def __init__(self, job_config, model, optimizer, lr_schedule, loader, spec, model_args, source: WeightSource):
        ckpt = job_config.checkpoint  # keep_latest_k=1 is refused at config time
        self.job_config, self.model, self.spec, self.model_args, self.source = job_config, model, spec, model_args, source
        self.folder = checkpoint_folder(job_config)
        self.saving = ckpt.enable and not ckpt.load_only
        self.train_state = TrainState()
        self.states = {"optimizer": OptimizerState(model, optimizer), "lr_scheduler": lr_schedule,
                       "dataloader": LoaderState(loader), "train_state": self.train_state}
        self.stale: set[int] = set()  # complete steps past the resumed one, removed when reached
        self.upload: Future | None = None  # the background save in flight
        self.staging: Future | None = None  # async_with_pinned_mem: its copy to host memory
        self.stager: DefaultStager | None = None
        # The background save's collectives go over a CPU group of their own (as in torchtitan),
        # never interleaved with the training's NCCL ones.
        self.group = dist.new_group(backend="gloo") if self.saving and ckpt.async_mode != "disabled" else None
        # rmtree of a large step takes seconds: rank 0 does it beside the training.
        self.purger = ThreadPoolExecutor(1) if self.saving and ckpt.keep_latest_k > 0 and global_rank() == 0 else None

    # ---------------------------------------------------------------- resume

    def resume(self) -> int:
        """Loads the run's own checkpoint if the weight source is one; returns the last step done.
        The model's record and weights were checked when it was built (dcp.check_dcp_checkpoint)."""
        if self.saving:
            self._tidy_later_steps(self.source.step or 0)
        if self.source.kind != "resume":
            return 0
        path = self.source.path
        _check_training_state(path)
        model_state = get_model_state_dict(self.model)
        load_checkpoint(model_state | self.states, path)
        set_model_state_dict(self.model, model_state)
        return self.train_state.step

    def _tidy_later_steps(self, start: int) -> None:
        """Folders past the resumed step belong to an abandoned future. Damaged ones move aside, out
        of reach of keep_latest_k and of the save that reuses their name. Incomplete ones (a killed
        save) go now. Complete ones (a run rewound with load_step) go when the run reaches their
        step, before it is written again, so no half-overwritten folder keeps an old `.metadata`."""
        self._move_damaged(self.source.damaged)
        later = {s: p for s, p in list_steps(self.folder).items() if s > start}
        self._remove([p for p in later.values() if not is_complete(p)])
        self.stale = {s for s, p in later.items() if is_complete(p)}

    # ---------------------------------------------------------------- save

    def save(self, step: int, last_step: bool = False, now: bool = False) -> None:
        """After every step. A checkpoint every checkpoint.interval steps; at the last step and when
        the run stops (`now`: a preempted run's last save) a synchronous one, whatever the interval.
        HF exports every checkpoint.export_interval steps and, with last_save_in_hf, at the end."""
        ckpt = self.job_config.checkpoint
        if self.saving and (last_step or now or step % ckpt.interval == 0):
            self._save(step, background=not (last_step or now) and ckpt.async_mode != "disabled")
        if (ckpt.export_interval > 0 and step % ckpt.export_interval == 0) or (last_step and ckpt.last_save_in_hf):
            self.export(os.path.join(self.job_config.job.dump_folder, "hf", f"step-{step}"))

    def _save(self, step: int, background: bool) -> None:
        self._wait_for_upload()  # one save at a time; the previous one is complete before the purge counts
        if step in self.stale:
            self._remove([os.path.join(self.folder, f"step-{step}")])
            self.stale.discard(step)
        self.train_state.step = step
        state = get_model_state_dict(self.model) | model_record(self.model_args) | self.states
        path = os.path.join(self.folder, f"step-{step}")
        if not background:
            dcp.save(state, checkpoint_id=path)
        elif self.job_config.checkpoint.async_mode == "async":
            # The state is copied to host memory here; a thread writes it.
            self.upload = dcp.async_save(state, checkpoint_id=path, process_group=self.group)
        else:
            # async_with_pinned_mem: the copy to pinned host memory runs beside the next step's
            # forward and backward (maybe_wait_for_staging), a process of DCP's writes it.
            self._drop_closed_stager()
            self.stager = self.stager or DefaultStager(PINNED_STAGING)
            response = dcp.async_save(state, checkpoint_id=path, process_group=self.group,
                                      async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=self.stager)
            self.upload, self.staging = response.upload_completion, response.staging_completion
        self._purge(step)

    def _purge(self, step: int) -> None:
        """keep_latest_k: rank 0 deletes every step folder older than the newest k complete steps up
        to `step` (a save in flight is not complete yet: it stays on top of them; incomplete older
        folders are deletions a kill cut short). `.metadata` goes first, here, so a folder being
        deleted never counts as complete; the rest in the background."""
        k = self.job_config.checkpoint.keep_latest_k
        complete = [s for s in complete_steps(self.folder) if s <= step]
        if self.purger is None or len(complete) < k:
            return
        for old, path in sorted(list_steps(self.folder).items()):
            if old < complete[-k]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, ".metadata"))
                self.purger.submit(shutil.rmtree, path, ignore_errors=True)

    def _wait_for_upload(self) -> None:
        if self.upload is not None:
            self.upload.result()
            self.upload = None

    def maybe_wait_for_staging(self) -> None:
        """Before the optimizer step: async_with_pinned_mem may still be copying the weights to host."""
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def _drop_closed_stager(self) -> None:
        """torch 2.11's DefaultStager closes its deep copier at the end of each stage (pytorch#170431),
        so a second save staged with the same stager dies in it with `KeyError: <class 'type'>`
        (pytorch#183413; 2.13 keeps it open, pytorch#183424). Under such a torch, the stager of the
        last save is closed (which also ends its staging thread) and a new one built. Cost: new
        pinned buffers every save, which that torch allocates anyway (the close released the old)."""
        if self.stager is not None and _stager_closes_itself():
            self.maybe_wait_for_staging()
            self.stager.close()
            self.stager = None

    def export(self, out_dir: str) -> None:
        ckpt = self.job_config.checkpoint
        export_hf(self.model, self.spec, self.model_args, out_dir, ckpt.export_dtype,
                  self.job_config.model.hf_assets_path, ckpt.export_max_shard_gb, overwrite=True)

    def close(self) -> None:
        """A save in flight ends before the process group does, and so do the deletions."""
        self._wait_for_upload()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if self.purger is not None:
            self.purger.shutdown(wait=True)

    # ---------------------------------------------------------------- folders

    def _move_damaged(self, paths: tuple[str, ...]) -> None:
        """Into {folder}/damaged/ (whose name matches no step-N pattern), for the user to inspect;
        never deleted."""
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


def _check_training_state(path: str) -> None:
    """A step folder of the run's checkpoint folder must hold the whole training state, not only
    weights (a model-only checkpoint copied in)."""
    keys = read_dcp_metadata(path).state_dict_metadata
    missing = [name for name in ("optimizer", "lr_scheduler", "dataloader", "train_state")
               if not any(key.startswith(f"{name}.") for key in keys)]
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)} state, only model weights: it cannot be resumed; "
                              f"move it out of the checkpoint folder and give it as checkpoint.initial_load_path")
