"""`python -m recvae_fast.cli ...`: the same command line as `python -m recvae_fast`."""
import sys

from ..entry import main

sys.exit(main())
