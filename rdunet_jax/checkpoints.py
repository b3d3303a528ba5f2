"""Orbax checkpoints of a run: `latest/` for resuming and `best/` (lowest validation loss).

Each checkpoint holds the train state (parameters, batch statistics, optimizer state, step, dropout key)
and a small JSON `meta` item: epoch, position of the data iterator, best validation loss, the model's
architecture, so a checkpoint is never restored into a different model, the in-plane orientation of
its training slices, so a model is never fed slices the other way round, and a CRC-32 of each part of the
state, so arrays that read back other than saved are found damaged.
"""

import errno
import json
import pathlib
import shutil
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from rdunet_jax import devices, orientation
from rdunet_jax.errors import UserError

# The `model.*` keys that define the function a checkpoint's parameters belong to; `head` and `classes`
# (`data.classes`) fix its output channels and what each means.
ARCHITECTURE_KEYS = (
    "features",
    "depth",
    "block",
    "use_se",
    "se_reduction",
    "skip_dilation_rates",
    "encoder_dilation_rates",
    "head",
    "classes",
)
# What a checkpoint saved before the heads existed was: the paper's binary lesion model.
BINARY_ARCHITECTURE = {"head": "binary", "classes": ["lesion"]}
# The meta key of a run trained with mean teacher, whose optimizer state also holds the teacher.
MEAN_TEACHER = "mean_teacher"
# The meta key of the state's checksums. Orbax and tensorstore keep none for array data: most flipped bits in
# a stored array read back as other weights without any error.
CHECKSUMS = "checksums"


class ModelMismatchError(UserError):
    """A checkpoint was made by a model with other settings than the config's."""


class ChecksumMismatchError(Exception):
    """A checkpoint's arrays read back other than they were saved: damage, not a user's mistake."""


def _part_and_name(path) -> tuple[str, str]:
    """(top-level part, full name) of a state leaf, alike for a TrainState and the dict Orbax restores
    without a target."""
    keys = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]  # a sequence's: "[0]"
    return keys[0], "/".join(keys)


def state_checksums(state) -> dict[str, str]:
    """The CRC-32 of each top-level part of a train state (params, batch_stats, opt_state, ...) over its
    leaves' names, dtypes, shapes and bytes, in name order."""
    parts = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        part, name = _part_and_name(path)
        parts.setdefault(part, []).append((name, leaf))
    checksums = {}
    for part, leaves in parts.items():
        crc = 0
        for name, leaf in sorted(leaves, key=lambda named: named[0]):
            array = np.asarray(leaf)  # with several processes too: the train state is fully replicated
            # A Python number (a fresh state's step) is stored, and read back, as JAX's dtype for it.
            array = array.astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)
            crc = zlib.crc32(f"{name}:{array.dtype.str}:{array.shape}".encode(), crc)
            crc = zlib.crc32(array.tobytes(), crc)
        checksums[part] = f"{crc:08x}"
    return checksums


def check_checksums(meta: dict, state, directory, parts=None) -> None:
    """Raises ChecksumMismatchError naming each part of `state` (of `parts`, else every saved one) whose
    CRC-32 differs from the one `meta` recorded when it was saved; checkpoints saved before checksums were
    recorded are trusted."""
    saved = meta.get(CHECKSUMS)
    if not saved:
        return
    read = state_checksums(state)
    differing = [part for part in (saved if parts is None else parts) if read.get(part) != saved.get(part)]
    if differing:
        raise ChecksumMismatchError(
            f"{', '.join(differing)} in {directory} read back other than saved (CRC-32 "
            + ", ".join(f"{saved.get(part)} saved, {read.get(part)} read" for part in differing)
            + ")"
        )


def architecture(model_config, data_config=None) -> dict:
    """The architecture keys of a `model` config (and `data.classes`) as plain JSON values (tuples become
    lists); a config without a head or classes is binary."""
    values = {key: model_config[key] for key in ARCHITECTURE_KEYS if key in model_config}
    values.setdefault("head", BINARY_ARCHITECTURE["head"])
    classes = None if data_config is None else data_config.get("classes")
    values["classes"] = BINARY_ARCHITECTURE["classes"] if classes is None else list(classes)
    return json.loads(json.dumps(values))


def check_architecture(saved: dict | None, model_config, directory, data_config=None) -> None:
    """Raises ModelMismatchError naming every setting that differs from the checkpoint's (a checkpoint
    from before the heads existed holds a binary model)."""
    if not saved:
        return
    saved = {**BINARY_ARCHITECTURE, **saved}
    current = architecture(model_config, data_config)
    differences = [
        f"{'data' if key == 'classes' else 'model'}.{key}={saved.get(key)!r} in the checkpoint, "
        f"{current[key]!r} in the config"
        for key in ARCHITECTURE_KEYS
        if saved.get(key) != current[key]
    ]
    if differences:
        raise ModelMismatchError(
            f"checkpoint in {directory} was made by another model: {'; '.join(differences)}"
        )


def check_orientation(saved: str | None, data_config, directory) -> None:
    """Raises ModelMismatchError when the checkpoint's training slices faced another way than the config's
    `data.orientation` says. Checkpoints saved before the orientation was recorded are trusted, except a
    `nifti` model left at `auto`: it was trained in stored voxel order, which `auto` no longer means."""
    current = orientation.model_orientation(data_config)
    left_at_auto = data_config.get("orientation", orientation.AUTO) == orientation.AUTO
    if saved is None and data_config.name == "nifti" and left_at_auto:
        raise ModelMismatchError(
            f"checkpoint in {directory} predates recorded orientations and was trained on NIfTI volumes in "
            f"their stored voxel order; set --config.data.orientation={orientation.VOXEL_ORDER}"
        )
    if saved is not None and saved != current:
        raise ModelMismatchError(
            f"checkpoint in {directory} was trained on slices in orientation {saved!r}, the config gives "
            f"data.orientation={current!r}; set --config.data.orientation={saved}"
        )


def check_mean_teacher(meta: dict, target_state, directory) -> None:
    """Raises ModelMismatchError when the checkpoint was trained with mean teacher and the config has none,
    or the other way round: their optimizer states differ, which would otherwise read as damage."""
    consistency = getattr(target_state, "consistency", ())
    saved, configured = bool(meta.get(MEAN_TEACHER)), bool(consistency) and consistency.method == MEAN_TEACHER
    if saved != configured:
        setting = (
            "consistency.weight > 0 (and data.unlabelled_fraction > 0) with consistency.method='mean_teacher'"
            if saved
            else "consistency.weight=0 (or consistency.method='fixmatch')"
        )
        raise ModelMismatchError(
            f"checkpoint in {directory} was trained {'with' if saved else 'without'} mean teacher, the "
            f"config {'has none' if saved else 'has it'}; set {setting} as the checkpoint's run did"
        )


def saved_steps(workdir, kind: str = "latest") -> list[int]:
    """The complete `kind` ('latest' or 'best') steps of the run in `workdir`, oldest first, read from the
    folder names (Orbax's unfinished saves carry a suffix); [] for a folder without checkpoints."""
    directory = pathlib.Path(workdir) / "checkpoints" / kind
    return sorted(int(path.name) for path in directory.glob("*") if path.name.isdigit())


def scored_kind(workdir) -> str:
    """The checkpoints a run is scored with, as its recorded config.json says: 'best' or 'latest' (the
    last; also for a folder without a readable config.json)."""
    try:
        recorded = json.loads((pathlib.Path(workdir) / "config.json").read_text())
        return "best" if recorded["eval"]["checkpoint"] == "best" else "latest"
    except (OSError, ValueError, KeyError, TypeError):
        return "latest"


def restore_weights(workdir, model_config, data_config) -> tuple[dict, dict, int]:
    """(parameters, BatchNorm statistics, step) of the checkpoint the run in `workdir` is scored with (its
    `eval.checkpoint`, `scored_kind`: the weights its metrics, and a self-training round's pseudo-labels,
    came from), for initialising another run (`model_init`): checked against the config's architecture
    (and classes), read without a target so that whatever optimizer the run used (mean teacher's too) does
    not matter. Raises UserError naming `model_init` when there is no checkpoint or it belongs to another
    model."""
    kind = scored_kind(workdir)
    directory = pathlib.Path(workdir).absolute() / "checkpoints" / kind
    steps = saved_steps(workdir, kind)
    if not steps:
        raise UserError(
            f"model_init: no checkpoint in {directory} (give the folder of a run that has trained)"
        )
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False), item_names=("state", "meta")
    )
    damaged = f"model_init: checkpoint step {steps[-1]} in {directory} is damaged"
    try:
        try:
            meta = manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as error:  # noqa: BLE001 - a cut JSON file, a missing one
            raise UserError(f"{damaged} ({type(error).__name__})") from None
        try:
            # Not the orientation: a model pretrained on slices facing another way is a start, not a mistake.
            check_architecture(meta.get("model"), model_config, directory / str(steps[-1]), data_config)
        except ModelMismatchError as error:
            raise ModelMismatchError(f"model_init: {error}") from None
        try:
            state = manager.restore(
                steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore())
            ).state
            check_checksums(meta, state, directory / str(steps[-1]), parts=("params", "batch_stats"))
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types for cut files
            raise UserError(f"{damaged} ({type(error).__name__})") from None
    finally:
        manager.close()
    return state["params"], state["batch_stats"], steps[-1]


class RunCheckpoints:
    """The checkpoints of one workdir: `<workdir>/checkpoints/{latest,best}`."""

    def __init__(self, directory, keep_latest: int = 2, create: bool = True):
        """`create=False` opens existing checkpoints only: no folder is made (evaluation, prediction)."""
        directory = pathlib.Path(directory).absolute()
        self.directory = directory
        self._managers = {
            kind: ocp.CheckpointManager(
                directory / kind,
                # With several processes, `best` and `latest` saving the same step would otherwise
                # share Orbax's barrier names ("Barrier _async_write_complete.<step> is already ongoing").
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=create,
                    multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind),
                ),
                item_names=("state", "meta"),
            )
            for kind, keep in (("latest", keep_latest), ("best", 1))
        }

    def save(self, kind: str, step: int, state, meta: dict) -> None:
        """Saves `state` and `meta` as step `step` of `kind` ('latest' or 'best')."""
        manager = self._managers[kind]
        if kind == "latest":
            # Both write in the background; a `latest` whose meta names its own step the best must not be
            # on disk before that `best`: killed in between, the resumed run would keep the older best as
            # its weights while beating this one's loss. Best saves are rare, so the wait is too.
            self._managers["best"].wait_until_finished()
        if step in manager.all_steps():
            # Left by a timeline that was rolled back past a damaged checkpoint: this one replaces it.
            manager.delete(step)
        # Orbax serialises `meta` in a background thread, possibly after the caller has gone on to change
        # the dict (the train loop resets its epoch counters right after a save): save a copy.
        meta = {**json.loads(json.dumps(meta)), CHECKSUMS: state_checksums(state)}
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def all_steps(self, kind: str) -> list[int]:
        return list(self._managers[kind].all_steps())

    def meta(self, kind: str, step: int) -> dict:
        """The JSON meta of step `step` of `kind`, without its arrays."""
        return self._managers[kind].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def best_after(self, step: int) -> dict:
        """`best_val_loss` and `best_epoch` of a `best` saved after `step` (a kill between the two saves),
        else {}: it stays the best to beat, so a resumed run's meta names the weights in best/ even where
        the replay validates differently (on GPUs, where replays are not exact)."""
        newer = [saved for saved in self.all_steps("best") if saved > step]
        if not newer:
            return {}
        try:
            meta = self.meta("best", max(newer))
            return {"best_val_loss": meta["best_val_loss"], "best_epoch": meta["best_epoch"]}
        except Exception as error:  # noqa: BLE001 - a damaged best: the next best saved replaces it
            print(
                f"warning: best checkpoint step {max(newer)} in {self.directory / 'best'} is unreadable "
                f"({type(error).__name__}); the resumed run's next best replaces it",
                flush=True,
            )
            return {}

    def restore(self, kind: str, target_state, step: int | None = None, model_config=None, data_config=None):
        """Restores (state, meta) of `kind` at `step` (the newest by default) onto `target_state`'s
        structure, or returns None when there is none. With `model_config` (and `data_config`), first
        checks that the checkpoint was made by the same architecture (and slice orientation). Raises
        ChecksumMismatchError when the arrays read back other than saved."""
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        if model_config is not None:
            meta = self.meta(kind, step)
            check_architecture(
                meta.get("model"), model_config, self.directory / kind / str(step), data_config
            )
            if data_config is not None:
                check_orientation(meta.get("orientation"), data_config, self.directory / kind / str(step))
            check_mean_teacher(meta, target_state, self.directory / kind / str(step))
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target_state), meta=ocp.args.JsonRestore()
            ),
        )
        check_checksums(restored.meta, restored.state, self.directory / kind / str(step))
        return restored.state, restored.meta

    def quarantine(self, kind: str, step: int) -> pathlib.Path:
        """Moves a damaged step out of `kind` (to `damaged/`), so it is neither read nor overwritten.

        Every host of a run calls this; the first moves the folder once (the others would race it on
        shared storage) and all then see it gone. The name, from the folder's own time, is the same on
        every host."""
        source = self.directory / kind / str(step)
        written = time.strftime("%Y%m%d-%H%M%S", time.localtime(source.stat().st_mtime))
        destination = self.directory / "damaged" / f"{kind}-{step}-{written}"
        suffix = 1
        while destination.exists():  # the same step damaged again within a second
            destination, suffix = destination.with_name(f"{kind}-{step}-{written}-{suffix}"), suffix + 1
        devices.wait_for_every_host(f"rdunet_quarantine_named_{kind}_{step}")
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), destination)
        devices.wait_for_every_host(f"rdunet_quarantine_moved_{kind}_{step}")
        self._managers[kind].reload()
        return destination

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


def check_steps_per_epoch(meta: dict, step: int, steps_per_epoch: int, num_slices: int) -> None:
    """UserError when the training data now gives another number of steps an epoch than the run trained
    with (data paths may change on resume, and an edited data folder is prepared anew): the step would
    fall elsewhere in the learning-rate schedule and the epochs. A checkpoint saved before the meta had the
    key tells it by its step: the steps of its finished epochs over their number."""
    trained = meta.get("steps_per_epoch")
    if trained is None and meta.get("epoch"):
        trained = (step - meta.get("epoch_steps", 0)) / meta["epoch"]
    if trained is not None and trained != steps_per_epoch:
        raise UserError(
            f"data: the run trained {trained:g} steps an epoch, its training split now gives "
            f"{steps_per_epoch} ({num_slices} slices); resuming would move its learning-rate schedule and "
            "epochs: point the data paths at the run's data, or use another --workdir"
        )


def not_damage(error: Exception) -> bool:
    """A read that failed for want of memory or file handles, not because the checkpoint is damaged."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return True
    # XLA's out of memory (placing the restored arrays), and the same causes as tensorstore words them.
    return any(
        text in str(error) for text in ("RESOURCE_EXHAUSTED", "Too many open files", "Cannot allocate")
    )


def restore_latest(run_checkpoints, state, config, check=lambda restored: None):
    """The newest readable `latest` checkpoint as (state, meta), falling back past damaged ones.

    Returns None when there is no checkpoint; raises UserError when the checkpoints were made by another
    model, or when every one is damaged (rather than silently training from scratch). Damaged steps
    newer than the one restored are moved to `checkpoints/damaged/`, out of the way of new saves, once
    `check(restored)` has passed: a refused resume leaves the folder as it was.
    """
    steps = sorted(run_checkpoints.all_steps("latest"), reverse=True)
    damaged = []
    for step in steps:
        try:
            restored = run_checkpoints.restore(
                "latest", state, step, model_config=config.model, data_config=config.data
            )
        except ModelMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - any other read failure means a damaged checkpoint
            detail = (str(error).strip().splitlines() or [""])[0][:150]  # Orbax's can run to pages
            if not_damage(error):  # an intact newest step must not be moved aside and trained again
                raise UserError(
                    f"cannot read checkpoint step {step} in {run_checkpoints.directory / 'latest'} "
                    f"({type(error).__name__}: {detail}); out of memory or file handles, nothing was moved: "
                    "free them and run again"
                ) from None
            damaged.append((step, f"{type(error).__name__}: {detail}" if detail else type(error).__name__))
            continue
        check(restored)
        for damaged_step, reason in damaged:
            moved_to = run_checkpoints.quarantine("latest", damaged_step)
            print(
                f"warning: checkpoint step {damaged_step} in {run_checkpoints.directory / 'latest'} is "
                f"damaged ({reason}); moved it to {moved_to} and resumed from step {step}",
                flush=True,
            )
        return restored
    if steps:
        raise UserError(
            f"every checkpoint in {run_checkpoints.directory / 'latest'} is damaged "
            f"(steps {steps}); move the folder away to train from scratch"
        )
    return None
