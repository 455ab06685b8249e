"""``climseg COMMAND [ARGS]``: one command line for everything a user runs.

Each subcommand is a module's ``main(argv) -> int``, imported only when that subcommand runs,
so ``climseg --help`` is instant and needs no torch. The modules stay runnable on their own
(``python -m climseg.train``, ``tools/split_data.py``): this file only dispatches.

Also here: :class:`ArgumentParser`, the parser every climseg command builds, so that all of them
share the same flag names (``--data`` in, ``--output`` out, ``--workers``, ``--quiet``), accept
their older spellings, and report a bad argument as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import re
import sys
from typing import NoReturn

# name -> (module, function, one-line description); the order is the order of --help.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("climseg.train_cli", "main",
              "train from a YAML config (alone, under horovodrun or srun)"),
    "evaluate": ("climseg.evaluate", "main",
                 "score a checkpoint on a data split or labelled netCDF files (IoU)"),
    "predict": ("climseg.predict", "main", "segment sample files with a checkpoint"),
    "events": ("climseg.events", "main",
               "a table of the tropical cyclones and atmospheric rivers in masks"),
    "bench": ("climseg.bench", "main", "throughput of the training step, loader and trainer"),
    "make-synthetic": ("climseg.data.tools", "make_synthetic_main",
                       "generate a synthetic CAM5-like data set"),
    "split": ("climseg.data.tools", "split_main", "split a folder of samples 80/10/10"),
    "summarize": ("climseg.data.tools", "summarize_main",
                  "per-channel statistics of a split into stats.h5"),
    "check": ("climseg.data.tools", "check_main", "scan every sample file for problems"),
    "stage": ("climseg.data.tools", "stage_main",
              "copy each rank's files to node-local storage"),
    "convert-climatenet": ("climseg.data.climatenet", "main",
                           "convert ClimateNet files to climseg's sample format"),
}


def prog(command: str) -> str:
    """The program name a command's usage and errors show."""
    return f"climseg {command}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with climseg's conventions.

    - ``add_option("--output", "--out", ...)``: the first name is the one the help shows; the
      others are older spellings, still accepted so that no existing command line breaks.
    - ``required=True`` on such an option is checked after parsing (argparse cannot require
      "one of these spellings").
    - A bad argument is one line, ``climseg CMD: error: ...``, and exit status 2.
    """

    def __init__(self, command: str | None = None, description: str | None = None, **kwargs):
        # ``command`` None: a sub-parser (``climseg bench step``), named by its parent.
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if command is not None:
            kwargs["prog"] = prog(command)
        super().__init__(description=description, **kwargs)
        self._required: list[tuple[str, str]] = []
        self._required_actions: list[argparse.Action] = []

    def add_option(self, name: str, *aliases: str, required: bool = False, **kwargs):
        dest = kwargs.pop("dest", name.lstrip("-").replace("-", "_"))
        help_text = kwargs.pop("help", None)
        if required:
            help_text = f"{help_text} (required)" if help_text else "(required)"
        action = self.add_argument(name, dest=dest, help=help_text, **kwargs)
        for alias in aliases:
            self.add_argument(alias, dest=dest, help=argparse.SUPPRESS, **kwargs)
        if required:
            self._required.append((dest, name))
            self._required_actions.append(action)
        return action

    def add_workers(self, what: str, default, *aliases: str, shown: str | None = None,
                    **kwargs) -> None:
        """``--workers``: how many files one process (rank) reads or writes at once, in every
        command; ``what`` names the workers that do it here (reader threads, copy threads...)."""
        shown = shown or ("CPU count" if default is None else str(default))
        self.add_option("--workers", *aliases, type=positive_int, default=default, metavar="N",
                        help=f"files handled at once per rank: {what} (default {shown})",
                        **kwargs)

    def show_required(self, action: argparse.Action) -> None:
        """Show ``action`` as required in the usage line where the command checks it itself
        (``check``: ``--data`` or the older positional root)."""
        self._required_actions.append(action)

    def add_quiet(self, what: str = "no progress or log lines on stderr, only warnings and "
                                    "errors (results on stdout stay)") -> None:
        self.add_argument("--quiet", action="store_true", help=what)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        self.check_required(ns)
        return ns

    def parse_intermixed_args(self, args=None, namespace=None):
        ns = super().parse_intermixed_args(args, namespace)
        self.check_required(ns)
        return ns

    def check_required(self, ns: argparse.Namespace) -> None:
        missing = [name for dest, name in self._required if getattr(ns, dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")

    def format_usage(self) -> str:
        with self._shown_required():
            return super().format_usage()

    def format_help(self) -> str:
        with self._shown_required():
            return super().format_help()

    @contextlib.contextmanager
    def _shown_required(self):
        """Usage lines show a required ``add_option`` without brackets, as argparse shows its
        own required options; parsing checks them itself (any spelling may be given)."""
        for action in self._required_actions:
            action.required = True
        try:
            yield
        finally:
            for action in self._required_actions:
                action.required = False

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} "
                     f"(see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """``; did you mean --output?`` for an unrecognized flag close to a known one, or for
        a mistyped choice (``bench trian``)."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]),
                                              n=1, cutoff=0.6)
            return f"; did you mean {close[0]}?" if close else ""
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        for word in message[len(prefix):].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("-"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (``--workers 0`` is an error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fail(command: str, message: str) -> int:
    """Print the one-line error of ``climseg COMMAND`` on stderr; return exit status 2."""
    print(f"{prog(command)}: error: {message}", file=sys.stderr)
    return 2


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: climseg COMMAND [ARGS ...]", "",
             "DeepLabv3+ segmentation of tropical cyclones and atmospheric rivers in CAM5 data.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "`climseg COMMAND --help` shows a command's options. Several ranks: "
              "horovodrun -np N --gloo climseg COMMAND ... (or srun); with dist.engine=torch, "
              "torchrun --nproc_per_node N -m climseg COMMAND ... (docs/engines.md)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from climseg import __version__
        print(f"climseg {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"climseg: error: unknown command {name!r}; {hint}one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module_name, function, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # A command whose module is not in this installation, or a dependency not installed.
        if err.name == module_name:
            return fail(name, f"not available: this checkout of climseg has no {module_name}")
        return fail(name, f"the package {err.name!r} is not installed; run `make install`")
    # argparse in the module names itself after argv[0] where it has no explicit prog.
    sys.argv[0] = prog(name)
    return int(getattr(module, function)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
