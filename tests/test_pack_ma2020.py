"""experiments.pack_ma2020: a folder packed into parts and unpacked is the same folder, byte for byte."""

import hashlib
import os
import pathlib
import tarfile

import numpy as np
import pytest
from helpers import DATA_ROOT
from PIL import Image

from experiments import pack_ma2020
from rdunet_jax.datasets import builder, layouts, readers


def tree(folder: pathlib.Path) -> dict:
    """{relative path: (bytes digest, size, mtime in ns)} of every file, read independently of the packer."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.md5(path.read_bytes()).hexdigest(),
            path.stat().st_size,
            path.stat().st_mtime_ns,
        )
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def fake_folder(tmp_path):
    """A tiny Ma et al. layout: 4 slices of random 16x16 PNGs, plus a file at the top and an empty one."""
    source = tmp_path / "covid19-ct-seg-2d"
    rng = np.random.default_rng(0)
    for index in range(4):
        for folder, high in (("ct", 256), ("covid", 2), ("lungs", 2)):
            path = source / folder / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, high, (16, 16), dtype=np.uint8) * (255 if high == 2 else 1)
            Image.fromarray(pixels).save(path)
            # Odd sub-second times: the restored times must be exact, not rounded to seconds.
            os.utime(path, ns=(1_700_000_000_123_456_789 + index, 1_700_000_000_123_456_789 + index))
    (source / "README.txt").write_text("notes\n")
    (source / "empty").write_bytes(b"")
    return source


def test_two_parts_unpack_to_the_identical_folder_one_call_at_a_time(fake_folder, tmp_path):
    parts = pack_ma2020.pack(fake_folder, tmp_path / "pack", parts=2)
    assert [part.name for part in parts] == [
        "covid19-ct-seg-2d-part1of2.tar",
        "covid19-ct-seg-2d-part2of2.tar",
    ]
    # Each part holds about half the bytes, and every file is in exactly one part.
    sizes = [sum(member.size for member in tarfile.open(part).getmembers()[1:]) for part in parts]
    total = sum(path.stat().st_size for path in fake_folder.rglob("*") if path.is_file())
    assert sum(sizes) == total and max(sizes) < 0.7 * total

    dest = tmp_path / "dest" / "covid19-ct-seg-2d"
    # Part 1 alone (the first device call) refuses to leave the folder incomplete unless asked to.
    assert pack_ma2020.main(["unpack", "--pack", str(parts[0]), "--dest", str(dest)]) == 2
    assert not dest.exists()
    counts = pack_ma2020.unpack(parts[0], dest, partial=True)
    assert counts["missing_parts"] == [2] and 0 < counts["present"] < counts["files"] == 14
    # Part 2 alone (the second call) completes it: part 1's files are already there.
    counts = pack_ma2020.unpack(parts[1], dest)
    assert counts == {"files": 14, "present": 14, "missing_parts": []}
    assert tree(dest) == tree(fake_folder)
    assert readers.fingerprint(dest) == readers.fingerprint(fake_folder)
    # Unpacking again over a complete folder rewrites nothing and passes.
    assert pack_ma2020.main(["unpack", "--pack", str(tmp_path / "pack"), "--dest", str(dest)]) == 0
    assert tree(dest) == tree(fake_folder)


def test_a_damaged_part_or_a_changed_file_is_refused(fake_folder, tmp_path, capsys):
    (part,) = pack_ma2020.pack(fake_folder, tmp_path / "pack", parts=1)
    data = bytearray(part.read_bytes())
    member = next(m for m in tarfile.open(part).getmembers() if m.name == "ct/0002.png")
    data[member.offset_data + 40] ^= 0xFF  # one byte of one PNG's payload
    damaged = tmp_path / "damaged" / part.name
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    assert pack_ma2020.main(["unpack", "--pack", str(damaged), "--dest", str(dest)]) == 2
    assert "ct/0002.png does not match its checksum" in capsys.readouterr().err
    assert not (dest / "ct" / "0002.png").exists()

    pack_ma2020.unpack(part, dest)
    (dest / "lungs" / "0001.png").write_bytes(b"not the packed file")
    assert pack_ma2020.main(["unpack", "--pack", str(part), "--dest", str(dest), "--partial"]) == 0
    assert tree(dest) == tree(fake_folder)  # the intact part repairs the changed file
    (dest / "lungs" / "0001.png").write_bytes(b"changed after unpacking")
    with pytest.raises(pack_ma2020.PackError, match="lungs/0001.png: differs"):
        pack_ma2020._check_folder(pack_ma2020.read_manifest(tarfile.open(part), part), dest, partial=False)


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert pack_ma2020.main(["pack", "--source", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert pack_ma2020.main(["unpack", "--pack", str(tmp_path), "--dest", str(tmp_path / "d")]) == 2
    not_a_part = tmp_path / "x-part1of1.tar"
    with tarfile.open(not_a_part, "w") as archive:
        archive.add(__file__, arcname="other.py")
    assert pack_ma2020.main(["unpack", "--pack", str(not_a_part), "--dest", str(tmp_path / "d")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert (
        "not a folder" in errors[0]
        and "no *-partNofM.tar" in errors[1]
        and "not a part written by pack" in errors[2]
    )


@pytest.mark.real_data
def test_real_slices_read_the_same_after_a_round_trip(tmp_path):
    source = DATA_ROOT / "covid19-ct-seg-2d"
    if not source.is_dir():
        pytest.fail(f"{source} is missing: the real data sits beside the repository (or RDUNET_DATA_ROOT)")
    copy = tmp_path / "covid19-ct-seg-2d"
    for folder in ("ct", "covid", "lungs"):
        (copy / folder).mkdir(parents=True)
        for name in ("0000.png", "0800.png", "1613.png"):
            (copy / folder / name).write_bytes((source / folder / name).read_bytes())
    dest = tmp_path / "dest" / "covid19-ct-seg-2d"
    for part in pack_ma2020.pack(copy, tmp_path / "pack", parts=2):
        pack_ma2020.unpack(part, dest, partial=True)
    assert tree(dest) == tree(copy)
    # What the dataset builder reads from each slice: identical arrays, against the original files.
    chosen = ("0000", "0800", "1613")
    originals = [files for files in layouts.ma2020_files(source) if files.example_id in chosen]
    for original, restored in zip(originals, layouts.ma2020_files(dest), strict=True):
        _, expected = builder._read_ma2020(original)
        _, actual = builder._read_ma2020(restored)
        for key in ("image", "mask", "lung_mask"):
            np.testing.assert_array_equal(actual[key], expected[key])
        assert actual["id"] == expected["id"]
