"""``robustnorm-serve``: run the inference service with uvicorn.

With no arguments it serves the bundled default model on 127.0.0.1:8000, on the GPU when there is one. Every
setting of :class:`service.settings.Settings` is an option (``--max-batch-size``), also settable as an
environment variable (``ROBUSTNORM_MAX_BATCH_SIZE``) or in a config file (``--config-file``); options win over
the environment, which wins over the file. API keys are read from the environment or the config file only,
so that they never show in a process list. ``--help`` answers without importing torch: the model, the engine
and the app are imported only once the settings are valid.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from .settings import ENV_PREFIX, Settings

logger = logging.getLogger(__name__)

_NOT_FLAGS = frozenset({"api_keys", "admin_keys"})  # secrets stay out of argv


def build_parser() -> argparse.ArgumentParser:
    """One option per setting, generated from the Settings fields so the two never disagree."""
    parser = argparse.ArgumentParser(
        prog="robustnorm-serve",
        description="Serve an image classifier whose normalization layers adapt to the traffic they see.",
        epilog=f"Every option can also be set in the environment as {ENV_PREFIX}<OPTION> (for example "
               f"{ENV_PREFIX}MAX_BATCH_SIZE=64) or in a TOML/JSON file given by --config-file. API keys "
               f"({ENV_PREFIX}API_KEYS, a JSON object of key -> tenant) come only from the environment or "
               f"the file. 'robustnorm models' lists the bundled models.",
    )
    for name, field in Settings.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(flag, default=argparse.SUPPRESS, choices=choices, metavar=name.upper(),
                            help=help_text + shown)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        settings = Settings(**flags)
    except (ValidationError, ValueError) as error:
        parser.error(str(error))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.is_factory_model and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # 'module:factory' resolves from the working directory, as with uvicorn
    from .app import create_app
    from .engines import load_engine

    try:
        engine = load_engine(settings)
    except (ValueError, OSError, ImportError) as error:
        logger.error("cannot serve model %r: %s", settings.model or "(the bundled default)", error)
        return 1
    app = create_app(settings, engine_factory=lambda _: engine)

    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=max(1, round(settings.drain_timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
