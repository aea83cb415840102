"""What a conversion is asked to do, validated where it is built: the CLI and Python callers get the
same checks, before any work starts. pool's options are what a user sets (kv heads, the recipe, the
calibration text and its size, device and output); how the merge works is the recipe's
(gqa_convert.surgery.recipes)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from gqa_convert.arch import Architecture
from gqa_convert.calibration import CalibrationText, check_device, resolve_device
from gqa_convert.calibration.self_generated import Generation
from gqa_convert.calibration.settings import MAX_TOKENS
from gqa_convert.calibration.texts import token_share
from gqa_convert.errors import GQAConvertError
from gqa_convert.options import Options, option
from gqa_convert.surgery.methods import METHODS
from gqa_convert.surgery.recipe_files import load_recipe
from gqa_convert.surgery.recipes import DEFAULT_RECIPE, FALLBACK_RECIPE, RECIPES, Recipe
from gqa_convert.units import DTYPE_NAMES, parse_size

__all__ = ["ConversionOptions", "ExpandOptions", "PoolOptions"]


@dataclass(frozen=True, kw_only=True)
class ConversionOptions(Options):
    """How any conversion reads its source and writes its output."""

    dtype: str = option("auto", help="output dtype of floating tensors (auto: each tensor's own)", choices=DTYPE_NAMES)
    max_shard_size: str = option("5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    force: bool = option(False, help="replace a non-empty output folder this tool wrote")
    revision: str | None = option(None, help="Hub revision (branch, tag or commit) of a Hub id")
    allow_pickle: bool = option(False, help="read .bin (pickle) weights, with torch.load(weights_only=True)")

    def check(self) -> None:
        parse_size(self.max_shard_size)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


@dataclass(frozen=True, kw_only=True)
class ExpandOptions(ConversionOptions):
    """expand: exact GQA/MQA -> MHA."""


def _recipe_help() -> str:
    return f"a built-in recipe (gqa-convert recipes lists them; default: {DEFAULT_RECIPE}) or a recipe YAML file"


@dataclass(frozen=True, kw_only=True)
class PoolOptions(ConversionOptions):
    """pool: merge the kv heads into kv_heads groups, by a recipe. Once built, `recipe` is a Recipe."""

    kv_heads: int = option(help="kv heads after pooling (1 = MQA)", flags=("--kv-heads", "-g"), min=1)
    recipe: str | Recipe | None = option(None, help=_recipe_help(), metavar="NAME|FILE")
    method: str | None = option(
        None,
        choices=lambda: METHODS,
        help="the built-in recipe of that name: --method mean is the GQA paper's baseline (the same as --recipe mean)",
    )
    calib_data: tuple[str, ...] = option(
        (),
        help="calibration text for a calibrated recipe: a text or table file, a folder or a Hub dataset id "
        "(repeatable: several share the tokens equally)",
        metavar="TEXT",
    )
    calib_tokens: int | None = option(
        None, min=1, max=MAX_TOKENS, help="calibration tokens (default: the recipe's, 16384)"
    )
    calib_seq_len: int | None = option(
        None, min=2, help="calibration window (default: the recipe's, 512; use the context the model will serve)"
    )
    calib_text_column: str = option("text", help="the text column of table calibration data")
    device: str = option("auto", help="calibration device: auto (cuda when available), cpu, cuda or cuda:N")
    seed: int = option(0, help="seed of the random recipe")

    def check(self) -> None:
        super().check()
        recipe_file = None  # a recipe file is an input: the output guard keeps it out of OUT
        if isinstance(self.recipe, str):
            if not self.recipe:
                raise GQAConvertError("--recipe must not be empty: give a recipe name or a recipe YAML file")
            recipe_file = None if self.recipe in RECIPES else self.recipe
            object.__setattr__(self, "recipe", load_recipe(self.recipe))
        object.__setattr__(self, "recipe_file", recipe_file)
        if self.recipe is not None and not isinstance(self.recipe, Recipe):
            raise GQAConvertError(
                f"--recipe must be a recipe name, a YAML file or a Recipe, not {self.recipe!r} "
                f"({type(self.recipe).__name__})"
            )
        object.__setattr__(self, "default_recipe", self.recipe is None and self.method is None)
        recipe = self.recipe or RECIPES[self.method or DEFAULT_RECIPE]
        if self.method is not None and recipe.method != self.method:
            raise GQAConvertError(
                f"--method {self.method} contradicts --recipe {recipe.name}, whose method is {recipe.method}: "
                f"give one of them (a recipe names its method; to change it, edit a copy: "
                f"gqa-convert recipes {recipe.name} > my-recipe.yaml)"
            )
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "_resolved", self._resolve(recipe))
        check_device(self.device)
        self._check_calibration(recipe)

    def _check_calibration(self, recipe: Recipe) -> None:
        given = [flag for flag, value in self._calibration_flags().items() if value]
        if not recipe.calibrated:
            if given:
                warnings.warn(f"{', '.join(given)} ignored: recipe {recipe.name} uses no calibration", stacklevel=4)
            return
        if recipe.needs_user_text and not self.calib_data:
            raise GQAConvertError(
                f"recipe {recipe.name} calibrates on text of the model's domain: pass --calib-data FILE "
                "(e.g. a few thousand lines of the text it will serve)"
            )
        token_share(self.calibration_text)

    def _calibration_flags(self) -> dict[str, bool]:
        return {
            "--calib-data": bool(self.calib_data),
            "--calib-tokens": self.calib_tokens is not None,
            "--calib-seq-len": self.calib_seq_len is not None,
            "--calib-text-column": self.calib_text_column != "text",
        }

    def _resolve(self, recipe: Recipe) -> Recipe:
        sizes = {"tokens": self.calib_tokens, "seq_len": self.calib_seq_len}
        changes = {key: value for key, value in sizes.items() if value is not None}
        if not changes or not recipe.calibrated:
            return recipe
        with warnings.catch_warnings():  # the recipe's own warnings were given when it was built
            warnings.simplefilter("ignore")
            return dataclasses.replace(recipe, calibration=recipe.calibration.replace(**changes))

    @property
    def resolved_recipe(self) -> Recipe:
        """The recipe as run: its calibration sizes replaced by --calib-tokens and --calib-seq-len."""
        return self._resolved  # type: ignore[attr-defined]

    @property
    def calibration_text(self) -> CalibrationText:
        """What the calibration reads."""
        settings = self.resolved_recipe.calibration
        generation = Generation(settings.openings, settings.temperature, settings.top_p, settings.seed)
        return CalibrationText(
            settings.text,
            self.calib_data,
            settings.tokens,
            settings.seq_len,
            self.calib_text_column,
            generation,
            document_tokens=settings.document_tokens,
        )

    @property
    def inputs(self) -> tuple[str, ...]:
        """What pool reads besides the source: the calibration texts and a recipe file."""
        return (*self.calib_data, *([self.recipe_file] if self.recipe_file else []))

    def for_architecture(self, architecture: Architecture) -> PoolOptions:
        """These options, or, where the default recipe cannot run on this architecture (fused q/k/v
        projections), the fallback recipe with a warning naming what it costs."""
        if not self.default_recipe or architecture.projections is not None:  # type: ignore[attr-defined]
            return self
        warnings.warn(
            f"the default recipe {DEFAULT_RECIPE} needs separate q/k/v/o projections and {architecture.model_type} "
            f"fuses them: recipe {FALLBACK_RECIPE} instead, which leaves the model far from the source until it is "
            "uptrained (SmolLM2-135M to MQA on held-out WikiText: perplexity 29,377 against the source's 25.92, and "
            f"about 70 with {DEFAULT_RECIPE})",
            stacklevel=3,
        )
        return self.replace(recipe=FALLBACK_RECIPE)

    @property
    def calibration_device(self) -> str:
        return resolve_device(self.device)
