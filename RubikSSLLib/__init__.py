"""RubikSSL: self-supervised pretraining of 3D CNNs on unlabeled CT/MRI volumes (pure Python, no Slicer imports)."""

__version__ = "0.1.0"

import time as _time

# When the current command began (the import, then `cli.main` again): a STOP request older than this is stale.
STARTED_AT = _time.time()
