"""`recvae-fast` (or `python -m recvae_fast`): train, evaluate and recommend from the command line.

    recvae-fast train [synthetic | PATH] --out DIR     # data -> split -> fit -> test metrics
    recvae-fast train --out DIR --resume               # continue DIR with its own data and settings
    torchrun --nproc-per-node N -m recvae_fast train DATA --out DIR --item-shards S  # model split by items
    recvae-fast evaluate DIR                           # the saved model on the saved test split
    recvae-fast recommend DIR [PATH] --k 100 --output recs.csv   # default data: the run's own
    recvae-fast recommend DIR --items 50,172,181 --output recs.csv   # one new user, by item ids
    recvae-fast tune [synthetic | PATH] --out DIR --trials N     # Optuna search, then the best trial's run

The package: `parser` (every flag; the hyperparameters' made from TrainConfig's fields), `settings`
(the data, split and hyperparameters a command runs with), `run_folder` (the one protocol that
trains into a run folder, in one process or on every rank of a sharded job, `sharded`) and a module
per command with its `run(args)` and, where its printout is not JSON, `render(result, args)`.

The run folder's files and guarantees are described in recvae_fast.runfolder. Every input (flags,
data, the run folder when resuming) is validated before anything is written. Expected failures
(bad input, I/O errors, corrupt or incompatible files, a device that is not there, a busy run
folder) end with one line on stderr and exit code 2; Ctrl-C ends with exit code 130, keeping the
last finished epoch. Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from . import evaluate, export, recommend, report, train, tune
from .errors import EXPECTED_ERRORS, UsageError, one_line
from .parser import build_parser

COMMANDS = {"train": train, "evaluate": evaluate, "recommend": recommend, "report": report, "export": export,
            "tune": tune}

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


def _render_json(result: dict, args) -> str:
    return json.dumps(result, indent=2)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a flag's bad value: a UsageError; argparse's own errors exit
    except UsageError as exc:
        print(f"recvae-fast: error: {one_line(exc)}", file=sys.stderr)
        return 2
    command = COMMANDS[args.command]
    threads_before = torch.get_num_threads()  # restored at the end: main() may run inside a Python process
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        result = command.run(args)
    except KeyboardInterrupt:
        how = ("a study keeps its finished trials; the same command continues it" if args.command == "tune"
               else "a run folder keeps its last finished epoch; continue with --resume")
        print(f"recvae-fast: interrupted ({how})", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        print(f"recvae-fast: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    if result is not None:  # None: a rank other than 0 of a torchrun job
        try:
            print(getattr(command, "render", _render_json)(result, args), flush=True)
        except BrokenPipeError:  # the reader stopped early (`| head`): no traceback, nothing more to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the interpreter's exit
            return 141  # as a process ended by SIGPIPE
    return 0
