"""mtcmkd: multi-teacher cross-modal knowledge distillation for brain-tumour segmentation.

The import is kept light (no torch at import time) so the CLI starts fast.
"""

__version__ = "0.1.0"
