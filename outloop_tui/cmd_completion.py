"""`outloop completion SHELL`: the shell's completion script, by argcomplete.

Put `eval "$(outloop completion bash)"` in ~/.bashrc (zsh: the same with zsh;
fish: `outloop completion fish | source` in config.fish). Completing runs
`outloop` with argcomplete's environment set; `cli.main` hands those runs to
argcomplete before anything else happens.
"""

from __future__ import annotations

import argparse


def run_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["outloop"], shell=args.shell))
    return 0
