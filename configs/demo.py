"""The full RDU-net on the built-in CT phantom: trains, checkpoints and evaluates in minutes on a CPU.

    python -m rdunet_jax.main --config configs/demo.py
"""

from rdunet_jax import config_lib


def get_config():
    config = config_lib.apply_model_variant(config_lib.base_config(), "rdunet")
    config.name = "demo"
    config.num_epochs = 12
    config.batch_size = 8
    config.lr_decay_epochs = 8
    config.data.name = "synthetic"
    config.data.image_size = 64
    config.data.num_train = 240
    config.data.num_validation = 32
    config.data.num_test = 64
    return config
