"""Orbax checkpoints of a run: `latest/` for resuming and `best/` (lowest validation loss).

Each checkpoint holds the train state (parameters, batch statistics, optimizer state, step, RNG key)
and a small JSON `meta` item (epoch, best validation loss, input-iterator state).
"""

import pathlib

import orbax.checkpoint as ocp


class RunCheckpoints:
    """The checkpoints of one workdir: `<workdir>/checkpoints/{latest,best}`."""

    def __init__(self, directory, keep_latest: int = 2):
        directory = pathlib.Path(directory).absolute()
        self.directory = directory
        self._managers = {
            "latest": ocp.CheckpointManager(
                directory / "latest",
                options=ocp.CheckpointManagerOptions(max_to_keep=keep_latest, create=True),
                item_names=("state", "meta"),
            ),
            "best": ocp.CheckpointManager(
                directory / "best",
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
                item_names=("state", "meta"),
            ),
        }

    def save(self, kind: str, step: int, state, meta: dict) -> None:
        """Saves `state` and `meta` as step `step` of `kind` ('latest' or 'best')."""
        manager = self._managers[kind]
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def latest_step(self, kind: str) -> int | None:
        return self._managers[kind].latest_step()

    def all_steps(self, kind: str) -> list[int]:
        return list(self._managers[kind].all_steps())

    def restore(self, kind: str, target_state, step: int | None = None):
        """Restores (state, meta) of `kind` at `step` (the newest by default) onto `target_state`'s
        structure, or returns None when there is no checkpoint."""
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
