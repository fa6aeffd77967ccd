"""RubikSSL: self-supervised pretraining of 3D CNNs on unlabeled CT/MRI volumes (pure Python, no Slicer imports)."""

__version__ = "0.1.0"

import time as _time

# When this process began (as near as Python can tell): a STOP request older than this is a stale one.
STARTED_AT = _time.time()
