"""Shell completion for the meshvpn commands: the options that print a completion script and serve dynamic values.

Every command gets `--print-completion bash|zsh`; commands whose arguments have values only a running system knows
(peer names, lab nodes) also get a hidden `--complete-values SOURCE` that the script calls, quietly, at TAB. Both act
while the command line is parsed, like `--version`, so they work whatever subcommand a parser otherwise requires.

This module stays small because every command imports it: the script renderer (meshcontract.completionscript,
pure) is imported only when a script is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

SHELLS = ("bash", "zsh")
FILE = "file"
DIR = "dir"
# The attribute `completes` sets on an argparse action; the renderer reads it (and infers FILE/DIR without it).
HINT_ATTRIBUTE = "completion_hint"

ValueSource = Callable[[argparse.Namespace], Iterable[str]]

# bash's `compgen -W` expands its word list ($(...), `...`, ~, {a,b}) and splits it: a value holding one of these
# could run a command at TAB (a peer's name is chosen by that peer) or arrive in pieces.
_NOT_IN_A_WORD = frozenset(" \t\n\r\v\f'\"\\$`{}~*?[]();&|<>!#")


def is_shell_word(value: str) -> bool:
    """Whether `value` can be offered at TAB as it is: not empty, nothing the shell would expand or split. Pure."""
    return bool(value) and not any(char in _NOT_IN_A_WORD for char in value)


def completes(action: argparse.Action, hint: str) -> argparse.Action:
    """Tell the completion script what `action`'s value is: FILE, DIR, or the name of a `--complete-values` source.

    Returns `action`, so it wraps `parser.add_argument(...)`.
    """
    setattr(action, HINT_ATTRIBUTE, hint)
    return action


class _PrintCompletion(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        from meshcontract.completionscript import render

        sys.stdout.write(render(parser, shell=str(values)))
        parser.exit(0)


class _CompleteValues(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, *, sources: Mapping[str, ValueSource],
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, choices=sorted(sources), **kwargs)
        self.sources = dict(sources)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        # The namespace holds the options given before this one: the script passes on the top-level options the
        # user typed (--socket, --lab-dir, ...), so the values come from the same agent or lab.
        for value in self.sources[str(values)](namespace):
            if is_shell_word(value):
                print(value)
        parser.exit(0)


def add_completion_options(parser: argparse.ArgumentParser, *,
                           sources: Mapping[str, ValueSource] | None = None) -> None:
    """Add `--print-completion SHELL` to the top-level `parser`, and `--complete-values` when `sources` are given.

    A source maps the options parsed so far to candidate values; those that are not plain shell words
    (`is_shell_word`) are left out. It runs at every TAB, so it must be quick, print nothing itself and return no
    values (not raise) when the system does not answer.
    """
    parser.add_argument("--print-completion", choices=SHELLS, metavar="SHELL", action=_PrintCompletion,
                        help="print the completion script for SHELL (bash or zsh) and exit")
    if sources:
        parser.add_argument("--complete-values", metavar="SOURCE", action=_CompleteValues, sources=sources,
                            help=argparse.SUPPRESS)
