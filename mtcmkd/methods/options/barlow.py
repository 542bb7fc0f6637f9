"""Options of single-stage KD with Barlow Twins (a multimodal teacher path and a student path
trained together, Barlow Twins between their bottlenecks).

docs/METHODS.md section 3 has the facts behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mtcmkd.config_fields import ConfigError, fmt
from mtcmkd.methods.options.base import MethodOptions

if TYPE_CHECKING:  # types only, see MethodOptions.check_run
    from mtcmkd.config import RunConfig

__all__ = ["BarlowOptions"]


@dataclass(frozen=True, kw_only=True)
class BarlowOptions(MethodOptions):
    """Barlow Twins KD's weights and pooling; the student sees one or two modalities."""

    name: ClassVar[str] = "barlow"
    student_count: ClassVar[tuple[int, int]] = (1, 2)

    ds_weight: float = 0.10
    """Weight of each path's deep-supervision cross-entropy term."""
    barlow_lambda_offdiag: float = 5e-3
    """Barlow Twins redundancy weight on the off-diagonal correlations."""
    barlow_weight: float = 1.0
    """Weight of the Barlow Twins term. The method divides the loss (a sum over the D
    bottleneck channels) by D, so 1.0 puts it on the scale of the segmentation loss."""
    barlow_pool: int | None = 2
    """Average-pool the bottleneck over k^3 blocks before the Barlow Twins loss (fewer, less
    correlated samples); ``None`` uses every bottleneck voxel."""

    def check_run(self, run: RunConfig) -> None:
        stride = run.model.stride
        bottleneck = [p // stride for p in run.data.patch_size]
        pool = self.barlow_pool or 1
        if any(b % pool for b in bottleneck):
            raise ConfigError(
                f"method.barlow_pool: must divide the bottleneck size {fmt(tuple(bottleneck))}"
                f" (data.patch_size / {stride}) (got {pool})"
            )
        samples = run.train.batch_size
        for b in bottleneck:
            samples *= b // pool
        if samples < 2:
            raise ConfigError(
                f"method.barlow_pool: the Barlow Twins loss needs >= 2 samples per batch, "
                f"this gives {samples} (train.batch_size x pooled bottleneck voxels); use a "
                f"smaller pool or a larger patch (got {pool})"
            )

    def _validate(self) -> None:
        for name in ("ds_weight", "barlow_lambda_offdiag", "barlow_weight"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        if self.barlow_pool is not None:
            self._require(self.barlow_pool >= 1, "barlow_pool", "must be >= 1 or null")
