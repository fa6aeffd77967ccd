"""RubikSSL: self-supervised pretraining of 3D CNNs on unlabeled CT/MRI volumes (pure Python, no Slicer imports)."""

__version__ = "0.1.0"
