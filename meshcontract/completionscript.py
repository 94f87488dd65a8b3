"""Render a bash or zsh completion script from an argparse parser.

Pure: no I/O here. `describe` walks a parser into a Command tree: its subcommands, its options, whether an option
takes a value, and what may fill each value (choices, a file, a directory, values from a `--complete-values`
source, anything). `render_bash` turns the tree into one shell function driven by `case` tables; `render_zsh` is
the same function loaded through zsh's bashcompinit. No third-party completion library: the scripts are plain
shell, and the commands stay importable without one.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field

from meshcontract.completion import DIR, FILE, HINT_ATTRIBUTE, is_shell_word

# What the script does for a value (one word each, so the script can dispatch on its first word).
FREE = "free"  # anything: nothing to offer
REST = "rest"  # argparse.REMAINDER: the words that follow belong to another command


@dataclass(frozen=True)
class Slot:
    """What may fill one value: fixed words, a FILE, a DIR, a dynamic source's values, or anything."""

    words: tuple[str, ...] = ()
    hint: str | None = None  # FILE, DIR or the name of a --complete-values source
    rest: bool = False

    def spec(self) -> str:
        """The slot as the script's `spec` string: "w WORD...", "f", "d", "x SOURCE", "rest" or "free"."""
        if self.rest:
            return REST
        if self.words:
            return "w " + " ".join(self.words)
        if self.hint == FILE:
            return "f"
        if self.hint == DIR:
            return "d"
        if self.hint:
            return f"x {self.hint}"
        return FREE


@dataclass(frozen=True)
class Option:
    """One option: its flags and, when it takes a value, what may fill it."""

    flags: tuple[str, ...]
    value: Slot | None = None


@dataclass(frozen=True)
class Command:
    """A parser: options, positional slots in order (the last may repeat) or subcommands, never both."""

    options: tuple[Option, ...] = ()
    positionals: tuple[Slot, ...] = ()
    repeats: bool = False  # the last positional takes any number of words
    subcommands: tuple[tuple[str, Command], ...] = field(default=())


def infer_hint(action: argparse.Action) -> str | None:
    """FILE, DIR or a source name for `action`'s value: the `completes` annotation, else from its metavar or dest.

    A metavar ending in DIR means a directory, one ending in FILE (or PATH) a file; without a metavar, dest `config`
    or ending in `file` or `socket` is a file, and one ending in `dir` a directory.
    """
    explicit = getattr(action, HINT_ATTRIBUTE, None)
    if explicit is not None:
        return str(explicit)
    if isinstance(action.metavar, str):
        metavar = action.metavar.upper()
        if metavar.endswith("DIR"):
            return DIR
        if metavar.endswith("FILE") or metavar == "PATH":
            return FILE
        return None
    dest = action.dest
    if dest == "config" or dest.endswith(("file", "socket")):
        return FILE
    if dest == "dir" or dest.endswith("_dir"):
        return DIR
    return None


def _words(action: argparse.Action, where: str) -> tuple[str, ...]:
    words = tuple(str(choice) for choice in action.choices or ())
    for word in words:
        if not is_shell_word(word):
            raise ValueError(f"{where}: choice {word!r} cannot be offered as one shell word")
    return words


def _slot(action: argparse.Action, where: str) -> Slot:
    if action.nargs == argparse.REMAINDER:
        return Slot(rest=True)
    return Slot(words=_words(action, where), hint=infer_hint(action))


def describe(parser: argparse.ArgumentParser) -> Command:
    """The Command tree of `parser`. ValueError for what the script cannot express (a parser with positionals
    and subcommands, a choice that is not one plain shell word)."""
    options: list[Option] = []
    positionals: list[Slot] = []
    repeats = False
    subcommands: list[tuple[str, Command]] = []
    # argparse has no public way to list a parser's arguments; _actions is what its own help formatter reads.
    for action in parser._actions:
        where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        if isinstance(action, argparse._SubParsersAction):
            subcommands.extend((name, describe(sub)) for name, sub in action.choices.items())
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            takes_value = action.nargs != 0
            options.append(Option(tuple(action.option_strings), _slot(action, where) if takes_value else None))
        else:
            slot = _slot(action, where)
            count = action.nargs if isinstance(action.nargs, int) else 1
            positionals.extend([slot] * count)
            repeats = action.nargs in ("*", "+", argparse.REMAINDER)
    if subcommands and positionals:
        raise ValueError(f"{parser.prog}: positionals beside subcommands are not supported")
    return Command(tuple(options), tuple(positionals), repeats, tuple(subcommands))


def _paths(command: Command, path: str = "") -> list[tuple[str, Command]]:
    found = [(path, command)]
    for name, sub in command.subcommands:
        found.extend(_paths(sub, f"{path}/{name}" if path else name))
    return found


def _pattern(raw: str) -> str:
    # A trailing "*" (any positional index of a repeating slot) stays a wildcard; everything else is literal.
    if raw.endswith(":*"):
        return shlex.quote(raw[:-1]) + "*"
    return shlex.quote(raw)


def _case(subject: str, arms: list[tuple[str, list[str]]], action: str, *, indent: int) -> list[str]:
    """A `case` on `subject`: one arm per (value, patterns), running `action` formatted with the quoted value."""
    arms = [(value, patterns) for value, patterns in arms if patterns]
    if not arms:
        return []
    pad = " " * indent
    lines = [f'{pad}case "{subject}" in']
    for value, patterns in arms:
        lines.append(f"{pad}    {'|'.join(_pattern(p) for p in patterns)}) {action.format(shlex.quote(value))} ;;")
    lines.append(f"{pad}esac")
    return lines


def _group(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(pattern, value) pairs as case arms, one per value, in the order values first appear."""
    arms: dict[str, list[str]] = {}
    for pattern, value in pairs:
        arms.setdefault(value, []).append(pattern)
    return list(arms.items())


def _function_name(prog: str) -> str:
    return "_" + re.sub(r"\W", "_", prog) + "_complete"


# The fixed part of the function. It walks the words before the cursor to find the subcommand path, how many
# positionals it has had and whether the last word was an option waiting for its value, then offers candidates
# from `spec`. Words are counted, not indexed: under zsh's bashcompinit COMP_WORDS may start at 1. The path is
# `cmdpath`, never `path`: zsh ties $path to $PATH, even as a local.
_WALK = r"""    local cur=${2-} cmd= word= cmdpath= pending= spec= n=0 pos=0 dashdash=0
    local -a fwd=()
    COMPREPLY=()
    for word in "${COMP_WORDS[@]}"; do
        n=$((n + 1))
        if [ "$n" -eq 1 ]; then cmd=$word; continue; fi
        if [ "$n" -gt "$COMP_CWORD" ]; then
            # zsh's bashcompinit drops an empty current word from the arguments ($2 is then "--"): take it here.
            [ -n "${ZSH_VERSION-}" ] && cur=$word
            break
        fi
        if [ -n "$pending" ]; then
            # --opt=value arrives as three words: bash splits at the '=' of COMP_WORDBREAKS.
            [ "$word" = "=" ] && continue
            case " $toplevel " in *" $pending "*) fwd+=("$pending" "$word") ;; esac
            pending=
            continue
        fi
        if [ "$dashdash" = 0 ]; then
            case "$word" in
                --) dashdash=1; continue ;;
                -?*)
                    case "$cmdpath:$word" in
                        @VALUED@) pending=$word ;;
                    esac
                    continue ;;
            esac
        fi
"""

_OFFER = r"""    case "$spec" in
        w\ *) COMPREPLY=($(compgen -W "${spec#w }" -- "$cur")) ;;
        f|d)
            type compopt >/dev/null 2>&1 && compopt -o filenames 2>/dev/null
            local IFS=$'\n'
            COMPREPLY=($(compgen "-$spec" -- "$cur")) ;;
        x\ *)
            local IFS=$'\n'
            COMPREPLY=($(compgen -W "$("$cmd" "${fwd[@]}" --complete-values "${spec#x }" 2>/dev/null)" -- "$cur")) ;;
    esac
    return 0
}
"""


@dataclass
class _Tables:
    """The script's `case` tables, keyed by "PATH:FLAG", "PATH:INDEX" or "PATH" (PATH: subcommands joined by /)."""

    valued: list[str] = field(default_factory=list)  # options that take a value
    values: list[tuple[str, str]] = field(default_factory=list)  # what fills an option's value, when known
    options: list[tuple[str, str]] = field(default_factory=list)  # every option of a path
    slots: list[tuple[str, str]] = field(default_factory=list)  # what fills positional INDEX (or the subcommand)
    repeating: list[tuple[str, str]] = field(default_factory=list)  # any later index, for a repeating last slot
    enter: list[str] = field(default_factory=list)  # "PATH:NAME" for every subcommand NAME
    stop: list[str] = field(default_factory=list)  # paths that take subcommands only


def _tables(tree: Command) -> _Tables:
    tables = _Tables()
    for path, command in _paths(tree):
        flags = [flag for option in command.options for flag in option.flags]
        if flags:
            tables.options.append((path, "w " + " ".join(flags)))
        for option in command.options:
            if option.value is None:
                continue
            for flag in option.flags:
                tables.valued.append(f"{path}:{flag}")
                if option.value.spec() != FREE:
                    tables.values.append((f"{path}:{flag}", option.value.spec()))
        if command.subcommands:
            names = [name for name, _ in command.subcommands]
            tables.slots.append((f"{path}:0", "w " + " ".join(names)))
            tables.enter.extend(f"{path}:{name}" for name in names)
            tables.stop.append(path)
        for index, slot in enumerate(command.positionals):
            tables.slots.append((f"{path}:{index}", slot.spec()))
        if command.repeats:
            tables.repeating.append((f"{path}:*", command.positionals[-1].spec()))
    return tables


def render_bash(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for `parser.prog`: one function and the `complete` line that binds it."""
    prog = parser.prog
    tree = describe(parser)
    tables = _tables(tree)
    # The top-level options with a value the user typed are passed on to --complete-values (the same --socket,
    # the same --lab-dir); not --print-completion, which would answer instead.
    toplevel = " ".join(flag for option in tree.options if option.value is not None for flag in option.flags
                        if flag != "--print-completion")
    name = _function_name(prog)
    lines = [
        f"# bash completion for {prog}: generated by `{prog} --print-completion bash`, do not edit.",
        f"# Installed by compose/install.sh in /usr/share/bash-completion/completions/{prog}; or, for one shell:",
        f"#   source <({prog} --print-completion bash)",
        "",
        f"{name}() {{",
        f"    local toplevel={shlex.quote(toplevel)}",
        # A pattern no "PATH:WORD" can match stands in when no option takes a value.
        _WALK.replace("@VALUED@", "|".join(_pattern(p) for p in tables.valued) or "'-'").rstrip("\n"),
    ]
    # A positional word: a subcommand moves down the tree; any other word at a parser with subcommands is an
    # error argparse will report, so there is nothing to offer after it.
    lines += _case("$cmdpath:$word", [("enter", tables.enter)],
                   "cmdpath=${{cmdpath:+$cmdpath/}}$word; pos=0; continue", indent=8)
    lines += _case("$cmdpath", [("stop", tables.stop)], "return 0", indent=8)
    lines += ["        pos=$((pos + 1))", "    done", '    if [ -n "$pending" ]; then']
    lines += _case("$cmdpath:$pending", _group(tables.values), "spec={}", indent=8)
    lines += ["    else"]
    # Exact indices first: the first matching arm wins, and "PATH:*" matches them too.
    lines += _case("$cmdpath:$pos", _group(tables.slots) + _group(tables.repeating), "spec={}", indent=8)
    # Options when the word starts with a dash, or when no positional is left to fill.
    lines += ['        [ "$spec" = rest ] && return 0',
              '        case "$dashdash:$spec:$cur" in',
              "            0::*|0:*:-*)"]
    lines += _case("$cmdpath", _group(tables.options), "spec={}", indent=16)
    lines += ["                ;;", "        esac", "    fi", _OFFER.rstrip("\n"), f"complete -F {name} {prog}"]
    return "\n".join(lines) + "\n"


def render_zsh(parser: argparse.ArgumentParser) -> str:
    """A zsh completion script for `parser.prog`: the bash function, loaded through zsh's bashcompinit."""
    prog = parser.prog
    bash = render_bash(parser).split("\n", 3)[3]  # without the bash header
    return (
        f"# zsh completion for {prog}: generated by `{prog} --print-completion zsh`, do not edit.\n"
        f"# In ~/.zshrc, after compinit:  source <({prog} --print-completion zsh)\n"
        "if ! (( $+functions[compdef] )); then\n"
        "    autoload -U +X compinit && compinit\n"
        "fi\n"
        "autoload -U +X bashcompinit && bashcompinit\n"
        f"{bash}"
    )


def render(parser: argparse.ArgumentParser, *, shell: str) -> str:
    """The completion script for `shell` (bash or zsh)."""
    if shell == "bash":
        return render_bash(parser)
    if shell == "zsh":
        return render_zsh(parser)
    raise ValueError(f"no completion for shell {shell!r} (bash, zsh)")
