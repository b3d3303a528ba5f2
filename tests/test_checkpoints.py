"""Orbax round trips of the whole train state."""

import asyncio

import jax
import numpy as np
import orbax.checkpoint as ocp
from helpers import make_tiny_config

from rdunet_jax import checkpoints, models, steps


def test_save_then_restore_gives_identical_state(tmp_path, tiny_state):
    config = make_tiny_config()
    batch = {
        "image": np.random.default_rng(0).random((4, 32, 32, 1), np.float32),
        "mask": (np.random.default_rng(1).random((4, 32, 32, 1)) > 0.7).astype(np.float32),
    }
    state, _ = steps.train_step(tiny_state, batch)  # non-trivial optimizer state and batch stats
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 1, "iterator": {"next_index": 3}, "best_val_loss": 0.5, "best_epoch": 1}
    run_checkpoints.save("latest", int(state.step), state, meta)
    run_checkpoints.wait()

    target = steps.abstract_train_state(config, models.build_model(config.model), steps_per_epoch=2)
    restored_state, restored_meta = run_checkpoints.restore("latest", target)
    run_checkpoints.close()
    assert restored_meta == meta
    assert int(restored_state.step) == 1
    for name in ("params", "batch_stats", "opt_state", "dropout_key"):
        original = jax.tree_util.tree_leaves(getattr(state, name))
        restored = jax.tree_util.tree_leaves(getattr(restored_state, name))
        assert len(original) == len(restored) > 0
        for a, b in zip(original, restored, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_without_checkpoint_returns_none(tmp_path, tiny_state):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "empty")
    assert run_checkpoints.restore("latest", tiny_state) is None
    run_checkpoints.close()


def test_without_create_nothing_is_made(tmp_path):
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "absent", create=False)
    assert run_checkpoints.all_steps("best") == run_checkpoints.all_steps("latest") == []
    run_checkpoints.close()
    assert not (tmp_path / "absent").exists()


def test_meta_is_saved_as_it_was_when_save_was_called(tmp_path, tiny_state, monkeypatch):
    """The train loop changes its meta dict right after saving; a slow background write must not see that."""
    original_write = ocp.handlers.JsonCheckpointHandler._save_fn

    async def slow_write(self, item, directory):
        await asyncio.sleep(0.5)
        await original_write(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", slow_write)
    run_checkpoints = checkpoints.RunCheckpoints(tmp_path / "checkpoints")
    meta = {"epoch": 2, "iterator": {"next_index": 5}, "epoch_steps": 1}
    run_checkpoints.save("latest", 5, tiny_state, meta)
    meta.update(epoch=3, iterator=None, epoch_steps=0)
    run_checkpoints.wait()
    _, restored_meta = run_checkpoints.restore("latest", tiny_state)
    run_checkpoints.close()
    assert restored_meta == {"epoch": 2, "iterator": {"next_index": 5}, "epoch_steps": 1}
