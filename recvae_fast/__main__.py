"""`python -m recvae_fast ...`: the `recvae-fast` command line."""
import sys

from .entry import main

sys.exit(main())
