"""``python -m concepts experiment …``: the same experiment command as ``python -m engine experiment``."""

import argparse
import sys

from engine.errors import run_command

from .cli import register_cli

parser = argparse.ArgumentParser(prog="python -m concepts", description="Steering experiments against the neuron database.")
register_cli(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
sys.exit(run_command(args.func, args))
