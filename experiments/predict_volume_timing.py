"""Times `--mode predict` on a synthetic 300-slice 512x512 NIfTI volume, with its peak memory.

    python -m rdunet_jax.main --config configs/demo.py:tiny --workdir /tmp/rdunet_tiny   # a checkpoint
    python -m experiments.predict_volume_timing --config configs/demo.py:tiny --workdir /tmp/rdunet_tiny

The volume (int16 Hounsfield units, 0.7 x 0.7 x 1.25 mm, a non-identity affine) is written once to
`--scratch` and reused. The prediction runs as the command line runs it, in a child process, so the wall
time includes restoring the checkpoint and compiling (from the persistent cache when warm).
"""

import pathlib
import shutil
import time

import numpy as np

from experiments import common


def write_volume(path: pathlib.Path, slices: int, size: int) -> None:
    """The phantom as a NIfTI volume (0.7 x 0.7 x 1.25 mm, a non-identity affine)."""
    import nibabel

    volume = np.empty((size, size, slices), np.int16)
    for index, image in enumerate(common.phantom_slices(slices, size)):
        volume[:, :, index] = image
    affine = np.diag([-0.7, -0.7, 1.25, 1.0])
    affine[:3, 3] = (180.0, 170.0, -400.0)
    nibabel.save(nibabel.Nifti1Image(volume, affine), path)


def main() -> None:
    parser = common.prediction_timing_parser(__doc__, "configs/demo.py:tiny", "a run with a checkpoint")
    parser.add_argument("--scratch", default="/tmp/rdunet_predict_timing")
    args = parser.parse_args()

    scratch = pathlib.Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    volume = scratch / f"volume_{args.slices}x{args.size}.nii.gz"
    if not volume.exists():
        started = time.perf_counter()
        write_volume(volume, args.slices, args.size)
        megabytes = volume.stat().st_size / 1e6
        print(f"wrote {volume} ({megabytes:.0f} MB) in {time.perf_counter() - started:.1f}s")
    output = scratch / "prediction"
    shutil.rmtree(output, ignore_errors=True)
    common.timed_prediction(
        args, args.workdir, volume, output, f"predicted {args.slices} slices of {args.size}x{args.size}"
    )


if __name__ == "__main__":
    main()
