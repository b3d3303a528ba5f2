"""Self-training on COVID-SemiSeg: configs/semiseg.py's recipe as the teacher, a student on the labelled
slices plus the teacher's pseudo-labels of the release's 1,600 unlabelled slices (rdunet_jax/selftrain.py):

    python -m rdunet_jax.main --config configs/semiseg_selftrain.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg

Stages under the workdir (runs/rdunet-semiseg-selftrain): teacher/, pseudo_labels/round1/ (PNG masks and
weight maps, summary.json), student1/, selftrain.json; rerun the same command to resume after a kill. The
student is evaluated on the test split when Dataset/TestingSet is present, else on validation. One fold of
the cross-validation by hand (fold k held out from both teacher and student; the pool is used in every fold):

    python -m rdunet_jax.main --config configs/semiseg_selftrain.py \\
        --config.data.manual_dir=../shared/data/covid-semiseg --workdir runs/selftrain-cv0 \\
        --config.data.cv_folds=5 --config.data.cv_fold=0 --config.eval.split=validation
"""

import pathlib

from rdunet_jax import config_lib


def get_config(variant: str = "rdunet"):
    """The chosen semiseg recipe as teacher, with one round of self-training."""
    config = config_lib.config_module(pathlib.Path(__file__).with_name("semiseg.py")).get_config(variant)
    config.name = f"{config.model.variant}-semiseg-selftrain"
    config.selftrain.rounds = 1
    # The rest of the recipe is base_config's `selftrain` defaults (and data.pseudo_fraction 0.5); why:
    # Pseudo-labels keep pixels the teacher is at least 90% sure of (either way), weight 1; the lesion
    # borders, where a 0.74-Dice teacher is least reliable, drop out of the student's loss.
    # Half of each batch of 4 is pseudo-labelled: an epoch is still one pass over the labelled slices
    # (22 steps over 45 slices, 20 in a cross-validation fold), so the student's 150 epochs are the
    # teacher's 3,300 steps (its 300 epochs of 11 steps) and the same compute, 6,600 pseudo-labelled
    # slices drawn without replacement: about 4 passes over the pool. The decay at half-way copies the
    # teacher's schedule (150 of 300 epochs at 1e-3, then 1e-4).
    # Stronger augmentation for the student (Noisy Student's noise): the teacher's flips and zoom 0.2 plus
    # a random contrast (x0.9-1.1) and brightness (+-0.05) change. Geometric augmentation beyond the
    # teacher's scored worse on the 50 labelled slices (zoom 0.3: -0.014 per slice; rotation 15 degrees:
    # 0.664 against 0.729 on fold 0), so the extra noise is in intensity only; it is not cross-validated
    # on its own.
    return config
