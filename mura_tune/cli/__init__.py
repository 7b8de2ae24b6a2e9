"""The ``mura-tune`` command line.

    mura-tune --space densenet_finetune            # the main job (same as `mura-tune search ...`)
    mura-tune data synth --out DIR                 # synthetic MURA-v1.1 stand-in
    mura-tune data summary [--data DIR] [--json]
    mura-tune train --set model=custom_cnn

Errors the user can fix print one line (``mura-tune: error: ...``) and exit 2; ``--debug``
shows the traceback.

Stage 6, cli: ``parser.py`` parses the flags, ``commands.py`` calls the library and prints what
a command produced. May import every stage; nothing imports it. Heavy libraries (torch, Ray) are
imported inside the commands that need them, so ``--help`` and a typo answer in a second.
"""

from __future__ import annotations

import logging
import sys

from mura_tune.cli import commands
from mura_tune.cli.parser import build_parser, implicit_search
from mura_tune.errors import MuraTuneError, without_unsafe_advice

__all__ = ["ConsoleHandler", "build_parser", "console_logging", "main"]


class ConsoleHandler(logging.Handler):
    """What a user of the command line sees of the library's log.

    Progress and notes (INFO) go to stdout as plain lines, beside the command's results; what a
    user should act on (WARNING and above) goes to stderr as ``mura-tune: <message>``, the form of
    the error line. The streams are looked up at each record (so redirections and test capture work).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                print(f"mura-tune: {message}", file=sys.stderr, flush=True)
            else:
                print(message, file=sys.stdout, flush=True)
        except Exception:  # a logging failure must not end the command
            self.handleError(record)


def console_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the ``mura_tune`` loggers to the console as the CLI does (once; later calls set the level)."""
    logger = logging.getLogger("mura_tune")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(level)
    logger.propagate = False  # an application's root handlers would print every line twice
    return logger


def main(argv: list[str] | None = None) -> int:
    argv = implicit_search(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    console_logging(logging.DEBUG if args.debug else logging.INFO)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(commands.dispatch(args) or 0)
    except MuraTuneError as exc:
        if args.debug:
            raise
        print(f"mura-tune: error: {without_unsafe_advice(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mura-tune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A file the command had to read or write (permissions, a full disk, a path that is a
        # folder): say which, in one line. OSErrors without a file name are bugs and keep their traceback.
        if args.debug or exc.filename is None:
            raise
        where = exc.filename2 or exc.filename  # a rename into place names the destination second
        print(f"mura-tune: error: {exc.strerror or type(exc).__name__}: {where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
