"""Times `--mode predict` on a synthetic 300-slice 512x512 NIfTI volume, with its peak memory.

    python -m rdunet_jax.main --config configs/demo.py:tiny --workdir /tmp/rdunet_tiny   # a checkpoint
    python -m experiments.predict_volume_timing --config configs/demo.py:tiny --workdir /tmp/rdunet_tiny

The volume (int16 Hounsfield units, 0.7 x 0.7 x 1.25 mm, a non-identity affine) is written once to
`--scratch` and reused. The prediction runs as the command line runs it, in a child process, so the wall
time includes restoring the checkpoint and compiling (from the persistent cache when warm).
"""

import argparse
import pathlib
import shutil
import sys
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
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", default="configs/demo.py:tiny")
    parser.add_argument("--workdir", required=True, help="a run with a checkpoint")
    parser.add_argument("--scratch", default="/tmp/rdunet_predict_timing")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("overrides", nargs="*", help="extra flags, e.g. --config.eval.batch_size=16")
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
    command = [
        sys.executable,
        "-m",
        "rdunet_jax.main",
        f"--config={args.config}",
        f"--workdir={args.workdir}",
        "--mode=predict",
        f"--input={volume}",
        f"--output={output}",
        *args.overrides,
    ]
    seconds, peak_mb = common.timed_command(command)
    raw_mb = args.slices * args.size * args.size * 4 / 1e6
    print(
        f"predicted {args.slices} slices of {args.size}x{args.size} in {seconds:.1f}s "
        f"({args.slices / seconds:.1f} slices/s); peak RSS {peak_mb:.0f} MB "
        f"(the volume as float32 would be {raw_mb:.0f} MB)"
    )


if __name__ == "__main__":
    main()
