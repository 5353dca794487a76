"""`pag` — the command line. Each role registers its own subcommands; this file only wires them.

The registering modules import their heavy dependencies inside the commands, so `pag --help`
answers in well under a second.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from actors.scaling import register as register_workers
from buffer.cli import register as register_buffer
from common.presets import PRESET_HELP, default_preset
from common.errors import add_verbose_everywhere, command_path, run_handled
from driver.train import register as register_train
from eval.cli import register as register_eval
from ipgo.cli import register as register_ipgo
from serving.cli import register as register_serve
from sft.cli import register as register_sft

#: each function adds its subcommands to the subparsers object; a registering module imports
#: nothing heavy at module level, so `pag --help` stays fast
_REGISTRARS: tuple[Callable, ...] = (
    register_train,     # pag train, pag adapt
    register_sft,       # pag sft
    register_buffer,    # pag buffer …
    register_workers,   # pag workers …
    register_eval,      # pag eval
    register_ipgo,      # pag ipgo
    register_serve,     # pag serve
)


def _config_command(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config of a preset (+ YAML + overrides), or list every key",
                       description="Resolve and print a config exactly as `pag train` would use it.")
    p.add_argument("--preset", default=default_preset(), help=PRESET_HELP)
    p.add_argument("--method", help="a named method or ablation (pag, gfn-tb, ppo, pag-no-reset, pag-no-prt, pag-no-fl)")
    p.add_argument("--config", dest="config_file", help="YAML file of config sections")
    p.add_argument("--list", action="store_true", help="list every key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.lr=3e-5")

    def run(args) -> int:
        import yaml

        from common.config import describe, load_config

        if args.list:
            print("\n".join(describe()))
            return 0
        cfg = load_config(args.preset, args.config_file, args.overrides, method=args.method)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    p.set_defaults(func=run)


def _datasets_command(sub) -> None:
    p = sub.add_parser("datasets", help="list the prompt sets, or import one of your own files (promptist)",
                       description="`pag datasets` lists the packaged prompt sets and the importable ones; "
                                   "`pag datasets import promptist FILE` turns Promptist's "
                                   "filtered_mix_train_for_ft.txt into the official training set (sd14's default "
                                   "sampler.datasets), as the official prompts/convert_format.ipynb does.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="the packaged and importable sets (the default)")
    imp = actions.add_parser("import", help="import a prompt file under $PAG_CACHE/datasets")
    imp.add_argument("name", choices=["promptist"], help="which set the file is")
    imp.add_argument("file", type=Path, help="Promptist's filtered_mix_train_for_ft.txt, one prompt per line")

    def run(args) -> int:
        from common.data import import_promptist, list_datasets

        if args.action == "import":
            path, kept, removed = import_promptist(args.file)
            print(f"{path}: {kept} prompts ({removed} lines of 45+ words left out, as convert_format.ipynb does)")
            return 0
        for name, text in list_datasets().items():
            print(f"{name:22s} {text}")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pag",
        description="PAG: train a GPT-2 policy as a GFlowNet (FL-DB) to sample effective and diverse prompt "
                    "rewrites for Stable Diffusion, on Ray with a Redis replay buffer.",
        epilog="Start with `pag train` (tiny preset, CPU, offline). `pag COMMAND --help` explains each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    _config_command(sub)
    _datasets_command(sub)
    add_verbose_everywhere(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes (common/errors.py): 0 done, 1 run failed, 2 bad input, 3 Redis, 4 Ray cluster,
    5 models, 130 interrupted; a known error is one line on stderr, its traceback only with -v."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" once per HOME, at INFO
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = " ".join(["pag", *command_path(parser, argv)])
    return run_handled(args.func, args, prog, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
