"""The full RDU-net on the built-in CT phantom: trains, checkpoints and evaluates in minutes on a CPU.

    python -m rdunet_jax.main --config configs/demo.py

`configs/demo.py:tiny` is a seconds-long smoke test of the whole pipeline (4 feature maps, 32 px):

    python -m rdunet_jax.main --config configs/demo.py:tiny --workdir /tmp/rdunet_smoke
"""

from rdunet_jax import config_lib
from rdunet_jax.errors import UserError


def get_config(size: str = "full"):
    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.name = "demo"
    config.batch_size = 8
    config.data.name = "synthetic"
    config.data.image_size = 64
    config.data.num_train = 240
    config.data.num_validation = 32
    config.data.num_test = 64
    if size == "full":
        # Without dropout and with 4 more epochs at the first learning rate than the paper-like 12 with
        # dropout 0.5 (which straddled the demo's 0.80): test Dice 0.838-0.856 on 1, 2 and 4 threads, in
        # about 2.5 minutes on 2 cores (docs/results.md, Reproducibility).
        config.num_epochs = 16
        config.lr_decay_epochs = 12
        config.model.dropout_rate = 0.0
    elif size == "tiny":
        config.name = "demo_tiny"
        config.num_epochs = 3
        config.lr_decay_epochs = 8
        config.batch_size = 4
        config.learning_rate = 1e-2
        config.log_every_steps = 1
        config.model.features = 4
        config.model.depth = 2
        config.model.skip_dilation_rates = ((1, 2, 1), (1, 2, 1))
        config.data.image_size = 32
        config.data.num_train = 8
        config.data.num_validation = 4
        config.data.num_test = 4
    else:
        raise UserError(f"configs/demo.py: unknown argument {size!r}; use 'full' or 'tiny'")
    return config
