"""Prediction's inputs and outputs: which files an --input names, where each one's outputs go, and the
checks on the output folder made before anything is written (predict.py)."""

import os
import pathlib
import shutil

from rdunet_jax import files, volumes
from rdunet_jax.datasets.layouts import IMAGE_SUFFIXES
from rdunet_jax.errors import UserError


def stem(path: pathlib.Path) -> str:
    """The file name without its (possibly double) suffix: `case.nii.gz` -> `case`; a folder's name."""
    if path.is_dir():
        return path.resolve().name  # '.' and '..' have no name of their own
    name = path.name
    for suffix in (*volumes.NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def check_output_outside_input(input_path: pathlib.Path, output_dir: pathlib.Path, inputs: list) -> None:
    """UserError when the outputs would land among the inputs: a rerun would segment its own masks and
    overlays (the folder of a DICOM series is read at any depth, so not inside it either)."""
    if not input_path.is_dir():
        return
    folder, output = input_path.resolve(), output_dir.resolve()
    is_series = inputs == [input_path]
    if output == folder or (is_series and folder in output.parents):
        where = "inside the input folder" if output != folder else "the input folder"
        raise UserError(
            f"--output: {output_dir} is {where} {input_path}; a rerun would read the outputs as inputs: "
            "give another folder"
        )


def list_inputs(input_path) -> list[pathlib.Path]:
    """The files to segment: `input_path` itself, or the NIfTI and image files of a folder (sorted; hidden
    files skipped)."""
    input_path = pathlib.Path(input_path)
    if input_path.is_dir():
        from rdunet_jax import dicom

        # Hidden files, as the DICOM scan skips them: macOS writes `._a.png` beside `a.png` on FAT drives
        # and in zip files, resource data that is no image.
        entries = sorted(
            path for path in input_path.iterdir() if path.is_file() and not path.name.startswith(".")
        )
        inputs = [path for path in entries if volumes.input_kind(path)]
        if inputs:
            # A scanner's export often puts a preview image beside the series: which one is meant is unclear.
            # A DICOMDIR, the index of a medium, holds no image.
            series = next(
                (
                    path
                    for path in entries
                    if path not in inputs and path.name.upper() != "DICOMDIR" and dicom.dicom_file(path)
                ),
                None,
            )
            if series is not None:
                raise UserError(
                    f"--input: {input_path} holds DICOM files ({series.name}) beside NIfTI/PNG/JPEG files "
                    f"({inputs[0].name}); give a folder of the DICOM series alone, or of the other files "
                    "alone"
                )
            return inputs
        if dicom.dicom_files(input_path):
            return [input_path]
        raise UserError(f"--input: {input_path} holds no .nii, .nii.gz, .png, .jpg, .jpeg or DICOM file")
    if not input_path.exists():
        raise UserError(f"--input: {input_path} does not exist")
    if volumes.input_kind(input_path) is None:
        raise UserError(f"--input: {input_path} is not a .nii, .nii.gz, .png, .jpg or .jpeg file or a folder")
    return [input_path]


def output_paths(input_file: pathlib.Path, output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Where the outputs of one input go."""
    name = stem(input_file)
    if volumes.input_kind(input_file) in ("nifti", "dicom"):
        suffix = ".nii" if input_file.name.lower().endswith(".nii") else ".nii.gz"
        outputs = {
            "mask": output_dir / f"{name}_mask{suffix}",
            "summary": output_dir / f"{name}_summary.json",
            "overlays": output_dir / f"{name}_overlays",
        }
        if volumes.input_kind(input_file) == "dicom":
            outputs["segmentation"] = output_dir / f"{name}_seg.dcm"
        return outputs
    return {"mask": output_dir / f"{name}_mask.png", "overlay": output_dir / f"{name}_overlay.png"}


def check_output_folder(output_dir: pathlib.Path) -> None:
    """Refuses an `output_dir` that is, or lies below, something other than a folder."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--output: {folder} exists and is not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"--output: cannot write in {folder}")
            return


def make_output_folder(output_dir: pathlib.Path) -> None:
    """Makes `output_dir`; UserError when the file system refuses (a folder such as /proc that the
    permission check passes for root, a name too long)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--output: cannot make {output_dir} ({error.strerror})") from None


def missing_folders(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """The folders from `output_dir` up that do not exist yet (deepest first): those prediction creates."""
    missing = []
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_outputs(outputs: dict) -> None:
    """Removes the outputs of one input that exist (files, and the overlays folder with its contents), as
    many as will go."""
    # Called while the run's own error propagates: a file that will not go must neither hide that error
    # nor keep the outputs after it.
    for path in outputs.values():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def remove_empty_folders(folders: list[pathlib.Path]) -> None:
    """Removes the `folders` (deepest first) that are empty, stopping at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def check_outputs_free(inputs, output_dir: pathlib.Path, overwrite: bool) -> None:
    """Refuses, before any work, when an output exists (unless `overwrite`) or two inputs share one."""
    seen = {}
    for input_file in inputs:
        for key, path in output_paths(input_file, output_dir).items():
            if len(path.name.encode()) > files.MAX_NAME_BYTES:
                raise UserError(
                    f"--input: {input_file}: its output {path.name[:40]}... would have a name of "
                    f"{len(path.name.encode())} bytes, over the {files.MAX_NAME_BYTES} a file can have here; "
                    "rename the input"
                )
            if path in seen:
                raise UserError(f"--input: {input_file} and {seen[path]} would both write {path}")
            seen[path] = input_file
            if (path.exists() or path.is_symlink()) and not overwrite:  # a link to nothing is there too
                raise UserError(f"--output: {path} exists; pass --overwrite to replace it")
            if path.exists() and path.is_dir() != (key == "overlays"):
                # --overwrite replaces outputs, not entries of another kind under their names.
                kind = "a folder" if path.is_dir() else "a file"
                raise UserError(
                    f"--output: {path} is {kind}, not the output prediction writes there; move it"
                )


def ground_truth_for(input_file: pathlib.Path, ground_truth, single_input: bool) -> pathlib.Path | None:
    """The expert mask of `input_file`: the `ground_truth` file itself for one input, else the file of
    the same name in the `ground_truth` folder, or else the one of the same stem in another format (None
    when absent)."""
    if ground_truth is None:
        return None
    ground_truth = pathlib.Path(ground_truth)
    if volumes.input_kind(input_file) == "dicom" and (
        not single_input or volumes.input_kind(ground_truth) != "nifti"
    ):
        raise UserError(
            f"--ground_truth: a DICOM series ({input_file}) takes one NIfTI mask in the series' geometry "
            f"(that of the mask prediction writes for it), not {ground_truth}"
        )
    if ground_truth.is_dir():
        candidate = ground_truth / input_file.name
        if candidate.exists():
            return candidate
        # Masks are often stored in another format than their slices (COVID-SemiSeg: Imgs/N.jpg, GT/N.png).
        same_stem = sorted(
            path
            for path in ground_truth.iterdir()
            if path.is_file() and volumes.input_kind(path) and stem(path) == stem(input_file)
        )
        if len(same_stem) > 1:
            names = ", ".join(path.name for path in same_stem)
            raise UserError(
                f"--ground_truth: {names} in {ground_truth} all match {input_file.name}; keep one"
            )
        return same_stem[0] if same_stem else None
    if not single_input:
        raise UserError(f"--ground_truth: {ground_truth} must be a folder when --input is a folder")
    if not ground_truth.exists():
        raise UserError(f"--ground_truth: {ground_truth} does not exist")
    return ground_truth
