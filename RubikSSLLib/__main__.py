"""`python -m RubikSSLLib`: the command line, with a cancel recorded from the first line on (stopping.py)."""

import sys

from RubikSSLLib import stopping

stopping.record_from_start()  # a SIGTERM while the command line is still being imported is not lost

from RubikSSLLib.cli import main  # noqa: E402

sys.exit(main())
