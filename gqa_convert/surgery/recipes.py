"""Recipes: named, documented configurations of a conversion. A recipe says how heads are merged
(method), which heads form a group (grouping), what the calibration runs on (its `calibration`
section: where the text comes from, how many tokens, the window length, sequential or not), and the
calibrated merge's settings (`aligned`, `refine`). Built-ins live in RECIPES; a user's own recipe is a
YAML file of the same keys (`gqa-convert recipes NAME` prints one to start from), checked like every
file this tool reads. Adding a recipe is adding an entry to RECIPES; changing the default is changing
DEFAULT_RECIPE.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from gqa_convert.calibration import TEXT_SOURCES, CalibrationSettings
from gqa_convert.options import FileOptions, option
from gqa_convert.surgery.aligned import AlignedSettings, RefineSettings
from gqa_convert.surgery.groupings import GROUPINGS, Grouping
from gqa_convert.surgery.methods import METHODS, Method

# The sections of a recipe, each an options class of its own (gqa_convert.calibration.settings,
# gqa_convert.surgery.aligned.settings).
SECTIONS: dict[str, type[FileOptions]] = {
    "calibration": CalibrationSettings,
    "aligned": AlignedSettings,
    "refine": RefineSettings,
}


@dataclass(frozen=True, kw_only=True)
class Recipe(FileOptions):
    """A conversion's configuration (see the module docstring)."""

    name: str = option(help="the recipe's name (a file's: its own, or the file name)")
    summary: str = option("", help="one line on what the recipe does", empty=True)
    method: str = option("mean", choices=lambda: METHODS, help="how a group's kv heads merge")
    grouping: str = option("contiguous", choices=lambda: GROUPINGS, help="which kv heads form a group")
    calibration: CalibrationSettings = option(CalibrationSettings(), help="what the calibration runs on")
    aligned: AlignedSettings = option(AlignedSettings(), help="the aligned merge's settings")
    refine: RefineSettings = option(RefineSettings(), help="the refinement of each merged layer")

    def check(self) -> None:
        used = self.sections()
        for section in SECTIONS:
            if section not in used and getattr(self, section) != SECTIONS[section]():
                warnings.warn(
                    f"recipe {self.name}: its {section} settings are not used by method {self.method} with "
                    f"grouping {self.grouping}: ignored",
                    stacklevel=3,
                )
        if "refine" in used and not self.refine.steps and self.refine != RefineSettings():
            warnings.warn(
                f"recipe {self.name}: refine.lr and refine.target are ignored with refine.steps 0", stacklevel=3
            )

    @property
    def merge_method(self) -> Method:
        return METHODS[self.method]

    @property
    def head_grouping(self) -> Grouping:
        return GROUPINGS[self.grouping]

    @property
    def calibrated(self) -> bool:
        """Whether it runs a calibration (a calibrated method or grouping)."""
        return self.merge_method.needs_calibration or self.head_grouping.needs_calibration

    @property
    def needs_user_text(self) -> bool:
        return self.calibrated and TEXT_SOURCES[self.calibration.text].needs_user_text

    def sections(self) -> tuple[str, ...]:
        """The sections this recipe's method and grouping read."""
        used = ["calibration"] if self.calibrated else []
        if self.merge_method.settings:
            used += [self.merge_method.settings, "refine"]
        return tuple(used)

    def as_dict(self, every_section: bool = True) -> dict[str, Any]:
        """Plain values (what the provenance records, and `recipes NAME` prints: the sections used)."""
        record = {key: value for key, value in dataclasses.asdict(self).items() if key not in SECTIONS}
        used = self.sections()
        for section in SECTIONS:
            if every_section or section in used:
                record[section] = {
                    key: _plain(value) for key, value in dataclasses.asdict(getattr(self, section)).items()
                }
        return record


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _recipe(
    name: str, summary: str, method: str = "aligned", grouping: str = "contiguous", **sections: dict[str, Any]
) -> Recipe:
    built = {section: SECTIONS[section](**values) for section, values in sections.items()}
    return Recipe(name=name, summary=summary, method=method, grouping=grouping, **built)


_CLOSED_FORM_K_V = dict(key_merge="complex", value_moment="plain", output_ridges=None)
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        _recipe("mean", "the GQA paper's rule: each group's K/V heads averaged; no calibration", "mean"),
        _recipe("first", "the GQA paper's ablation: each group keeps its first head; no calibration", "first"),
        _recipe("random", "the GQA paper's ablation: fresh heads drawn like the model's init (--seed)", "random"),
        _recipe(
            "aligned",
            "calibrated on your text: frequency-aware K, V fitted per query head, joint o_proj solve, "
            "sequential; no refinement",
        ),
        _recipe(
            "aligned-self",
            "aligned, calibrated on text the source model writes itself: needs no data (texts given with "
            "--calib-data join it)",
            calibration=dict(text="self"),
        ),
        _recipe(
            "aligned-refined",
            "aligned, then 100 Adam steps per layer fitting the merged attention to the decoder block's output",
            refine=dict(steps=100),
        ),
        _recipe(
            "aligned-refined-attention",
            "aligned, then 100 Adam steps per layer fitting the merged attention to the attention's output",
            refine=dict(steps=100, target="attention"),
        ),
        _recipe(
            "aligned-averaged-v",
            "aligned with V fitted to the head-averaged attended moment (one closed form)",
            aligned=dict(value_moment="attended"),
        ),
        _recipe(
            "aligned-not-sequential",
            "aligned with each layer calibrated on the source's own inputs, not the merged layers' outputs",
            calibration=dict(sequential=False),
        ),
        _recipe(
            "aligned-similarity",
            "aligned, with the kv heads most alike (after alignment) grouped per layer",
            grouping="similarity",
        ),
        _recipe(
            "closed-form",
            "the earlier closed-form merge: complex per-pair K, plain-moment V, no o_proj solve, not sequential",
            aligned=_CLOSED_FORM_K_V,
            calibration=dict(sequential=False),
        ),
    )
}
DEFAULT_RECIPE = "aligned-self"  # what pool runs without --recipe or --method: the best measured without data
FALLBACK_RECIPE = "mean"  # the default's stand-in where it cannot run (fused q/k/v projections), with a warning
