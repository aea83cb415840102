"""The recipe sections of the calibrated merge: `aligned` (how K, V and o_proj are merged) and `refine`
(the optional fit of each merged layer to the source's outputs)."""

from __future__ import annotations

from dataclasses import dataclass

from gqa_convert.options import FileOptions, option

KEY_MERGES = ("frequency", "complex")
# per-head: each query head's attended moment (what its values are averaged over), the shared V and the
# o blocks solved alternately; attended: the head-averaged attended moment, one closed form; plain: the
# moment of the attention's inputs
VALUE_MOMENTS = ("per-head", "attended", "plain")
OUTPUT_RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0)
REFINE_TARGETS = ("attention", "block")  # refine.py: what a refined layer is fitted to


@dataclass(frozen=True, kw_only=True)
class AlignedSettings(FileOptions):
    """How the aligned merge treats K, V and o_proj (merge.py)."""

    key_merge: str = option(
        "frequency",
        choices=KEY_MERGES,
        help="frequency: per layer the best (K-only attention error) of the complex per-pair merge and the "
        "low band merged as a linear map; complex: the complex per-pair merge",
    )
    band_angle: float = option(
        1.0, above=0, help="the low band: RoPE pairs rotating at most this many radians over a calibration window"
    )
    value_moment: str = option("per-head", choices=VALUE_MOMENTS, help="the moments the shared V is fitted to")
    output_ridges: tuple[float, ...] | None = option(
        OUTPUT_RIDGES,
        min=0,
        max=1e6,  # relative to the features' mean energy: beyond this the solve returns the closed form
        empty=False,
        help="the joint o_proj solve: relative ridges tried, per layer the best on held-out batches; null: no solve",
    )


@dataclass(frozen=True, kw_only=True)
class RefineSettings(FileOptions):
    """Adam steps per layer fitting the merged q/k/v/o to the source's outputs (refine.py)."""

    # the held-out check keeps the best step; 100 steps of a 7B layer take about 1.6 s on one H200
    steps: int = option(0, min=0, max=10_000, help="Adam steps per layer (0: no refinement)")
    lr: float = option(3e-4, above=0, help="the refinement's learning rate")
    target: str = option(
        "block",
        choices=REFINE_TARGETS,
        help="block: the decoder layer's output (MLP included); attention: the attention's output",
    )
