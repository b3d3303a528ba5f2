"""What each study runs: budgets, arms (the thing compared), replicates (folds, seeds) and their configs.

Every run of a study starts from one base config (dataset, budget, folds) and changes only its arm and
its replicate, so runs that differ in the compared thing share data split, seed set and budget.
"""

import dataclasses
import functools
import pathlib
from collections.abc import Callable

import ml_collections

from rdunet_jax import config_lib, config_validation, reports

# Data sub-folders of --data_root (../shared/data), by dataset.
DATA_FOLDERS = {"semiseg": "covid-semiseg", "ma2020_2d": "covid19-ct-seg-2d"}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Resolution, schedule, replicates and (smoke only) model size of every run of a study."""

    image_size: int
    num_epochs: int
    batch_size: int
    learning_rate: float
    lr_decay_epochs: int
    cv_folds: int  # 0: no cross-validation (a fixed split, replicated over seeds)
    seeds: tuple[int, ...]
    model_features: int = 16
    model_depth: int = 4
    dtype: str = "float32"  # model.dtype: the compute type ('bfloat16': float32 parameters)
    # eval.checkpoint. 'best' (the lowest validation loss) is how the stored ablation, dilation and
    # lesion-size records were scored; under cross-validation the validation split is the scored fold, so
    # it picks each run's epoch on the slices it is scored on (optimistic). 'last' keeps the fold unseen.
    checkpoint: str = "best"

    def describe(self) -> str:
        """One line for the tables: resolution, schedule, replicates."""
        text = (
            f"{self.image_size}x{self.image_size} px, {self.num_epochs} epochs, batch {self.batch_size}, "
            f"Adam {self.learning_rate:g} divided by 10 every {self.lr_decay_epochs} epochs, "
            f"seeds {list(self.seeds)}"
        )
        if (self.model_features, self.model_depth) != (16, 4):
            text += f", model shrunk to {self.model_features} feature maps and {self.model_depth} levels"
        if self.dtype != "float32":
            text += f", {self.dtype} compute"
        return text


# (budget, dataset) -> Budget. `smoke` checks the pipeline in a minute (numbers meaningless); `small` fits
# this 2-core CPU; `paper` is the paper's 256x256, 350-epoch schedule (a GPU job).
BUDGETS = {
    ("smoke", "semiseg"): Budget(32, 2, 4, 1e-2, 20, cv_folds=2, seeds=(0,), model_features=4, model_depth=2),
    ("smoke", "ma2020_2d"): Budget(
        32, 1, 8, 1e-2, 20, cv_folds=0, seeds=(0,), model_features=4, model_depth=2
    ),
    ("small", "semiseg"): Budget(128, 40, 4, 1e-3, 15, cv_folds=5, seeds=(0,)),
    ("small", "ma2020_2d"): Budget(64, 10, 8, 1e-3, 6, cv_folds=0, seeds=(0, 1, 2)),
    ("paper", "semiseg"): Budget(256, 350, 8, 1e-3, 20, cv_folds=5, seeds=(0,)),
    ("paper", "ma2020_2d"): Budget(256, 350, 8, 1e-3, 20, cv_folds=0, seeds=(0, 1, 2)),
}
BUDGET_NAMES = ("smoke", "small", "paper")


def _sorted_schedules(schedules, reverse: bool) -> tuple:
    return tuple(tuple(sorted(rates, reverse=reverse)) for rates in schedules)


# Dilation schedules on the skips, shallow to deep. The alternatives keep the paper's convolutions per
# skip (same depth, same parameters) and change only the order or the rates.
DILATION_SCHEDULES = {
    "paper": config_lib.PAPER_SKIP_DILATION_RATES,
    "decreasing": _sorted_schedules(config_lib.PAPER_SKIP_DILATION_RATES, reverse=True),
    "increasing": _sorted_schedules(config_lib.PAPER_SKIP_DILATION_RATES, reverse=False),
    "rate1": tuple(tuple(1 for _ in rates) for rates in config_lib.PAPER_SKIP_DILATION_RATES),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One alternative of the compared thing: a name, a description and the config change it makes."""

    name: str
    description: str
    apply: Callable[[ml_collections.ConfigDict], None]


def variant_arm(variant: str, description: str) -> Arm:
    """An arm that selects one of the paper's model variants."""
    return Arm(variant, description, lambda config: config_lib.apply_model_variant(config, variant))


def schedule_arm(name: str, description: str) -> Arm:
    """An arm of the full model with the skip dilation schedule `DILATION_SCHEDULES[name]`."""

    def apply(config):
        config_lib.apply_model_variant(config, "rdunet")
        config.model.skip_dilation_rates = DILATION_SCHEDULES[name]

    return Arm(name, description, apply)


def split_arm(scheme: str, description: str) -> Arm:
    """An arm of the full model on the `scheme` split of ma2020_2d."""

    def apply(config):
        config_lib.apply_model_variant(config, "rdunet")
        config.data.split_scheme = scheme

    return Arm(scheme, description, apply)


@dataclasses.dataclass(frozen=True)
class Study:
    """A comparison: arms, the reference the others are paired with, the tables and allowed datasets."""

    name: str
    title: str
    arms: tuple[Arm, ...]
    reference: str
    tables: tuple[str, ...]  # of 'per_replicate', 'summary', 'paired_slices', 'paired_replicates', 'lesions'
    datasets: tuple[str, ...] = ("semiseg", "ma2020_2d")
    # A second arm the others are paired with per slice (the recipe study: the chosen candidate).
    also_paired_with: str = ""

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)


@functools.cache
def semiseg_recipes():
    """configs/semiseg.py, imported by path (configs/ is not a package)."""
    return config_lib.config_module(pathlib.Path(__file__).resolve().parents[2] / "configs" / "semiseg.py")


def recipe_arm(name: str) -> Arm:
    """An arm of the full model trained with candidate `name` of configs/semiseg.py's recipes."""
    recipes = semiseg_recipes()
    changes = ", ".join(f"{key}={value}" for key, value in recipes.RECIPE_CANDIDATES[name].items())
    chosen = " (configs/semiseg.py's choice)" if name == recipes.CHOSEN_RECIPE else ""

    def apply(config):
        config_lib.apply_model_variant(config, "rdunet")
        recipes.apply_recipe(config, name)

    return Arm(name, f"recipe{chosen}: {changes}", apply)


ABLATION_ARMS = (
    variant_arm("unet", "U-net (plain blocks)"),
    variant_arm("residual", "+ residual blocks"),
    variant_arm("residual_se", "+ residual + squeeze-excitation"),
    variant_arm("rdunet", "+ DC modules: the full RDU-net"),
    variant_arm("resdunet", "ResDUNet (encoder-side dilation)"),
)

STUDIES = {
    "ablation": Study(
        "ablation",
        "Baselines and ablation (the paper's Tables 1 and 3)",
        ABLATION_ARMS,
        reference="rdunet",
        tables=("per_replicate", "summary", "paired_slices"),
    ),
    "dilation": Study(
        "dilation",
        "Dilation schedules on the skip connections",
        (
            schedule_arm("paper", "paper: (1,2,3,3,2,1)x2, (1,2,2,1)x2"),
            schedule_arm("decreasing", "decreasing only: (3,3,2,2,1,1)x2, (2,2,1,1)x2"),
            schedule_arm("increasing", "increasing only: (1,1,2,2,3,3)x2, (1,1,2,2)x2"),
            schedule_arm("rate1", "rate 1 throughout (same depth, no dilation)"),
            variant_arm("residual_se", "no DC module"),
            variant_arm("resdunet", "ResDUNet: encoder dilation (4,3,2,1,1), no DC module"),
        ),
        reference="paper",
        tables=("per_replicate", "summary", "paired_slices"),
    ),
    "lesion_size": Study(
        "lesion_size",
        "Dice by lesion size (the paper's Table 2)",
        (
            variant_arm("unet", "U-net"),
            variant_arm("resdunet", "ResDUNet"),
            variant_arm("rdunet", "RDU-net (full model)"),
        ),
        reference="rdunet",
        tables=("lesions", "summary"),
    ),
    "split_leakage": Study(
        "split_leakage",
        "Random slice split vs contiguous blocks on ma2020_2d",
        (
            split_arm("random", "the paper's random slice split"),
            split_arm("blocks", "contiguous blocks of file numbers"),
        ),
        reference="blocks",
        tables=("per_replicate", "summary", "paired_replicates"),
        datasets=("ma2020_2d",),
    ),
    "recipe": Study(
        "recipe",
        "COVID-SemiSeg recipe candidates against the budget's paper schedule",
        (
            variant_arm("rdunet", "the full model at this budget (the paper's schedule, shortened)"),
            *(recipe_arm(name) for name in semiseg_recipes().RECIPE_CANDIDATES),
        ),
        reference="rdunet",
        tables=("per_replicate", "summary", "paired_slices", "lesions"),
        datasets=("semiseg",),
        also_paired_with=semiseg_recipes().CHOSEN_RECIPE,
    ),
}
DEFAULT_DATASETS = {"ablation": "semiseg", "dilation": "semiseg", "lesion_size": "semiseg"}


@dataclasses.dataclass(frozen=True)
class Replicate:
    """One repetition of every arm: a cross-validation fold (None without CV) and a seed."""

    fold: int | None
    seed: int

    @property
    def label(self) -> str:
        return f"fold{self.fold}-seed{self.seed}" if self.fold is not None else f"seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a study: an arm on a replicate, and its complete config."""

    arm: str
    replicate: Replicate
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.replicate.label}"


def base_config(dataset: str, budget: Budget, data_root) -> ml_collections.ConfigDict:
    """The config every run of a study starts from: dataset, budget, folds, and evaluation split."""
    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.data.name = dataset
    config.data.manual_dir = str(pathlib.Path(data_root) / DATA_FOLDERS[dataset])
    config.data.image_size = budget.image_size
    config.num_epochs = budget.num_epochs
    config.batch_size = budget.batch_size
    config.learning_rate = budget.learning_rate
    config.lr_decay_epochs = budget.lr_decay_epochs
    config.model.features = budget.model_features
    config.model.depth = budget.model_depth
    config.model.dtype = budget.dtype
    config.data.cv_folds = budget.cv_folds
    # With CV the held-out fold is the evaluation set (the test split, where present, stays untouched).
    config.eval.split = "validation" if budget.cv_folds else "test"
    config.eval.small_lesion_area = reports.small_lesion_area(budget.image_size)
    config.eval.checkpoint = budget.checkpoint
    # Every record under experiments/results was made with these forms, the defaults before 2026-11-29:
    # pinned, so the records stay the runs a plan describes and a rerun reproduces them to the digit
    # (`bits` dropout draws other masks; the other two compute the same function to float tolerance).
    config.model.update(dropout_impl="flax", pool_impl="reduce_window", batch_norm_impl="flax")
    return config


def replicates(base: ml_collections.ConfigDict, seeds) -> list[Replicate]:
    """Every (fold, seed) of a study: all folds of `data.cv_folds` (or none) times the seeds."""
    folds = range(base.data.cv_folds) if base.data.cv_folds else [None]
    return [Replicate(fold, seed) for fold in folds for seed in seeds]


def fit_to_depth(config: ml_collections.ConfigDict) -> None:
    """Cuts dilation schedules to `model.depth` (the smoke budget's shallower model); no-op at depth 4."""
    depth = config.model.depth
    if config.model.skip_dilation_rates:
        config.model.skip_dilation_rates = tuple(config.model.skip_dilation_rates)[:depth]
    if config.model.encoder_dilation_rates:
        config.model.encoder_dilation_rates = tuple(config.model.encoder_dilation_rates)[: depth + 1]


def run_config(base: ml_collections.ConfigDict, arm: Arm, replicate: Replicate, study: str):
    """The config of one run: the base, changed by the arm and the replicate only."""
    config = base.copy_and_resolve_references()
    arm.apply(config)
    fit_to_depth(config)
    config.seed = replicate.seed
    if replicate.fold is not None:
        config.data.cv_fold = replicate.fold
    config.name = f"{study}-{arm.name}-{replicate.label}"
    config_validation.validate(config)
    return config


def plan(study: Study, base: ml_collections.ConfigDict, seeds) -> list[RunSpec]:
    """Every run of `study`, replicate-major so a partial study has every arm on its first folds."""
    return [
        RunSpec(arm.name, replicate, run_config(base, arm, replicate, study.name))
        for replicate in replicates(base, seeds)
        for arm in study.arms
    ]
