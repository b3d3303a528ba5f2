"""Times `--mode predict` end to end on a synthetic DICOM CT series (300 slices of 512x512 by default):
reading the series, segmenting it with the paper-width model, writing the DICOM SEG and the NIfTI mask.

    python -m experiments.dicom_series_timing --workdir /tmp/rdunet_paper_init

The series is written with pydicom into a temporary folder (`common.phantom_slices`, as in
predict_volume_timing.py: uint16 stored values, RescaleIntercept -1024 so the values are Hounsfield
units; axial, 0.7 x 0.7 mm, 1.25 mm apart; files named in a shuffled order). The model is `--config`
(default configs/rdunet.py, the paper's RDU-Net at 256x256); when `--workdir` has no checkpoint, its
freshly initialised state is saved there as one (the weights do not change the amount of computation).
The prediction runs as the command line, in a child process under `/usr/bin/time -v` where that exists:
the wall time includes starting Python, restoring the checkpoint and compiling (from the persistent cache
when warm), and the peak memory is the child's maximum resident set size. Needs the `dicom` extra.
"""

import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from experiments import common

RESCALE_INTERCEPT = -1024
PIXEL_SPACING_MM = 0.7
SLICE_STEP_MM = 1.25


def write_series(folder: pathlib.Path, slices: int, size: int) -> None:
    """The phantom as a single-frame CT series (explicit VR little endian), one file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    file_names = np.random.default_rng(1).permutation(slices)  # file order says nothing of position
    for index, hounsfield in enumerate(common.phantom_slices(slices, size)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        data = Dataset()
        data.file_meta = meta
        data.SOPClassUID, data.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        data.Modality, data.Manufacturer = "CT", "phantom"
        data.PatientName, data.PatientID, data.PatientBirthDate, data.PatientSex = (
            "Timing^Phantom",
            "T1",
            "",
            "O",
        )
        data.StudyInstanceUID, data.SeriesInstanceUID, data.FrameOfReferenceUID = study, series, frame
        data.StudyID, data.StudyDate, data.StudyTime, data.AccessionNumber = "1", "20200101", "120000", ""
        data.ReferringPhysicianName, data.SeriesNumber, data.InstanceNumber = "", 1, index + 1
        data.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        data.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        data.ImagePositionPatient = [-180.0, -170.0, -400.0 + SLICE_STEP_MM * index]
        data.PixelSpacing, data.SliceThickness = [PIXEL_SPACING_MM] * 2, SLICE_STEP_MM
        data.Rows, data.Columns = hounsfield.shape
        data.SamplesPerPixel, data.PhotometricInterpretation = 1, "MONOCHROME2"
        data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 16, 16, 15, 0
        data.RescaleIntercept, data.RescaleSlope, data.RescaleType = RESCALE_INTERCEPT, 1, "HU"
        data.PixelData = (hounsfield.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16).tobytes()
        data.save_as(folder / f"im{file_names[index]:04d}.dcm", enforce_file_format=True)


def ensure_checkpoint(config_spec: str, workdir: pathlib.Path) -> None:
    """Saves the freshly initialised state of `config_spec`'s model as the `best` checkpoint of `workdir`,
    unless `workdir` already has checkpoints."""
    if (workdir / "checkpoints").is_dir():
        return
    from rdunet_jax import checkpoints, config_validation, models, steps, train

    config = common.load_config(config_spec)
    config_validation.validate(config)
    state = steps.create_train_state(config, models.build_model(config.model), steps_per_epoch=1)
    run_checkpoints = checkpoints.RunCheckpoints(workdir / "checkpoints")
    run_checkpoints.save("best", 0, state, train.new_meta(config))
    run_checkpoints.wait()
    run_checkpoints.close()
    print(f"saved the initialised {config.model.variant} state as a checkpoint in {workdir}", flush=True)


def main() -> None:
    workdir_help = "a run with a checkpoint, or where to save one"
    parser = common.prediction_timing_parser(__doc__, "configs/rdunet.py", workdir_help)
    parser.add_argument("--scratch", default=None, help="where the temporary series folder goes")
    args = parser.parse_args()

    workdir = pathlib.Path(args.workdir).resolve()
    os.chdir(common.REPO_ROOT)  # this checkout's rdunet_jax in the child, config paths as given
    ensure_checkpoint(args.config, workdir)
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="rdunet_dicom_timing_") as scratch:
        series = pathlib.Path(scratch) / "series"
        series.mkdir()
        started = time.perf_counter()
        write_series(series, args.slices, args.size)
        megabytes = sum(path.stat().st_size for path in series.iterdir()) / 1e6
        print(f"wrote {args.slices} DICOM files ({megabytes:.0f} MB) in {time.perf_counter() - started:.1f}s")
        output = pathlib.Path(scratch) / "prediction"
        time_command = ["/usr/bin/time", "-v"] if shutil.which("/usr/bin/time") else []
        what = f"DICOM series of {args.slices} slices of {args.size}x{args.size} -> SEG and NIfTI"
        common.timed_prediction(args, workdir, series, output, what, prefix=time_command)
        written = {path.name: path.stat().st_size / 1e6 for path in output.iterdir() if path.is_file()}
    print(f"outputs (MB): {', '.join(f'{name} {size:.1f}' for name, size in sorted(written.items()))}")


if __name__ == "__main__":
    main()
