"""`python -m cache_store {info,verify} PATH` - see cache_store/cli.py."""

import sys

from cache_store.cli import main

sys.exit(main())
