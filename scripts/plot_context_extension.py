"""Pictures of eval_long.py results: retrieval heat maps and loss by position, one arm or several.

    python scripts/plot_context_extension.py --eval "(a) 2K as is=OUT/eval/a/eval_long.json" \\
        --eval "(c) YaRN 8K=OUT/eval/c/eval_long.json" --card "1x H100 80GB" --out-dir OUT/plots [--mark 2048 8192]

--out-dir gets
  retrieval.png         accuracy by context length x depth: a row of heat maps per arm, a column per task
  loss_by_position.png  mean next-token loss per position bucket, every arm on one plot
Each title names --card, the hardware the numbers come from. --mark draws dashed lines at those
positions (e.g. the lengths the arms trained at).
"""

import argparse
import json
import os

from longctx.base import ConfigError, DataError
from longctx.data.retrieval import fmt_tokens
from longctx.launch import run_command

TASKS = {"passkey": "passkey", "multikey": "multi-key"}  # eval_long.json's task -> its label


def read_results(spec: str) -> tuple[str, dict]:
    """NAME=PATH -> (NAME, the eval_long.json at PATH)."""
    name, sep, path = spec.rpartition("=")
    if not sep or not name:
        raise ConfigError(f"--eval {spec!r}: give NAME=PATH of an eval_long.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--eval {spec!r}: cannot read {path} ({' '.join(str(e).split())})") from None
    missing = [key for key in ("buckets", *TASKS) if key not in results]
    if missing:
        raise DataError(f"--eval {spec!r}: {path} lacks {missing}; write it with scripts/eval_long.py")
    return name, results


def accuracy_grid(cells: list[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    lengths, depths = sorted({c["length"] for c in cells}), sorted({c["depth"] for c in cells})
    accuracy = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    return lengths, depths, [[accuracy[(n, d)] for d in depths] for n in lengths]


def plot_retrieval(plt, arms: dict, card: str, path: str) -> None:
    fig, axes = plt.subplots(len(arms), len(TASKS), figsize=(4.4 * len(TASKS), 2.8 * len(arms)), squeeze=False,
                             layout="constrained")
    for row, (name, results) in enumerate(arms.items()):
        for col, (task, label) in enumerate(TASKS.items()):
            lengths, depths, grid = accuracy_grid(results[task])
            ax = axes[row][col]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_yticks(range(len(lengths)), [fmt_tokens(n) for n in lengths])
            for y, line in enumerate(grid):
                for x, value in enumerate(line):
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
            ax.set_title(f"{name}: {label}", fontsize=10)
            ax.set_xlabel("needle depth" if row == len(arms) - 1 else "")
            ax.set_ylabel("context length" if col == 0 else "")
    fig.colorbar(image, ax=axes, label="accuracy (every answer token the argmax)", shrink=0.6)
    fig.suptitle(f"Retrieval accuracy by context length and depth ({card})")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss(plt, arms: dict, card: str, marks: list[int], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for name, results in arms.items():
        buckets = results["buckets"]
        # Each bucket's mean loss at its middle position, on a log axis: buckets double in width.
        ax.plot([(b["from"] + b["to"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o", label=name)
    for mark in marks:
        ax.axvline(mark, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: fmt_tokens(int(x))))
    ax.set_xlabel("position in the row (bucket middle)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"Loss by position on held-out natural text ({card})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", action="append", required=True, metavar="NAME=PATH", help="an arm's eval_long.json; repeat per arm")
    parser.add_argument("--card", required=True, help="the hardware that produced the numbers, named in every title")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--mark", type=int, nargs="*", default=[], help="positions to mark with a dashed line")
    args = parser.parse_args(argv)
    if os.path.isfile(args.out_dir):
        raise ConfigError(f"--out-dir {args.out_dir!r} is a file; give a folder")
    arms = dict(read_results(spec) for spec in args.eval)
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out_dir, exist_ok=True)
    plot_retrieval(plt, arms, args.card, os.path.join(args.out_dir, "retrieval.png"))
    plot_loss(plt, arms, args.card, args.mark, os.path.join(args.out_dir, "loss_by_position.png"))
    print(f"wrote {args.out_dir}/retrieval.png and {args.out_dir}/loss_by_position.png")


if __name__ == "__main__":
    run_command(main)
