"""The job config's sections: one dataclass per TOML section, holding exactly the keys this repo
reads. Each field's docstring is its `--help` text; a Literal type lists a key's choices (adding
one is a one-line change here, plus the code that reads it)."""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Job:
    config_file: str | None = None
    """The TOML file read first; command-line overrides apply on top of it."""

    dump_folder: str = "./outputs"
    """Folder of everything the run writes: checkpoints, metrics.jsonl, TensorBoard, traces, HF exports."""

    description: str = "default job"
    """A one-line label of the run for the reader of the TOML (no code acts on it)."""


@dataclass
class Model:
    name: str = "qwen3"
    """Model family: "qwen3" or "qwen2" (Qwen2 and Qwen2.5)."""

    flavor: str = "debugmodel"
    """A size of the family (see models/<family>/__init__.py), or an HF model folder / config.json."""

    hf_assets_path: str = "assets/debug"
    """Folder with tokenizer.json (and tokenizer_config.json): an HF model folder works."""

    rope_scaling: dict[str, int | float | bool | str] | None = None
    """RoPE scaling for context extension, overriding config.json's, e.g. {type = "yarn", factor = 4.0,
    original_max_position_embeddings = 32768} (also beta_fast, beta_slow, attention_factor, mscale,
    mscale_all_dim, truncate), {type = "linear", factor = 2.0}, or {type = "default"} for none.
    On the command line: --model.rope_scaling type yarn factor 4.0 original_max_position_embeddings 32768.
    HF exports write it into config.json. See models/common/rope.py."""


@dataclass
class Training:
    dataset: Literal["auto", "text", "json", "parquet"] = "auto"
    """Format of training.dataset_path; "auto": from the file extensions."""

    dataset_path: str = "assets/debug/corpus.jsonl"
    """A local file or folder of documents (text, JSON lines or parquet), or for recipe.name =
    "pretrain" a folder written by scripts/tokenize_corpus.py (any size: each rank reads only its rows)."""

    local_batch_size: int = 8
    """Rows per dp rank in one micro-batch."""

    global_batch_size: int = -1
    """Rows per optimizer step over all dp ranks; -1: local_batch_size x dp. A larger multiple of
    that accumulates gradients over global_batch_size / (local_batch_size x dp) micro-batches."""

    seq_len: int = 2048
    """Tokens per packed row (the longest row under a seq_len_schedule)."""

    seq_len_schedule: list[list[int]] | None = None
    """Staged context extension: [[step, seq_len], ...], e.g. [[0, 32768], [2000, 65536], [4000, 131072]]:
    from step S on (steps count from 1; the first S is 0), rows are seq_len tokens. S increasing; the
    largest seq_len must equal training.seq_len. Each stage compiles once. Set it in the TOML."""

    steps: int = 10000
    """Optimizer steps to run (a resumed run counts on from its checkpoint's step)."""

    max_norm: float = 1.0
    """Gradient clipping: the global gradient norm (over every dp/cp/tp shard) is scaled down to this."""

    enable_cpu_offload: bool = False
    """FSDP keeps parameters, gradients and optimizer states in host memory; the optimizer steps on the CPU."""

    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the parameters FSDP gathers for forward and backward (fp32 masters stay sharded).
    GPU only: CPU runs are the fp32 reference."""

    gc_freq: int = 50
    """Steps between Python's young-generation garbage collections (automatic ones are off during the loop)."""

    skip_nonfinite_steps: int = 0
    """Steps whose loss or grad norm is NaN/inf the run may skip (batch dropped, weights and LR
    schedule unchanged, counted as skipped_steps) before it stops with exit code 3; 0: stop at the first."""

    balance: Literal["flops", "none"] = "flops"
    """How a step's global batch is dealt to dp ranks and micro-batches. "flops": by each row's
    modelled work, the sum over its documents of a*L + b*L^2 (the model's own flops: document-masked
    attention grows with the square of each document's length), so that no rank waits long for
    another; SFT and policy rows, whose documents are never split, may also be re-packed. The same
    documents train in the same step either way (data/balance.py). "none": rows dealt in stream order."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the sharded model (HSDP's replicate dimension); 1: off."""

    data_parallel_shard_degree: int = -1
    """Ranks that shard weights, gradients and optimizer states (FSDP2); -1: the ranks the other degrees leave."""

    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """"never" keeps each block's gathered bf16 parameters from forward to backward: one all-gather
    per block per step instead of two, for the memory of one bf16 model copy. "default" and
    "always" free them after forward."""

    tensor_parallel_degree: int = 1
    """Ranks that split each matmul's heads or hidden dimension, with sequence parallel between them; 1: off."""

    disable_loss_parallel: bool = False
    """Under tensor parallel: gather the vocabulary-sharded logits before the loss instead of
    computing it on the shards."""

    context_parallel_degree: int = 1
    """Ranks that split each row's sequence (Ulysses heads x sequence shards); 1: off."""

    context_parallel_ulysses_degree: int = -1
    """How many of the context_parallel_degree ranks split attention heads (Ulysses all-to-all);
    the rest split the sequence into head-tail chunks and all-gather K/V. -1: the largest degree
    the local heads allow (it divides the query heads, and divides or is a multiple of the kv heads)."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save the run's DCP checkpoints to {dump_folder}/{folder}/step-N, and resume from the newest complete one."""

    folder: str = "checkpoint"
    """Folder of the run's checkpoints, under job.dump_folder."""

    interval: int = 500
    """Steps between saves; the last step is always saved."""

    initial_load_path: str | None = None
    """Weights to start from when the run has no checkpoint of its own: a DCP step folder (model
    only) or, with initial_load_in_hf, a Hugging Face folder."""

    initial_load_in_hf: bool = False
    """checkpoint.initial_load_path is a Hugging Face folder (safetensors and config.json)."""

    last_save_in_hf: bool = False
    """Also export a Hugging Face folder to {dump_folder}/hf/step-N at the last step, in export_dtype."""

    export_dtype: Literal["float16", "bfloat16", "float32"] = "float32"
    """dtype of the weights of HF exports."""

    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    """"disabled": the step waits for each save. "async": saves are written in the background
    (dcp.async_save). "async_with_pinned_mem": weights are staged to pinned host memory first,
    so the step waits only for the copy (more host memory)."""

    keep_latest_k: int = 10
    """Complete checkpoints kept, the oldest purged first; 0: keep all."""

    load_step: int = -1
    """The step to resume from; -1: the newest complete one."""

    load_only: bool = False
    """Resume from checkpoints but never save one."""

    export_interval: int = 0
    """Export a Hugging Face folder to {dump_folder}/hf/step-N every N steps (0: never); in
    export_dtype. last_save_in_hf exports at the last step. See checkpoint/hf.py."""

    export_max_shard_gb: float = 5.0
    """Largest safetensors file of an HF export, in GB (like transformers' max_shard_size)."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["selective", "full", "none", "auto"] = "selective"
    """Per transformer block: "full" keeps only its input and recomputes the rest in backward;
    "selective": see selective_ac_option; "none": keep every activation; "auto": the fastest mix of
    these across blocks (with MLP tiles, activation offload and kv-head groups only where needed)
    whose planned peak fits memory_budget_gib (planner/auto.py); the run logs what it chose."""

    selective_ac_option: str = "2"
    """mode "selective": N (checkpoint every N-th block like "full"), or "op" (every block recomputes
    all but the attention kernel and the context-parallel exchanges)."""

    cpu_offload: bool = False
    """Park each checkpointed block's input in pinned host memory during forward and bring it
    back one block ahead in backward (needs mode full or selective). Frees L x T x dim bf16
    values of device memory; see parallelisms/activation_checkpoint.py."""

    mlp_chunk_size: int = 0
    """Tokens per tile of the tiled MLP (0: off): the SwiGLU runs over sequence tiles, each
    recomputed in backward, so its [T, hidden_dim] intermediates never exist whole. Not under tensor parallel."""

    attention_kv_groups: int = 1
    """Run attention over this many groups of kv heads, one after another (a divisor of the local kv
    heads; others take their gcd): the same result, with only one group's share of the kernel's
    backward working memory (its fp32 dq accumulator, dk/dv expanded to the query heads) live."""

    memory_budget_gib: float = 0.0
    """mode "auto": the planned peak per GPU may not exceed this many GiB (0: the GPU's memory less
    10%, the planner's measured accuracy). Leaves room for another process, or plans for a smaller card."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (once per seq_len stage)."""

    backend: str = "inductor"
    """The torch.compile backend (torch._dynamo.list_backends())."""


@dataclass
class Optimizer:
    name: Literal["AdamW", "Adam"] = "AdamW"
    """Adam with decoupled weight decay ("AdamW"), or L2-coupled ("Adam")."""

    lr: float = 8e-4
    """Peak learning rate (after warmup)."""

    beta1: float = 0.9
    """Adam's first-moment decay."""

    beta2: float = 0.95
    """Adam's second-moment decay."""

    eps: float = 1e-8
    """Adam's denominator epsilon."""

    weight_decay: float = 0.1
    """Weight decay coefficient."""

    implementation: Literal["for-loop", "foreach", "fused"] = "fused"
    """torch.optim's kernel: "fused" (one kernel; skips a non-finite step on the device), "foreach"
    (batched tensor ops), "for-loop" (one parameter at a time)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup to optimizer.lr."""

    total_steps: int | None = None
    """Steps the schedule spans; unset: training.steps."""

    decay_ratio: float | None = None
    """Fraction of total_steps at the end spent decaying (warmup-stable-decay); unset: decay right after warmup."""

    decay_type: Literal["linear", "sqrt", "cosine"] = "linear"
    """Shape of the decay from optimizer.lr to optimizer.lr x min_lr_factor."""

    min_lr_factor: float = 0.0
    """The final learning rate as a fraction of optimizer.lr."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Steps between logged steps (console, metrics.jsonl, TensorBoard); step 1 and the last are always logged."""

    enable_tensorboard: bool = False
    """Also write TensorBoard events to {dump_folder}/{save_tb_folder}."""

    save_tb_folder: str = "tb"
    """Folder of the TensorBoard events, under job.dump_folder."""


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    """Seconds a collective may wait before the process group gives up (NCCL or gloo timeout)."""


@dataclass
class Debug:
    seed: int | None = None
    """Seed of the random initialization when no weights are loaded; unset: 0."""

    deterministic: bool = False
    """Deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace): slower."""

    deterministic_warn_only: bool = False
    """With debug.deterministic: an op without a deterministic kernel warns instead of failing."""


@dataclass
class Validation:
    enable: bool = False
    """Held-out loss every `freq` steps (and at step 1), through the run's own recipe and packing."""

    dataset: Literal["auto", "text", "json", "parquet"] = "auto"
    """Format of validation.dataset_path; "auto": from the file extensions."""

    dataset_path: str | None = None
    """Held-out documents (a file or folder, like training.dataset_path), read by the run's recipe and packed alike."""

    local_batch_size: int = -1
    """Rows per dp rank of one validation batch; -1: training.local_batch_size."""

    seq_len: int = -1
    """Tokens per packed validation row; -1: training.seq_len."""

    freq: int = 10
    """Steps between evaluations."""

    steps: int = 10
    """Validation batches per evaluation, the same batches every time (the whole set, -1, is not supported)."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """torch.profiler traces to {dump_folder}/{save_traces_folder}/iteration_N/rank{R}_trace.json."""

    save_traces_folder: str = "profile_traces"
    """Folder of the traces, under job.dump_folder."""

    profile_freq: int = 10
    """Steps per profiling cycle: each waits, warms up for profiler_warmup steps and records profiler_active."""

    profiler_active: int = 1
    """Steps recorded per cycle."""

    profiler_warmup: int = 3
    """Steps the profiler runs unrecorded before the recorded ones."""

    enable_memory_snapshot: bool = False
    """CUDA caching-allocator snapshots to {dump_folder}/{save_memory_snapshot_folder} every profile_freq steps."""

    save_memory_snapshot_folder: str = "memory_snapshot"
    """Folder of the memory snapshots, under job.dump_folder (open them at pytorch.org/memory_viz)."""

    all_ranks: bool = False
    """Write traces and memory snapshots on every rank; false: rank 0 only (the ranks run the same program)."""


@dataclass
class Recipe:
    name: Literal["pretrain", "sft", "policy"] = "pretrain"
    """What one step computes: "pretrain" (packed text, next-token loss), "sft" (chat records,
    loss on assistant turns only), "policy" (offline rollouts, clipped policy-gradient loss)."""

    text_field: str = "text"
    """pretrain: the JSON/parquet column that holds document text."""

    messages_field: str = "messages"
    """sft: the column that holds a record's chat turns ([{"role": ..., "content": ...}, ...])."""

    chat_template_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """sft, and policy with apply_chat_template: extra variables of the model's chat template, a
    TOML table such as {enable_thinking = false} (CLI: --recipe.chat_template_kwargs enable_thinking False)."""

    apply_chat_template: bool = False
    """policy: render "prompt"/"response" text with the model's chat template (the prompt as the
    user turn with the generation prompt, the response as the assistant turn) before tokenizing."""

    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy: the logits of one chunk exist at a time. Under
    activation_checkpoint.mode = "auto" the largest: the planner may take a half or a quarter of it to fit."""

    clip_eps: float = 0.2
    """policy: the importance ratio is clipped to [1 - clip_eps, 1 + clip_eps] (PPO's epsilon)."""


@dataclass
class JobConfig:
    """Every section, in the order --help lists them."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    metrics: Metrics = field(default_factory=Metrics)
    comm: Comm = field(default_factory=Comm)
    debug: Debug = field(default_factory=Debug)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)
    recipe: Recipe = field(default_factory=Recipe)
