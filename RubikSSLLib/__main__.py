import sys

from RubikSSLLib.cli import main

sys.exit(main())
