"""Pure: the man page and the bash completion, generated from the same parser as ``--help``."""

from __future__ import annotations

import argparse
from typing import List, Tuple

from . import __version__
from .policy import ACCEPTED


def _subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def _roff(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def manpage(parser: argparse.ArgumentParser) -> str:
    out = [f'.TH NM-POLICY-ROUTING 8 "" "nm-policy-routing {__version__}" "System Administration"',
           ".SH NAME", "nm\\-policy\\-routing \\- " + _roff(parser.description or ""),
           ".SH SYNOPSIS", ".B nm\\-policy\\-routing", "[\\-\\-state\\-dir DIR] [\\-v] COMMAND [ARGS]",
           ".SH COMMANDS"]
    for name, sub, help_text in _subcommands(parser):
        usage = sub.format_usage().replace("usage: ", "").strip()
        out += [".TP", f".B {_roff(usage)}", _roff(help_text) + "."]
        for action in sub._actions:
            if action.option_strings and action.help and action.dest != "help":
                out += [".RS", ".TP", f".B {_roff(', '.join(action.option_strings))}", _roff(action.help), ".RE"]
    out += [".SH POLICY KEYS", "Stored in the connection profile's user data (keyfile group [user]):"]
    for key, forms in ACCEPTED.items():
        out += [".TP", f".B nm\\-policy\\-routing.{_roff(key)}", _roff(forms)]
    out += [".SH FILES", ".TP", ".B /etc/nm\\-policy\\-routing/defaults.conf",
            "Global defaults: sections [defaults], [type:TYPE], [interface:PATTERN]; profile keys win.",
            ".TP", ".B /run/nm\\-policy\\-routing/", "The record: active connections, allocations, previous "
            "sysctl values, the last outcome per connection; daemon.lock and handoff.sock (where the "
            "dispatcher hook hands events over, root only) while the daemon runs.",
            ".SH EXAMPLES", ".nf", _roff(parser.epilog or ""), ".fi",
            ".SH SEE ALSO", "nmcli(1), NetworkManager\\-dispatcher(8), ip\\-rule(8), nft(8)"]
    return "\n".join(out) + "\n"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    names = " ".join(name for name, _, _ in commands)
    cases = []
    for name, sub, _ in commands:
        opts = " ".join(o for a in sub._actions for o in a.option_strings)
        cases.append(f"        {name}) opts=\"{opts}\" ;;")
    keys = " ".join(ACCEPTED)
    return f"""# bash completion for nm-policy-routing (generated from its --help)
_nm_policy_routing() {{
    local cur prev cmd opts i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in -*) ;; *) cmd="${{COMP_WORDS[i]}}"; break ;; esac
    done
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "{names} --state-dir --verbose --help" -- "$cur"))
        return
    fi
    case "$cmd" in
{chr(10).join(cases)}
        *) opts="" ;;
    esac
    case "$cmd" in
        set|unset|show|apply|remove)
            if [ "$COMP_CWORD" -eq $((i + 1)) ] && [[ "$cur" != -* ]]; then
                local conns
                conns=$(nmcli -g NAME connection show 2>/dev/null)
                local IFS=$'\\n'
                COMPREPLY=($(compgen -W "$conns" -- "$cur"))
                return
            fi
            if [ "$cmd" = set ] || [ "$cmd" = unset ]; then
                COMPREPLY=($(compgen -W "{keys} $opts" -- "$cur"))
                return
            fi ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}}
complete -F _nm_policy_routing nm-policy-routing
"""
