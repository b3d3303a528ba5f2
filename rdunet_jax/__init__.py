"""rdunet_jax: the Residual Dilated U-net (Amer, Ye, Janan, 2021) in JAX/Flax."""

__version__ = "0.1.0"
