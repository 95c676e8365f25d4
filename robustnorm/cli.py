"""The robustnorm command line: one subcommand per task, each in its own module, imported only when it runs.

    robustnorm models                  list bundled models and registered architectures
    robustnorm card NAME_OR_PATH       print a model card
    robustnorm train ...               train a model (robustnorm.train)
    robustnorm calibrate ...           choose MIN_BATCH, N0 and the drift calibration (robustnorm.calibrate)
    robustnorm evaluate ...            clean and robust accuracy grid (robustnorm.evaluation)
    robustnorm export ...              ONNX graph with the adaptive statistics inside (robustnorm.export)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence

from .runtime import retain_freed_memory

# subcommand -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
_SUBCOMMANDS = {
    "train": ("robustnorm.train", "train a model on an image archive"),
    "calibrate": ("robustnorm.calibrate", "choose MIN_BATCH, N0 and drift calibrations; write them into the card"),
    "evaluate": ("robustnorm.evaluation.cli", "clean and robust accuracy per policy, batch size and threat model"),
    "export": ("robustnorm.export", "export a model to ONNX with its adaptive statistics in the graph"),
}


def _models(_: argparse.Namespace) -> int:
    from . import list_architectures, list_models

    print(json.dumps({"bundled_models": list_models(), "architectures": list_architectures()}, indent=2))
    return 0


def _card(args: argparse.Namespace) -> int:
    from . import load_model

    _, card = load_model(args.model)
    print(json.dumps(card.to_dict(), indent=2))
    return 0


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``, found without building (and importing) every subcommand's options."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--log-level")
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module (when it is a module's subcommand) is imported for its options.

    Listing the subcommands imports none of them, so ``robustnorm --help`` answers without loading torch.
    """
    parser = argparse.ArgumentParser(
        prog="robustnorm",
        description="Train, calibrate, evaluate and export image models whose normalization layers adapt to the "
                    "traffic they see, and inspect the bundled models.",
        epilog='Run "robustnorm COMMAND --help" for the options of a command.')
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("models", help="list bundled models and architectures").set_defaults(handler=_models)
    card = commands.add_parser("card", help="print a model card")
    card.add_argument("model", help="bundled model name or model directory")
    card.set_defaults(handler=_card)
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue  # that subcommand is not part of this build
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retain_freed_memory()  # CPU forwards and backwards 2-3x faster on large batches (robustnorm/runtime.py)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
