"""The ``fedspeech`` command line: one subcommand per job.

Each package registers its own subcommands (``register(subparsers)`` in its ``cli``
module), so this file stays a table of contents. Heavy imports (torch, flwr) happen inside
the command functions, so ``fedspeech --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Packages whose ``cli`` module adds subcommands, in the order they appear in --help.
_COMMAND_MODULES = (
    "fedspeech.data.cli",
    "fedspeech.profiling.cli",
    "fedspeech.apps.pretrain.cli",
    "fedspeech.apps.finetune.cli",
    "fedspeech.apps.earlyexit.cli",
    "fedspeech.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedspeech",
        description="Federated self-supervised speech learning: corpora, planning, pretraining, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is best for tiny models on shared cores)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our log lines on the root handler; Flower's on Flower's own handler only, once each.

    Flower's logger module, when first imported, sets the ``flwr`` logger's level and adds its
    own console handler, so a level set before that import is lost, and records also
    propagated to the root handler (every line twice). A logger filter and ``propagate`` survive
    the import. Without ``verbose`` only Flower's errors pass: it logs every round's sampling at
    INFO and our own round log says more."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flower = logging.getLogger("flwr")
    flower.propagate = False
    for old in [f for f in flower.filters if getattr(f, "fedspeech", False)]:
        flower.removeFilter(old)
    if not verbose:
        flower.addFilter(_ErrorsOnly())


def quiet_logging() -> None:
    """Warnings and errors only, each line once (benchmarks: their tables are the output)."""
    configure_logging(verbose=False)
    logging.getLogger().setLevel(logging.WARNING)


class _ErrorsOnly(logging.Filter):
    fedspeech = True

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: one clear line, no traceback
        print(f"fedspeech {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
