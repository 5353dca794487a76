"""The `pag` command (cli.py): wires every role's subcommands; `python -m pag` runs it too."""
