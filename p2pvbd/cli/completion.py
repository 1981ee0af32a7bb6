"""`p2pvbd completion bash`: a completion script generated from the argument parser itself, so it never
lags behind the commands and needs nothing installed beyond bash-completion's usual hook."""

from __future__ import annotations

import argparse
import shlex

# Options whose value is a path: complete file names after them.
PATH_OPTIONS = ("--home", "--log-file", "--unit-dir", "--kernel", "--initrd")


def command_tree(parser: argparse.ArgumentParser, path: str = "") -> dict[str, list[str]]:
    """Every command path ("", "disk", "disk create", …) with the words that may follow it."""
    words: list[str] = []
    tree: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.append(name)
                tree.update(command_tree(sub, f"{path} {name}".strip()))
        elif action.option_strings and action.help != argparse.SUPPRESS:
            words.extend(o for o in action.option_strings if o.startswith("--"))
    tree[path] = words
    return tree


def bash_script(parser: argparse.ArgumentParser) -> str:
    tree = command_tree(parser)
    cases = "\n".join(f"        {shlex.quote(path)}) words={shlex.quote(' '.join(words))} ;;"
                      for path, words in sorted(tree.items()))
    paths = " ".join(f"|{p}|" for p in sorted(tree) if p)
    prog = parser.prog
    return f"""# bash completion for {prog}: eval "$({prog} completion bash)" in ~/.bashrc, or save it as
# /etc/bash_completion.d/{prog}
_{prog}_complete() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" words="" w i
    case "$prev" in
        {'|'.join(PATH_OPTIONS)}) COMPREPLY=( $(compgen -f -- "$cur") ); return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in -*) continue ;; esac
        case "{paths}" in *"|${{path:+$path }}$w|"*) path="${{path:+$path }}$w" ;; esac
    done
    case "$path" in
{cases}
    esac
    COMPREPLY=( $(compgen -W "$words" -- "$cur") )
}}
complete -o default -F _{prog}_complete {prog}
"""
