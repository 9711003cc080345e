"""The job config: our own schema (schema.py: one dataclass per TOML section, field docstrings as
help text), its parser (parse.py: TOML, then `--section.key` overrides, and --help), and
VALUE_RULES (rules.py: every value refused before any work starts).

    job_config = parse_config(["--job.config_file", "train_configs/debug.toml", "--training.steps", "10"])
"""

import sys

from longctx.config.parse import help_text, job_config_from
from longctx.config.rules import VALUE_RULES, check_config
from longctx.config.schema import JobConfig

__all__ = ["JobConfig", "VALUE_RULES", "check_config", "parse_config"]


def parse_config(args: list[str]) -> JobConfig:
    """The job config of a command line, checked; ConfigError (one line) for any mistake. --help
    (or -h) prints every key and exits 0, as argparse does (launch.run returns its code)."""
    if "--help" in args or "-h" in args:
        print(help_text())
        sys.exit(0)
    config = job_config_from(args)
    check_config(config)
    return config
