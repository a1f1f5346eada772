"""halo-train --config RUN.yaml [key.path=value ...]: pretrain a HALO-S model with DeepSpeed.

Runs as a plain process, or under deepspeed / torchrun / mpirun / srun (ranks are discovered).
Exit codes: see halo_pretrain/train/signals.py and docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .signals import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="halo-train",
        description="Pretrain a HALO-S model with DeepSpeed. Overrides are dotted keys: train.steps=100.",
        epilog="exit codes: 0 done, 1 error, 2 bad config/input or run.dir in use, 3 too many non-finite "
               "losses or gradients, 4 checkpoint save/load failed, 5 another rank was lost (rerun to resume), "
               "75 stopped by SIGTERM/SIGUSR1/Ctrl-C after saving (rerun to resume), 130 a second Ctrl-C "
               "(stopped at once)")
    parser.add_argument("--config", "-c", help="a run YAML file, or a built-in recipe name (quickstart, 125m, ...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config is None and not args.overrides:
        print("halo-train: error: give --config RUN.yaml (or a recipe name: quickstart, 125m, ...); "
              "see docs/training.md", file=sys.stderr)
        return EXIT_CONFIG
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..data.loader import ShardError
    from .checkpoint import CheckpointError
    from .distributed import discover
    from .run_config import ConfigError, load_run_config

    rank = 0
    try:
        info = discover()
        rank = info.rank
        cfg = load_run_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from .trainer import run_training

        return run_training(cfg, info)
    except ConfigError as e:
        if rank == 0:
            print(f"halo-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except ShardError as e:  # met while reading, by the rank that read it
        print(f"halo-train: rank {rank}: error: data: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C before the training loop started: nothing to save
        print(f"halo-train: rank {rank}: interrupted before training started (exit {EXIT_INTERRUPTED})",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except CheckpointError as e:
        print(f"halo-train: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    except Exception:
        traceback.print_exc()
        print(f"halo-train: rank {rank}: unexpected error (exit {EXIT_ERROR})", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
