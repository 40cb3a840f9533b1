"""The `recvae-fast` command's entry point. It imports nothing heavy itself, so that Ctrl-C while
torch, scipy and pyarrow are still being imported (the first second or so) ends, like Ctrl-C later,
with one line on stderr and exit code 130 instead of a traceback."""
import os
import sys

INTERRUPTED = "recvae-fast: interrupted"


def main(argv=None) -> int:
    try:
        # numpy before torch: torch imports it from C++, where a Ctrl-C is swallowed and leaves numpy
        # half-imported (a RecursionError at its next use instead of this exit).
        import numpy  # noqa: F401

        from .cli import main as cli_main
    except KeyboardInterrupt:
        # Nothing has been read or written yet. A half-imported torch can hang or re-raise the signal
        # in the interpreter's shutdown, so the process ends here without one.
        print(INTERRUPTED, file=sys.stderr, flush=True)
        os._exit(130)
    try:
        return cli_main(argv)
    except KeyboardInterrupt:  # the command reports its own interruptions; this is the moment around them
        print(INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
