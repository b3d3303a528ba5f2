"""The TFDS builder for every dataset this project trains on: `semiseg`, `ma2020_2d`, `nifti`, `synthetic`.

It works without TensorFlow: examples are written as array_record files with `Tensor` features and read
back with `as_data_source`. A build runs in a TFDS `incomplete.*` folder that is renamed only when every
split was written, so a failed build (a corrupt file, a missing mask) leaves nothing that loads as
complete. The builder config's name carries a hash of the manual directory's fingerprint (file list,
sizes, modification times), of the split options and (for `nifti`) of the in-plane orientation the
volumes are turned to, so changed data or options build a new cache instead of silently reusing a
stale one.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format

from rdunet_jax import files, orientation
from rdunet_jax.datasets import labels as class_labels
from rdunet_jax.datasets import layouts, readers, synthetic
from rdunet_jax.errors import UserError

DATASETS = ("synthetic", "semiseg", "ma2020_2d", "nifti")
SEMISEG_SPLITS = ("train", "validation", "train_full", "test", "unlabelled")
# The split of slices without expert masks (semiseg's pool; the phantom's with data.num_unlabelled > 0):
# its records hold all-zero `mask` and `class_mask` placeholders, read through `load_source` as images.
UNLABELLED_SPLIT = "unlabelled"


@dataclasses.dataclass(eq=False)
class CovidCtConfig(tfds.core.BuilderConfig):
    """One dataset, its manual directory and split options; `name` is `<dataset>-<cache key>`."""

    dataset: str = "synthetic"
    manual_dir: str = ""
    split_scheme: str = "random"
    split_fractions: tuple = (0.6, 0.2, 0.2)
    split_seed: int = 0
    synthetic_sizes: tuple = (160, 32, 32)
    synthetic_image_size: int = 256
    synthetic_unlabelled: int = 0
    orientation: str = orientation.VOXEL_ORDER
    # nifti label maps with data.classes (multi-class heads): values 0..num_classes; 0 keeps the default
    # labels (readers.NIFTI_LABELS), so binary datasets keep their cache key.
    num_classes: int = 0


def _image_tensor(dtype=np.uint8):
    """A 2-D slice of any size. TFDS needs an encoding for two unknown dimensions; raw bytes, because
    array_record compresses its records itself and zlib on top only doubled the build time."""
    return tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding="bytes")


def _string():
    return tfds.features.Tensor(shape=(), dtype=np.str_)


def features_for(dataset: str) -> tfds.features.FeaturesDict:
    """The features of one dataset: image, binary lesion mask and id, plus what the source adds."""
    features = {"image": _image_tensor(), "mask": _image_tensor(), "id": _string()}
    if dataset in ("semiseg", "synthetic"):
        features["class_mask"] = _image_tensor()
    if dataset == "ma2020_2d":
        features["lung_mask"] = _image_tensor()
        features["index"] = tfds.features.Tensor(shape=(), dtype=np.int32)
    if dataset == "nifti":
        features.update(
            image=_image_tensor(np.float32),  # Hounsfield units, windowed later by the input pipeline
            class_mask=_image_tensor(),
            case_id=_string(),
            slice_index=tfds.features.Tensor(shape=(), dtype=np.int32),
            spacing=tfds.features.Tensor(shape=(3,), dtype=np.float32),
            affine=tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            volume_shape=tfds.features.Tensor(shape=(3,), dtype=np.int32),
        )
    return tfds.features.FeaturesDict(features)


class CovidCtSlices(tfds.core.GeneratorBasedBuilder):
    """COVID-19 CT slices with lesion masks, from a manual directory (or generated: `synthetic`)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "semiseg, ma2020_2d, nifti and synthetic configs.",
        "1.1.0": "nifti: the slices of a stack of unrelated slices (MedSeg's tr_im) have no case_id ('').",
    }
    BUILDER_CONFIGS = [CovidCtConfig(name=dataset, dataset=dataset) for dataset in DATASETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
        f"{dataset}: {layout}" for dataset, layout in layouts.EXPECTED_LAYOUT.items()
    )

    def _info(self) -> tfds.core.DatasetInfo:
        """Features of the selected dataset; records keep generation order (file order)."""
        return self.dataset_info_from_configs(
            features=features_for(self.builder_config.dataset),
            description=__doc__,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        """The split generators of the selected dataset."""
        config = self.builder_config
        if config.dataset == "synthetic":
            sizes = dict(zip(("train", "validation", "test"), config.synthetic_sizes, strict=True))
            generators = {split: self._generate_synthetic(split, count) for split, count in sizes.items()}
            if config.synthetic_unlabelled:
                generators[UNLABELLED_SPLIT] = self._generate_unlabelled_synthetic(
                    config.synthetic_unlabelled
                )
            return generators
        manual_dir = pathlib.Path(config.manual_dir)
        if config.dataset == "semiseg":
            generators = {
                split: self._generate_semiseg(files)
                for split, files in layouts.semiseg_splits(manual_dir).items()
            }
            unlabelled = layouts.semiseg_unlabelled_files(manual_dir)
            if unlabelled is not None:
                generators[UNLABELLED_SPLIT] = _map_in_order(_read_unlabelled, unlabelled)
            return generators
        if config.dataset == "ma2020_2d":
            files = layouts.ma2020_files(manual_dir)
            splits = layouts.assign_splits(
                files, config.split_scheme, config.split_fractions, config.split_seed
            )
            _require_nonempty(splits, f"{len(files)} slices")
            return {split: self._generate_ma2020(split_files) for split, split_files in splits.items()}
        if config.dataset == "nifti":
            return _nifti_split_generators(layouts.nifti_cases(manual_dir), config)
        raise UserError(f"data.name: unknown dataset {config.dataset!r}; choose one of {list(DATASETS)}")

    def _generate_examples(self, examples):
        """Unused: each split passes its own generator (TFDS requires the method to exist)."""
        yield from examples

    def _generate_synthetic(self, split, count):
        """Synthetic slices, identical to `synthetic.SyntheticSource`."""
        source = synthetic.SyntheticSource(split, count, self.builder_config.synthetic_image_size)
        for index in range(count):
            record = source[index]
            yield record["id"], record

    def _generate_unlabelled_synthetic(self, count):
        """Phantom slices of their own seeds, their masks zeroed: the phantom's unlabelled pool."""
        source = synthetic.SyntheticSource(UNLABELLED_SPLIT, count, self.builder_config.synthetic_image_size)
        for index in range(count):
            record = source[index]
            yield record["id"], _without_labels(record["image"], record["id"])

    def _generate_semiseg(self, files_list):
        """COVID-SemiSeg slices, read a few at a time in parallel."""
        yield from _map_in_order(_read_semiseg, files_list)

    def _generate_ma2020(self, files_list):
        """Ma et al.'s 2-D slices, read a few at a time in parallel."""
        yield from _map_in_order(_read_ma2020, files_list)


def _map_in_order(read, items, window: int = 32):
    """Yields `read(item)` for each item in order, computed on a few threads: PIL's decoders release
    the GIL, so reading overlaps with TFDS serialising the previous examples."""
    workers = min(4, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read_semiseg(files) -> tuple[str, dict]:
    """One COVID-SemiSeg slice: JPEG image, {0,255} lesion mask, palette class mask {0,1,2}."""
    image = readers.read_grayscale_image(files.image)
    mask = readers.read_binary_mask(files.mask)
    readers.check_same_size(image, mask, files.image, files.mask)
    class_mask = readers.read_label_image(files.extra_mask, readers.SEMISEG_CLASS_LABELS)
    readers.check_same_size(image, class_mask, files.image, files.extra_mask)
    return files.example_id, {"image": image, "mask": mask, "class_mask": class_mask, "id": files.example_id}


def _without_labels(image: np.ndarray, example_id: str) -> dict:
    """An unlabelled record: the image, all-zero mask placeholders (the features every split shares)."""
    zeros = np.zeros_like(image, np.uint8)
    return {"image": image, "mask": zeros, "class_mask": zeros, "id": example_id}


def _read_unlabelled(path: pathlib.Path) -> tuple[str, dict]:
    """One slice of the unlabelled pool: its image only; the id is the file name (which names the volume)."""
    return path.stem, _without_labels(readers.read_grayscale_image(path), path.stem)


def _read_ma2020(files) -> tuple[str, dict]:
    """One slice of Ma et al.'s 2-D data: CT image, infection mask and lung mask."""
    image = readers.read_grayscale_image(files.image)
    mask = readers.read_binary_mask(files.mask)
    readers.check_same_size(image, mask, files.image, files.mask)
    lung_mask = readers.read_binary_mask(files.extra_mask)
    readers.check_same_size(image, lung_mask, files.image, files.extra_mask)
    index = int(files.example_id) if files.example_id.isdigit() else -1
    return files.example_id, {
        "image": image,
        "mask": mask,
        "lung_mask": lung_mask,
        "id": files.example_id,
        "index": index,
    }


def _require_nonempty(splits: dict, what: str) -> None:
    """Every split must hold an example: the training loop needs train and validation."""
    empty = [split for split, units in splits.items() if not units]
    if empty:
        raise UserError(f"data.split_fractions: {what} leave split(s) {empty} empty; at least 3 are needed")


def _nifti_split_generators(cases, config) -> dict:
    """Splits NIfTI data by case (slice by slice only for stacks of unrelated slices)."""
    units = []
    for case in cases:
        if case.independent_slices:
            count = _nifti_slice_count(case.image)
            units += [(case, index) for index in range(count)]
        else:
            units.append((case, None))
    splits = layouts.assign_splits(units, config.split_scheme, config.split_fractions, config.split_seed)
    _require_nonempty(splits, f"{len(units)} cases")
    return {
        split: _generate_nifti(split_units, config.orientation, _nifti_labels(config))
        for split, split_units in splits.items()
    }


def _nifti_labels(config) -> tuple[int, ...]:
    """The label values a nifti mask may hold: 0..K for K configured classes, else the default ones."""
    return tuple(range(config.num_classes + 1)) if config.num_classes else readers.NIFTI_LABELS


def _nifti_slice_count(path) -> int:
    """The number of slices of a volume, from its header alone."""
    import nibabel

    try:
        shape = nibabel.load(path).shape
    except Exception as error:  # nibabel raises many types for non-NIfTI files
        raise UserError(
            f"{path}: corrupt or unreadable NIfTI file ({type(error).__name__}: {error})"
        ) from None
    if len(shape) != 3:
        raise UserError(f"{path}: expected a 3-D volume (x, y, slices), got an array of shape {shape}")
    return shape[2]


def _generate_nifti(units, model_orientation: str, label_values=readers.NIFTI_LABELS):
    """Axial slices of NIfTI volumes turned to `model_orientation` (as prediction turns them), with HU,
    and the spacing, affine, slice index and shape of the turned volume."""
    loaded_case, volumes = None, None
    for case, only_slice in units:
        if case is not loaded_case:  # units of one case are adjacent: read each volume once per split
            loaded_case, volumes = case, _read_nifti_case(case, model_orientation, label_values)
        image, labels, affine, spacing = volumes
        indices = range(image.shape[2]) if only_slice is None else (only_slice,)
        for index in indices:
            example_id = f"{case.case_id}-{index:04d}"
            class_mask = np.ascontiguousarray(labels[:, :, index])
            yield (
                example_id,
                {
                    "image": np.ascontiguousarray(image[:, :, index]),
                    "mask": np.isin(class_mask, readers.NIFTI_LESION_LABELS).astype(np.uint8),
                    "class_mask": class_mask,
                    "id": example_id,
                    # Unrelated slices are no volume: evaluation must not stack them into one.
                    "case_id": "" if case.independent_slices else case.case_id,
                    "slice_index": index,
                    "spacing": np.asarray(spacing, np.float32),
                    "affine": affine,
                    "volume_shape": np.asarray(image.shape, np.int32),
                },
            )


def _read_nifti_case(case, model_orientation: str, label_values=readers.NIFTI_LABELS):
    """Image (float32 HU) and label volumes of a case, checked to share shape and affine, turned from
    their affine to `model_orientation` (slices along the axis nearest superior-inferior), with the
    turned volume's affine and spacing."""
    image, image_affine, spacing = readers.read_nifti(case.image)
    mask, mask_affine, _ = readers.read_nifti(case.mask)
    readers.check_nifti_pair(case.image, image, image_affine, case.mask, mask, mask_affine)
    labels = readers.nifti_label_volume(mask, case.mask, label_values)
    layout = orientation.volume_layout(image_affine, model_orientation)
    if case.independent_slices and not layout.per_slice:
        # Unrelated slices stacked along the third axis cannot be resliced along another.
        raise UserError(
            f"{case.image}: a stack of unrelated slices whose affine puts superior-inferior on another "
            f"axis than the third; set data.orientation='voxel' to read it in voxel order"
        )
    return (
        orientation.turn(image, layout.to_model),
        orientation.turn(labels, layout.to_model),
        layout.affine_in_model(image_affine, image.shape),
        layout.spacing_in_model(spacing),
    )


def cache_options(data_config) -> dict:
    """What a prepared dataset depends on: the manual directory's fingerprint and the split options."""
    name = data_config.name
    if name == "synthetic":
        sizes = [data_config.num_train, data_config.num_validation, data_config.num_test]
        options = {"dataset": name, "synthetic_sizes": sizes, "synthetic_image_size": data_config.image_size}
        # Keyed only when used, so phantoms without an unlabelled pool keep their prepared caches.
        if data_config.get("num_unlabelled"):
            options["synthetic_unlabelled"] = data_config.num_unlabelled
        return options
    if name not in DATASETS:
        raise UserError(f"data.name: unknown dataset {name!r}; choose one of {list(DATASETS)}")
    manual_dir = layouts.check_manual_dir(name, data_config.manual_dir)
    options = {
        "dataset": name,
        "manual_dir": str(manual_dir.resolve()),
        "fingerprint": readers.fingerprint(manual_dir, skipped=[data_config.data_dir]),
    }
    if name == "semiseg":
        # Caches built before the unlabelled split existed lack it: a new key rebuilds them once.
        options["unlabelled_split"] = 1
    if name == "nifti":
        # The turned slices are what is prepared: another orientation is another dataset.
        options["orientation"] = orientation.model_orientation(data_config)
    if name == "nifti" and tuple(data_config.get("classes", ())) not in ((), class_labels.BINARY_CLASSES):
        # Label maps are checked against the configured classes when prepared: another set, another dataset.
        options["num_classes"] = len(data_config.classes)
    if name in ("ma2020_2d", "nifti"):
        options.update(
            split_scheme=data_config.split_scheme,
            split_fractions=[float(value) for value in data_config.split_fractions],
            split_seed=data_config.split_seed,
        )
    return options


def builder_config(data_config) -> CovidCtConfig:
    """The builder config of `data_config`, named `<dataset>-<hash of its cache options>`."""
    options = cache_options(data_config)
    # The folder's own location is not part of the key: a copy with the same files reuses the cache.
    # The builder's version and feature schema are: a cache written by older code is never misread.
    keyed = {key: value for key, value in options.items() if key != "manual_dir"}
    keyed.update(version=str(CovidCtSlices.VERSION), schema=_schema_digest(options["dataset"]))
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    fields.pop("fingerprint", None)
    fields.pop("unlabelled_split", None)
    return CovidCtConfig(
        name=f"{options['dataset']}-{digest}",
        description=json.dumps(options, sort_keys=True),
        **fields,
    )


def _schema_digest(dataset: str) -> str:
    """A hash of the dataset's feature specification (shapes, dtypes, encodings)."""
    schema = json_format.MessageToJson(features_for(dataset).to_proto(), sort_keys=True)
    return hashlib.sha256(schema.encode()).hexdigest()[:12]


def prepare(data_config) -> CovidCtSlices:
    """The builder of `data_config`, its dataset built into `data.data_dir` unless already there."""
    config = builder_config(data_config)
    data_dir = pathlib.Path(data_config.data_dir).expanduser() if data_config.data_dir else None
    if data_dir is not None:
        files.existing_folder(data_dir, "data.data_dir")
    builder = CovidCtSlices(config=config, data_dir=data_config.data_dir or None, file_format="array_record")
    if builder.data_path.exists():
        return builder  # a prepared dataset is read, even from a folder this user cannot write
    if data_dir is not None:
        files.check_writable(data_dir, "data.data_dir")
    tfds.disable_progress_bar()
    print(f"preparing dataset {config.name} in {builder.data_path}", flush=True)
    try:
        # No download config: the split generators read `config.manual_dir` themselves, and the builder
        # already holds the file format.
        builder.download_and_prepare()
    except OSError:
        # Another process may have finished the same build first (its rename won): reuse its result.
        if builder.data_path.exists():
            return builder
        raise
    except BaseException:
        _remove_if_empty(builder.data_path.parent)
        raise
    return builder


def _remove_if_empty(folder) -> None:
    """Removes the config folder a failed build left behind empty (TFDS already removed its contents)."""
    folder = pathlib.Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
