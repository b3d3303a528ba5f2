"""Pins every variable's path, order, shape and dtype for each paper variant.

Checkpoints store variables by these paths, and `models.initialize_variables` draws them in this order, so
a refactor that renames a module or reorders submodules would break old checkpoints or change every
trained digit. The listing in tests/data/parameter_trees.txt was written by the code before the
redesign; regenerate it only for a deliberate change of the model (RDUNET_WRITE_PARAMETER_TREES=1).
"""

import ast
import math
import os
import pathlib

import jax

from rdunet_jax import config_lib, models

LISTING = pathlib.Path(__file__).parent / "data" / "parameter_trees.txt"


def tree_listing(variant: str) -> list[str]:
    config = config_lib.apply_model_variant(config_lib.base_config(), variant)
    variables = models.abstract_variables(models.build_model(config.model), 64)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return [f"{variant} {jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.dtype}" for path, leaf in flat]


def all_listings() -> list[str]:
    return [line for variant in sorted(config_lib.MODEL_VARIANTS) for line in tree_listing(variant)]


def test_parameter_trees_are_those_of_the_pinned_listing():
    if os.environ.get("RDUNET_WRITE_PARAMETER_TREES") == "1":
        LISTING.write_text("\n".join(all_listings()) + "\n")
    pinned = LISTING.read_text().splitlines()
    assert len(pinned) > 100
    assert all_listings() == pinned


def test_pinned_rdunet_listing_holds_the_readme_parameter_count():
    shapes = [
        ast.literal_eval(line.split(" ", 2)[2].rsplit(" ", 1)[0])
        for line in LISTING.read_text().splitlines()
        if line.startswith("rdunet ['params']")
    ]
    assert sum(math.prod(shape) for shape in shapes) == 2_910_701
