"""Raw BraTS (every release) -> one chunked Zarr v3 store; see docs/STORE.md."""

from .convert import (
    CaseError,
    CaseResult,
    ConvertOptions,
    convert_case,
    foreground_bbox,
    nonzero_box,
    zscore_nonzero,
)
from .discover import CaseSource, DatasetError, discover_cases
from .driver import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    PreprocessReport,
    fold_assignment,
    preprocess,
)

__all__ = [
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "CaseError",
    "CaseResult",
    "CaseSource",
    "ConvertOptions",
    "DatasetError",
    "PreprocessReport",
    "convert_case",
    "discover_cases",
    "fold_assignment",
    "foreground_bbox",
    "nonzero_box",
    "preprocess",
    "zscore_nonzero",
]
