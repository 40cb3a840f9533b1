"""`python -m recvae_fast ...`: the `recvae-fast` command line."""
import sys

from .cli import main

sys.exit(main())
