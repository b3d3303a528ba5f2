"""The train step's stored executables: stored then loaded without tracing, marked when XLA cannot
round-trip them, replaced when damaged, and keyed by everything the program depends on."""

import pathlib

import jax
import jax.extend
import numpy as np
import pytest
from helpers import make_tiny_config

from rdunet_jax import compile_cache, datasets, devices, input_pipeline, models, steps


def _fixed_batch(config):
    source = datasets.load_source(config.data, "train")
    dataset = input_pipeline.train_dataset(source, config.data, config.batch_size, config.seed, epoch=0)
    return dataset[0]


def _executable_config(cache_dir):
    config = make_tiny_config()
    config.compilation_cache_dir = str(cache_dir)
    return config


def _fresh_state(steps_per_epoch: int):
    """A tiny state whose schedule makes a program no other test compiled in this process."""
    config = make_tiny_config()
    return steps.create_train_state(config, models.build_model(config.model), steps_per_epoch)


class _FakeSerializer:
    """Stands in for jax.experimental.serialize_executable: bytes name executables kept in memory;
    `broken` makes every loaded executable fail when run, as XLA:CPU's sometimes do."""

    def __init__(self, broken=False):
        self.executables, self.broken = {}, broken
        self.error = jax.errors.JaxRuntimeError("NOT_FOUND: Function wrapped_iota not found")

    def serialize(self, compiled):
        name = f"executable-{len(self.executables)}".encode()
        self.executables[name] = compiled
        return name, None, None

    def deserialize_and_load(self, serialized, in_tree, out_tree):
        self.trees = (in_tree, out_tree)
        compiled = self.executables[serialized]
        if not self.broken:
            return compiled

        def fails(*args):
            raise self.error

        return fails


def _assert_same_step(step_function, state, batch):
    want_state, want = steps.train_step(state, batch)
    got_state, got = step_function(state, batch)
    assert float(got["loss"]) == float(want["loss"])
    for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_compiled_train_step_is_stored_then_loaded_without_tracing(tiny_state, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "serialize_executable", _FakeSerializer())
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    first = compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    (stored,) = (tmp_path / "train_step").glob("*.bin")
    assert stored.read_bytes() == b"executable-0"
    _assert_same_step(first, tiny_state, batch)  # the check's result, handed out once
    _assert_same_step(first, tiny_state, batch)  # the executable itself
    jitted = steps.train_step
    monkeypatch.setattr(compile_cache, "train_step", None)  # loading must not trace or compile
    second = compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    monkeypatch.setattr(compile_cache, "train_step", jitted)
    assert second.compiled is first.compiled and second.stored_at == stored
    _assert_same_step(second, tiny_state, batch)


def test_a_program_that_does_not_survive_serialisation_is_marked_and_left_to_jit(
    tiny_state, tmp_path, monkeypatch
):
    monkeypatch.setattr(compile_cache, "serialize_executable", _FakeSerializer(broken=True))
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    _assert_same_step(compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh), tiny_state, batch)
    assert not list((tmp_path / "train_step").glob("*.bin"))
    assert len(list((tmp_path / "train_step").glob("*.unserialisable"))) == 1
    assert compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh) is steps.train_step


@pytest.mark.parametrize(
    "error",
    [
        jax.errors.JaxRuntimeError("NOT_FOUND: Function wrapped_iota not found"),
        # An executable of other code filed under this code's key: its outputs are not this step's.
        ValueError("Too few leaves for PyTreeDef; expected 637, got 636."),
    ],
)
def test_a_stored_executable_that_fails_to_run_is_replaced_by_jit(tiny_state, tmp_path, monkeypatch, error):
    serializer = _FakeSerializer()
    serializer.error = error
    monkeypatch.setattr(compile_cache, "serialize_executable", serializer)
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    serializer.broken = True  # as if the stored bytes missed a kernel in this process
    step_function = compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    _assert_same_step(step_function, tiny_state, batch)
    assert not list((tmp_path / "train_step").glob("*.bin"))
    assert len(list((tmp_path / "train_step").glob("*.unserialisable"))) == 1
    _assert_same_step(step_function, tiny_state, batch)


def test_out_of_memory_in_a_check_run_is_raised_and_marks_nothing(tiny_state, tmp_path, monkeypatch):
    """A device out of memory is a passing state: the step is neither marked unserialisable nor its stored
    file removed, as it would be for good."""
    serializer = _FakeSerializer(broken=True)
    serializer.error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes")
    monkeypatch.setattr(compile_cache, "serialize_executable", serializer)
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    assert not list((tmp_path / "train_step").glob("*"))
    serializer.broken = False
    compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    (stored,) = (tmp_path / "train_step").glob("*.bin")
    serializer.broken = True  # the stored executable's first run runs out of memory
    step_function = compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        step_function(tiny_state, batch)
    assert stored.is_file() and not list((tmp_path / "train_step").glob("*.unserialisable"))


def test_executables_are_loaded_with_jits_own_argument_and_result_trees(tiny_state, tmp_path, monkeypatch):
    """A stored step is loaded with the trees jit itself gives the train step's arguments and results
    (another tree would make every check run fail and mark the step)."""
    serializer = _FakeSerializer()
    monkeypatch.setattr(compile_cache, "serialize_executable", serializer)
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    compile_cache.cached_train_step(config, tiny_state, batch, 2, devices.data_parallel_mesh())
    lowered = steps.train_step.lower(tiny_state, batch)
    assert serializer.trees == (lowered.in_tree, lowered.out_tree)


def test_a_cache_folder_that_cannot_be_written_only_costs_the_stored_step(tiny_state, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_cache, "write_bytes_atomic", refuse)
    monkeypatch.setattr(compile_cache, "write_text_atomic", refuse)
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    for serializer in (_FakeSerializer(), _FakeSerializer(broken=True)):  # the step, then the marker
        monkeypatch.setattr(compile_cache, "serialize_executable", serializer)
        _assert_same_step(
            compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh), tiny_state, batch
        )
        assert not list(tmp_path.glob("**/*.*"))


def test_the_first_call_is_answered_with_the_check_runs_result_once(tiny_state, tmp_path, monkeypatch):
    serializer = _FakeSerializer()
    monkeypatch.setattr(compile_cache, "serialize_executable", serializer)
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    step_function = compile_cache.cached_train_step(
        config, tiny_state, batch, 2, devices.data_parallel_mesh()
    )
    runs = []
    compiled = step_function.compiled
    step_function.compiled = lambda *args: runs.append(args) or compiled(*args)
    step_function(tiny_state, batch)
    assert not runs  # the check run's result: the executable did not run again
    step_function(tiny_state, batch)
    assert len(runs) == 1


def test_a_damaged_stored_executable_is_compiled_again(tiny_state, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "serialize_executable", _FakeSerializer())
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh)
    (stored,) = (tmp_path / "train_step").glob("*.bin")
    stored.write_bytes(b"not an executable")
    _assert_same_step(compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh), tiny_state, batch)
    assert stored.read_bytes() == b"executable-1"  # rewritten


def test_the_real_serialiser_either_round_trips_the_step_or_marks_it(tmp_path):
    config = _executable_config(tmp_path)
    state = _fresh_state(7)
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    step_function = compile_cache.cached_train_step(config, state, batch, 7, mesh)
    stored = list((tmp_path / "train_step").glob("*.bin"))
    refused = list((tmp_path / "train_step").glob("*.unserialisable"))
    assert len(stored) + len(refused) == 1
    _assert_same_step(step_function, state, batch)
    again = compile_cache.cached_train_step(config, state, batch, 7, mesh)
    _assert_same_step(again, state, batch)


def test_the_executable_key_covers_model_schedule_and_shapes(tiny_state, tmp_path):
    config = _executable_config(tmp_path)
    batch = _fixed_batch(config)
    key = compile_cache.train_step_key(config, tiny_state, batch, 2)
    assert compile_cache.train_step_key(_executable_config(tmp_path), tiny_state, batch, 2) == key
    assert compile_cache.train_step_key(config, tiny_state, batch, 3) != key  # the schedule's step count
    for name in steps.SCHEDULE_KEYS:  # each setting the schedule reads (test_steps: it reads no other)
        other = _executable_config(tmp_path)
        other[name] += 1
        assert compile_cache.train_step_key(other, tiny_state, batch, 2) != key, name
    other = _executable_config(tmp_path)
    other.model.pool_impl = "reduce_window"
    assert compile_cache.train_step_key(other, tiny_state, batch, 2) != key
    assert compile_cache.train_step_key(config, tiny_state.replace(loss="dice_bce"), batch, 2) != key
    # Where `model.batch_norm_by_source` splits the batch is set from the data, not the model config.
    split = compile_cache.train_step_key(config, tiny_state.replace(labelled_rows=2), batch, 2)
    assert split != key and split != compile_cache.train_step_key(
        config, tiny_state.replace(labelled_rows=3), batch, 2
    )
    half = {name: value[:1] for name, value in batch.items()}
    assert compile_cache.train_step_key(config, tiny_state, half, 2) != key
    # Same shapes, other dtypes or names: other programs.
    narrow = dict(batch, image=batch["image"].astype(np.float16))
    assert compile_cache.train_step_key(config, tiny_state, narrow, 2) != key
    renamed = {"images" if name == "image" else name: value for name, value in batch.items()}
    assert compile_cache.train_step_key(config, tiny_state, renamed, 2) != key
    # A fresh state's step is a weakly typed Python 0; a restored one an int32 array.
    assert isinstance(tiny_state.step, int)
    restored = tiny_state.replace(step=jax.numpy.asarray(0, jax.numpy.int32))
    assert compile_cache.train_step_key(config, restored, batch, 2) != key


def test_the_executable_key_covers_xla_flags(tiny_state, tmp_path, monkeypatch):
    # XLA reads XLA_FLAGS once per process: a run with other flags must not load a step compiled without.
    config = _executable_config(tmp_path)
    batch = _fixed_batch(config)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    key = compile_cache.train_step_key(config, tiny_state, batch, 2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compile_cache.train_step_key(config, tiny_state, batch, 2) != key


def test_the_executable_cache_is_off_with_the_compilation_cache_and_other_shapes_use_jit(
    tiny_state, tmp_path
):
    config = _executable_config("")
    batch = jax.device_put(_fixed_batch(config))
    mesh = devices.data_parallel_mesh()
    assert compile_cache.cached_train_step(config, tiny_state, batch, 2, mesh) is steps.train_step
    step_function = compile_cache.cached_train_step(_executable_config(tmp_path), tiny_state, batch, 2, mesh)
    half = {name: value[:1] for name, value in batch.items()}
    got = step_function(tiny_state, half)[1]["loss"]
    assert float(got) == float(steps.train_step(tiny_state, half)[1]["loss"])


def test_without_the_cache_the_step_is_compiled_before_its_first_call_and_other_shapes_use_jit(
    tiny_state, monkeypatch
):
    config = _executable_config("")
    batch = jax.device_put(_fixed_batch(config))
    released = []
    monkeypatch.setattr(compile_cache, "release_freed_memory", lambda: released.append(True))
    mesh = devices.data_parallel_mesh()
    step_function = compile_cache.compiled_train_step(config, tiny_state, batch, 2, mesh)
    assert released == [True]  # after compiling, before the step runs
    assert step_function is not steps.train_step and step_function.compiled is not steps.train_step
    _assert_same_step(step_function, tiny_state, batch)
    half = {name: value[:1] for name, value in batch.items()}
    want = steps.train_step(tiny_state, half)[1]["loss"]
    assert float(step_function(tiny_state, half)[1]["loss"]) == float(want)
    # Same shapes, another dtype: jit too, not the executable fixed to float32.
    narrow = dict(batch, image=np.asarray(batch["image"], np.float16))
    want = steps.train_step(tiny_state, narrow)[1]["loss"]
    assert float(step_function(tiny_state, narrow)[1]["loss"]) == float(want)


def _package_sources_in(jaxpr, package: pathlib.Path) -> set[str]:
    """The package's files named in the source tracebacks of a program's equations, nested ones too."""
    names = set()
    for equation in jaxpr.eqns:
        traceback = equation.source_info.traceback
        for frame in traceback.frames if traceback is not None else ():
            if pathlib.Path(frame.file_name).parent == package:
                names.add(pathlib.Path(frame.file_name).name)
        for inner in jax.extend.core.jaxprs_in_params(equation.params):
            names |= _package_sources_in(inner, package)
    return names


def test_the_executable_key_is_of_the_sources_as_imported_not_as_edited_since(
    tiny_state, tiny_config, monkeypatch
):
    # A source edited on disk while a run goes on is not the program that run traces and stores.
    batch = _fixed_batch(tiny_config)
    key = compile_cache.train_step_key(tiny_config, tiny_state, batch, 2)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda path: b"edited since")
    assert compile_cache.train_step_key(tiny_config, tiny_state, batch, 2) == key
    assert compile_cache._sources_digest() != compile_cache._SOURCES_DIGEST  # a new process would differ


def test_the_executable_key_reads_every_package_source_traced_into_the_step(tiny_state, tiny_config):
    # A change to any file whose code ends up in the program must be a new key, or a stale executable
    # would be loaded; JAX's own record of where each operation was traced from names those files.
    program = jax.make_jaxpr(steps.train_step.__wrapped__)(tiny_state, _fixed_batch(tiny_config))
    traced = _package_sources_in(program.jaxpr, pathlib.Path(compile_cache.__file__).parent)
    assert {"models.py", "losses.py", "steps.py"} <= traced
    assert traced <= set(compile_cache._TRAIN_STEP_SOURCES)


@pytest.mark.parametrize("trace_context", [True, False], ids=["jax's trace context", "a jax without it"])
def test_the_executable_key_covers_jax_settings_that_change_the_traced_program(
    tiny_state, tmp_path, monkeypatch, trace_context
):
    # The stored step is loaded untraced: a run under another PRNG form or matmul precision must not load it.
    if not trace_context:  # JAX's private list of them: without it, the public settings known to matter
        monkeypatch.delattr(compile_cache.jax_config, "trace_context")
    config = _executable_config(tmp_path)
    batch = _fixed_batch(config)
    key = compile_cache.train_step_key(config, tiny_state, batch, 2)
    with jax.threefry_partitionable(not jax.config.jax_threefry_partitionable):
        assert compile_cache.train_step_key(config, tiny_state, batch, 2) != key
    with jax.default_matmul_precision("highest"):
        assert compile_cache.train_step_key(config, tiny_state, batch, 2) != key
    if trace_context:  # an enum-valued setting
        with jax.numpy_dtype_promotion("strict"):
            assert compile_cache.train_step_key(config, tiny_state, batch, 2) != key
    else:  # each public setting of the fallback list
        for name, other in (("jax_enable_x64", True), ("jax_default_prng_impl", "rbg")):
            before = getattr(jax.config, name)
            jax.config.update(name, other)
            try:
                assert compile_cache.train_step_key(config, tiny_state, batch, 2) != key, name
            finally:
                jax.config.update(name, before)
    assert compile_cache.train_step_key(config, tiny_state, batch, 2) == key


def test_the_executable_key_covers_every_consistency_setting_traced_into_the_step(tiny_state, tmp_path):
    # Mean teacher's and FixMatch's settings are constants of the traced step (the state's static field).
    from rdunet_jax.mean_teacher import Consistency

    config = _executable_config(tmp_path)
    batch = _fixed_batch(config)
    fixmatch = Consistency(1.0, 10, 0.05, "fixmatch", 0.5, 0.95, 0.3)
    keys = {compile_cache.train_step_key(config, tiny_state, batch, 2)}
    for index in range(len(fixmatch)):
        changed = fixmatch._replace(**{fixmatch._fields[index]: ("mean_teacher" if index == 3 else 0.25)})
        keys.add(compile_cache.train_step_key(config, tiny_state.replace(consistency=changed), batch, 2))
    keys.add(compile_cache.train_step_key(config, tiny_state.replace(consistency=fixmatch), batch, 2))
    with config.unlocked():
        config.consistency.ema_decay = 0.5  # the optimizer's moving average, not the state's
    keys.add(compile_cache.train_step_key(config, tiny_state.replace(consistency=fixmatch), batch, 2))
    assert len(keys) == 1 + len(fixmatch) + 2


@pytest.mark.parametrize("package", ["jax", "jaxlib", "flax", "optax"])
def test_the_executable_key_covers_each_librarys_version_and_the_device_count(
    tiny_state, tiny_config, monkeypatch, package
):
    batch = _fixed_batch(tiny_config)
    key = compile_cache.train_step_key(tiny_config, tiny_state, batch, 2)
    version = compile_cache.importlib.metadata.version
    monkeypatch.setattr(
        compile_cache.importlib.metadata,
        "version",
        lambda name: "0.0.1-other" if name == package else version(name),
    )
    assert compile_cache.train_step_key(tiny_config, tiny_state, batch, 2) != key
    monkeypatch.setattr(compile_cache.importlib.metadata, "version", version)
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert compile_cache.train_step_key(tiny_config, tiny_state, batch, 2) != key


def test_the_sources_digest_reads_every_listed_source(monkeypatch):
    """Each file whose code is traced into the step changes the digest on its own (a loop that stopped
    early, or a file dropped from the list, would keep an edited model's stale executable)."""
    package = pathlib.Path(compile_cache.__file__).parent
    present = [name for name in compile_cache._TRAIN_STEP_SOURCES if (package / name).exists()]
    assert {"models.py", "layers.py", "losses.py", "steps.py", "mean_teacher.py", "fixmatch.py"} <= set(
        present
    )
    digest = compile_cache._sources_digest()
    read_bytes = pathlib.Path.read_bytes
    for name in present:
        monkeypatch.setattr(
            pathlib.Path,
            "read_bytes",
            lambda path, name=name: read_bytes(path) + (b"# edited" if path.name == name else b""),
        )
        assert compile_cache._sources_digest() != digest, name
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    assert compile_cache._sources_digest() == digest


@pytest.mark.parametrize("cache_was_on", [True, False])
def test_a_program_to_store_is_compiled_with_the_persistent_cache_off_and_it_is_restored(
    tiny_state, tmp_path, monkeypatch, cache_was_on
):
    monkeypatch.setattr(compile_cache, "serialize_executable", _FakeSerializer())
    seen = []

    class Recording:
        def lower(self, *args):
            lowered = steps.train_step.lower(*args)
            seen.append(jax.config.jax_enable_compilation_cache)
            return lowered

    monkeypatch.setattr(compile_cache, "train_step", Recording())
    config = _executable_config(tmp_path)
    batch = jax.device_put(_fixed_batch(config))
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", cache_was_on)
    try:
        compile_cache.cached_train_step(config, tiny_state, batch, 2, devices.data_parallel_mesh())
        assert seen == [False] and jax.config.jax_enable_compilation_cache is cache_was_on
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
