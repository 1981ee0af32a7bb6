"""The command line: argument parsing and printing (app), the VM commands (vm), attaching a disk (attach).

``p2pvbd.cli:main`` is the console script's entry point."""

from p2pvbd.cli.app import main

__all__ = ["main"]
