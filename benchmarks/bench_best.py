"""Best against best on one GPU: each system's fastest setting that fits, ours (auto and every manual
mode) against torchtitan 0.2.2's (no AC, per-op, every-2, full, memory_budget), in one process.

    python benchmarks/bench_best.py --cells 0.6B/8192,0.6B/32768,0.6B/65536,0.6B/131072
    python benchmarks/bench_best.py --cells 1.7B/32768 --ours auto,op --titan none,op,full --first-fit torchtitan

A user does not compare mode for mode: they take the fastest setting that fits their card. For
each cell (Qwen3 size / sequence length), each system tries its settings in the order given (fastest
first); every setting that runs is timed (median of --steps after --warmup), one that runs out of
memory is marked so. --first-fit stops the systems it names at their first setting that fits
(cheaper; the order is then what ranks them). Precision is matched in every row: fp32 weights and AdamW state, bf16
compute (ours: FSDP's mixed precision, or autocast on one rank; torchtitan: its one-GPU autocast).
The table prints every setting tried (the mode-for-mode rows), then per cell the best of each
system, their ratio, and ours' auto against our best manual setting.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment

import torch
from bench_systems import Ours, TorchTitan, free, memory_gib, model_args_for, ours_config, reset_memory, time_steps

from longctx.config import parse_config
from longctx.launch import init_distributed
from longctx.metrics import mfu, peak_flops

# name -> (activation_checkpoint.mode, selective_ac_option) for ours; torchtitan's modes the same
# way, "mb<budget>" its memory_budget mode (torch.compile's partitioner keeps that fraction).
OURS = {"auto": ("auto", "op"), "none": ("none", "op"), "op": ("selective", "op"), "2": ("selective", "2"),
        "full": ("full", "op")}

TITAN = {"none": ("none", "op"), "op": ("selective", "op"), "2": ("selective", "2"), "full": ("full", "op")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="0.6B/8192,0.6B/32768,0.6B/65536,0.6B/131072", help="FLAVOR/SEQ,...")
    p.add_argument("--ours", default="auto,none,op,full",
                   help=f"ours' settings in order, from {sorted(OURS)} (and NAME-fsdp: with FSDP2 on one rank)")
    p.add_argument("--titan", default="none,op,2,mb0.75,mb0.5,mb0.25,full",
                   help=f"torchtitan's settings in order, from {sorted(TITAN)} and mb<budget>")
    p.add_argument("--first-fit", nargs="*", choices=("ours", "torchtitan"), default=[],
                   help="these systems stop at their first setting that fits (the order given then ranks them)")
    p.add_argument("--steps", type=int, default=4, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation happens here)")
    p.add_argument("--config", default="train_configs/qwen3_bench.toml", help="our job config")
    p.add_argument("--memory-cap-gib", type=float, default=0,
                   help="cap every system's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 79 to run an "
                        "80 GB card's cells on an H200; ours' auto plans for the cap less 10%%")
    return p.parse_args(argv)


def build(system: str, setting: str, flavor: str, seq: int, args, device):
    if system == "ours":
        # NAME-fsdp: FSDP2 on a mesh of one, the one-GPU path before this round (it now runs autocast without FSDP)
        mode, option = OURS[setting.removesuffix("-fsdp")]
        cap = [f"--activation_checkpoint.memory_budget_gib={args.memory_cap_gib * 0.9}"] if args.memory_cap_gib else []
        forced = {"fsdp": True} if setting.endswith("-fsdp") else {}
        return Ours(ours_config(args.config, flavor, seq, mode, option, cap), device, **forced)
    if setting.startswith("mb"):
        return TorchTitan(flavor, seq, device, "memory_budget", "op", memory_budget=float(setting[2:]))
    mode, option = TITAN[setting]
    return TorchTitan(flavor, seq, device, mode, option)


def measure(system: str, setting: str, flavor: str, seq: int, args, device, timed: dict) -> dict:
    """One setting's row; the system lives in this frame only, so it is garbage once we return.
    timed: ours' settings already timed in this cell -> their row (a manual mode that resolves to
    auto's choice is not timed twice)."""
    reset_memory(device)
    row = dict(system=system, setting=setting, flavor=flavor, seq=seq)
    try:
        built = build(system, setting, flavor, seq, args, device)
        if system == "ours":  # what auto chose, or the manual mode spelled out
            row["setting"] = f"{setting}: {built.settings.describe()}" if setting == "auto" else setting
            if built.settings in timed:
                return timed[built.settings] | dict(setting=f"{setting} (the same settings as {timed[built.settings]['setting']})")
            timed[built.settings] = row
        vocab = built.model_args.vocab_size if system == "ours" else model_args_for_cell(flavor, args).vocab_size
        time_steps(built, seq, vocab, device, 0, args.warmup)
        times, _ = time_steps(built, seq, vocab, device, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        row.update(fits=False, alloc=memory_gib(device)[0])
        return dict(row)
    finally:
        torch._functorch.config.activation_memory_budget = 1.0  # torchtitan's memory_budget sets it globally
    model_args = model_args_for_cell(flavor, args)
    tokens_per_s = seq / statistics.median(times)
    peak = peak_flops(device)
    row.update(fits=True, tokens_per_s=tokens_per_s, alloc=memory_gib(device)[0],
               mfu=mfu(tokens_per_s, model_args.flops_per_token(seq), peak),
               mfu_causal=mfu(tokens_per_s, model_args.flops_per_token(seq, causal=True), peak))
    return dict(row)


def model_args_for_cell(flavor: str, args):
    return model_args_for(argparse.Namespace(config=args.config, flavor=flavor))


def run_system(system: str, settings: list[str], flavor: str, seq: int, args, device) -> list[dict]:
    rows, timed = [], {}
    for setting in settings:
        rows.append(measure(system, setting, flavor, seq, args, device, timed))
        free()
        torch._dynamo.reset()
        print(format_row(rows[-1]), flush=True)
        if system in args.first_fit and rows[-1]["fits"]:
            break
    return rows


def format_row(r: dict) -> str:
    if not r["fits"]:
        return f"{r['flavor']:>5} {r['seq']:>8} {r['system']:<11} {'out of memory':>9}{'':>25}  {r['setting']}"
    return (f"{r['flavor']:>5} {r['seq']:>8} {r['system']:<11} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.3f} {r['mfu_causal']:>7.3f}"
            f" {r['alloc']:>9.1f}  {r['setting']}")


def best(rows: list[dict]) -> dict | None:
    fitting = [r for r in rows if r["fits"]]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def summary(cells: dict) -> None:
    print(f"\n{'cell':>15} {'best ours':>10} {'best torchtitan':>16} {'ours/titan':>11} {'auto/best manual':>17}")
    for (flavor, seq), rows in cells.items():
        ours, titan = best([r for r in rows if r["system"] == "ours"]), best([r for r in rows if r["system"] == "torchtitan"])
        manual = best([r for r in rows if r["system"] == "ours" and not r["setting"].startswith("auto") and "-fsdp" not in r["setting"]])
        auto = next((r for r in rows if r["system"] == "ours" and r["setting"].startswith("auto")), None)
        ratio = f"{ours['tokens_per_s'] / titan['tokens_per_s']:.2f}x" if ours and titan else "-"
        auto_ratio = f"{auto['tokens_per_s'] / manual['tokens_per_s']:.3f}" if auto and auto["fits"] and manual else "-"
        show = lambda r: f"{r['tokens_per_s']:.0f}" if r else "OOM"  # noqa: E731
        print(f"{flavor + '/' + str(seq):>15} {show(ours):>10} {show(titan):>16} {ratio:>11} {auto_ratio:>17}")


def main(argv):
    args = parse_args(argv)
    device = init_distributed(parse_config(["--job.config_file", args.config]))  # ours' process group (one rank)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total, device)
        name += f" capped at {args.memory_cap_gib:g} GiB"
    print(f"{name} | torch {torch.__version__} | fp32 weights + bf16 compute for both | median of {args.steps} steps "
          f"after {args.warmup}, batch 1, a new random batch each step")
    print(f"{'size':>5} {'seq':>8} {'system':<11} {'tok/s':>9} {'MFU':>6} {'causal':>7} {'alloc GiB':>9}  setting")
    cells = {}
    for cell in args.cells.split(","):
        flavor, seq = cell.split("/")
        seq = int(seq)
        cells[(flavor, seq)] = (run_system("ours", args.ours.split(","), flavor, seq, args, device)
                                + run_system("torchtitan", args.titan.split(","), flavor, seq, args, device))
    summary(cells)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
