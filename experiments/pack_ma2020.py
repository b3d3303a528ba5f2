"""Packs a dataset folder into tar parts that fit the GPU machine's transfer limit, and unpacks them there.

    python -m experiments.pack_ma2020 pack --source ../shared/data/covid19-ct-seg-2d --out .gpu_data/ma2020
    python -m experiments.pack_ma2020 unpack --pack .gpu_data/ma2020 --dest .gpu_data/covid19-ct-seg-2d

The device tool carries at most 64 MiB a call, and Ma et al.'s slices are 84 MiB of PNGs that no lossless
codec here shrinks below the limit (lzma over the decoded CT pixels: 79.2 MB; WebP lossless: 0.95 of the
PNGs), so the files travel as they are, in parts of balanced size, over two calls to one warm machine.
Each part is an uncompressed tar of whole files (their bytes and modification times, so the dataset
builder's fingerprint and hence its cache name are the original's) whose first member, MANIFEST.json,
lists every file of every part with its size and SHA-256. `unpack` extracts the parts it finds, checks
each file it writes against the manifest, then checks the whole folder: it exits 0 only when every file
of the manifest is there with its checksum (`--partial` accepts a folder still missing whole parts).
"""

import argparse
import hashlib
import io
import json
import os
import pathlib
import sys
import tarfile

MANIFEST = "MANIFEST.json"
PART_PATTERN = "{name}-part{index}of{count}.tar"


class PackError(Exception):
    """A problem the user can fix: a missing folder, a damaged or foreign part, a file that differs."""


def sha256_of(path: pathlib.Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(source: pathlib.Path) -> list[dict]:
    """Every regular file under `source`, in sorted relative-path order, with size, mtime and SHA-256."""
    if not source.is_dir():
        raise PackError(f"--source: {source} is not a folder")
    entries = []
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        entries.append(
            {
                "path": path.relative_to(source).as_posix(),
                "size": stat.st_size,
                "mtime": stat.st_mtime_ns,
                "sha256": sha256_of(path),
            }
        )
    if not entries:
        raise PackError(f"--source: {source} holds no files")
    return entries


def assign_parts(entries: list[dict], parts: int) -> None:
    """Numbers each entry's part (1..parts) so that the parts hold about equal bytes, in file order."""
    total = sum(entry["size"] for entry in entries)
    cumulative = 0
    for entry in entries:
        # The part whose share of the bytes this file's middle falls in.
        middle = cumulative + entry["size"] / 2
        entry["part"] = min(parts, int(middle * parts / total) + 1) if total else 1
        cumulative += entry["size"]


def pack(source: pathlib.Path, out: pathlib.Path, parts: int) -> list[pathlib.Path]:
    """Writes `parts` tar files of `source`'s files into `out`; returns their paths."""
    if parts < 1:
        raise PackError(f"--parts {parts}: must be at least 1")
    entries = list_files(source)
    assign_parts(entries, parts)
    manifest = {"name": source.name, "parts": parts, "files": entries}
    manifest_bytes = json.dumps(manifest, indent=0, sort_keys=True).encode()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(1, parts + 1):
        path = out / PART_PATTERN.format(name=source.name, index=index, count=parts)
        temporary = path.with_name(path.name + ".tmp")
        with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(manifest_bytes), 0o644
            archive.addfile(info, io.BytesIO(manifest_bytes))
            for entry in entries:
                if entry["part"] != index:
                    continue
                info = tarfile.TarInfo(entry["path"])
                # Whole seconds in the tar (a PAX header per file would add 8 MB); unpack sets the exact time.
                info.size, info.mode, info.mtime = entry["size"], 0o644, entry["mtime"] // 10**9
                with open(source / entry["path"], "rb") as file:
                    archive.addfile(info, file)
        os.replace(temporary, path)
        written.append(path)
    return written


def read_manifest(archive: tarfile.TarFile, path: pathlib.Path) -> dict:
    """The manifest that leads a part."""
    first = archive.next()
    if first is None or first.name != MANIFEST:
        raise PackError(f"{path}: not a part written by pack (no {MANIFEST} first)")
    try:
        return json.loads(archive.extractfile(first).read())
    except (json.JSONDecodeError, AttributeError):
        raise PackError(f"{path}: damaged {MANIFEST}") from None


def find_parts(pack_path: pathlib.Path) -> list[pathlib.Path]:
    """The part files of `pack_path` (a folder of parts, or one part file)."""
    if pack_path.is_file():
        return [pack_path]
    if not pack_path.is_dir():
        raise PackError(f"--pack: {pack_path} is neither a part file nor a folder")
    found = sorted(pack_path.glob("*-part*of*.tar"))
    if not found:
        raise PackError(f"--pack: {pack_path} holds no *-partNofM.tar files")
    return found


def unpack(pack_path: pathlib.Path, dest: pathlib.Path, partial: bool = False) -> dict:
    """Extracts every part found at `pack_path` into `dest`, checks what it wrote and then the whole
    folder against the manifest; returns counts. Raises PackError on any difference, and (before writing
    anything) when a part is neither found nor already unpacked in `dest`, unless `partial`."""
    manifest, archives = None, []
    try:
        for part_path in find_parts(pack_path):
            try:
                archive = tarfile.open(part_path, "r:")
            except (tarfile.TarError, OSError) as error:
                raise PackError(f"{part_path}: unreadable tar ({error})") from None
            archives.append((part_path, archive))
            part_manifest = read_manifest(archive, part_path)
            if manifest is None:
                manifest = part_manifest
            elif part_manifest != manifest:
                raise PackError(f"{part_path}: belongs to another pack than the other parts")
        expected = {entry["path"]: entry for entry in manifest["files"]}
        found_parts = set()
        for part_path, archive in archives:
            for member in archive.getmembers()[1:]:
                entry = expected.get(member.name)
                if entry is None or not member.isfile():
                    raise PackError(f"{part_path}: member {member.name!r} is not in the manifest")
                found_parts.add(entry["part"])
        if not partial:
            _require_parts(manifest, dest, found_parts)
        for part_path, archive in archives:
            for member in archive.getmembers()[1:]:
                _extract_checked(archive, member, expected[member.name], dest, part_path)
    finally:
        for _, archive in archives:
            archive.close()
    return _check_folder(manifest, dest, partial)


def _require_parts(manifest: dict, dest: pathlib.Path, found_parts: set) -> None:
    """Raises PackError naming the parts neither given nor already unpacked (same sizes) in `dest`."""
    absent = {
        entry["part"]
        for entry in manifest["files"]
        if entry["part"] not in found_parts
        and not ((dest / entry["path"]).is_file() and (dest / entry["path"]).stat().st_size == entry["size"])
    }
    if absent:
        names = ", ".join(_part_name(manifest, index) for index in sorted(absent))
        raise PackError(f"{dest}: would stay incomplete; unpack {names} with it (or pass --partial)")


def _part_name(manifest: dict, index: int) -> str:
    return PART_PATTERN.format(name=manifest["name"], index=index, count=manifest["parts"])


def _extract_checked(archive, member, entry, dest: pathlib.Path, part_path) -> None:
    """Writes one member to dest atomically, checked against its checksum; a file there intact stays."""
    target = dest / entry["path"]
    if target.is_file() and target.stat().st_size == entry["size"] and sha256_of(target) == entry["sha256"]:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    with archive.extractfile(member) as source, open(temporary, "wb") as file:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            file.write(block)
    if digest.hexdigest() != entry["sha256"]:
        temporary.unlink()
        raise PackError(f"{part_path}: {entry['path']} does not match its checksum (damaged part)")
    os.utime(temporary, ns=(entry["mtime"], entry["mtime"]))
    os.replace(temporary, target)


def _check_folder(manifest: dict, dest: pathlib.Path, partial: bool) -> dict:
    """Counts the manifest's files present in dest; every present one must match its checksum."""
    present, missing_parts = 0, set()
    for entry in manifest["files"]:
        target = dest / entry["path"]
        if not target.exists():
            missing_parts.add(entry["part"])
            continue
        if target.stat().st_size != entry["size"] or sha256_of(target) != entry["sha256"]:
            raise PackError(f"{target}: differs from the packed file (size or checksum)")
        present += 1
    total = len(manifest["files"])
    if missing_parts and not partial:
        names = ", ".join(_part_name(manifest, index) for index in sorted(missing_parts))
        raise PackError(f"{dest}: {total - present} of {total} files missing; unpack {names} too")
    return {"files": total, "present": present, "missing_parts": sorted(missing_parts)}


def parse_args(argv):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="write the parts")
    pack_parser.add_argument("--source", default="../shared/data/covid19-ct-seg-2d")
    pack_parser.add_argument("--out", default=".gpu_data/ma2020")
    pack_parser.add_argument("--parts", type=int, default=2)
    unpack_parser = commands.add_parser("unpack", help="restore the folder from the parts found")
    unpack_parser.add_argument("--pack", default=".gpu_data/ma2020", help="folder of parts, or one part")
    unpack_parser.add_argument("--dest", default=".gpu_data/covid19-ct-seg-2d")
    unpack_parser.add_argument("--partial", action="store_true", help="accept missing parts (exit 0)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "pack":
            for path in pack(pathlib.Path(args.source), pathlib.Path(args.out), args.parts):
                print(f"{path} {path.stat().st_size:,} bytes ({path.stat().st_size / 2**20:.1f} MiB)")
        else:
            counts = unpack(pathlib.Path(args.pack), pathlib.Path(args.dest), args.partial)
            state = "complete" if not counts["missing_parts"] else f"parts {counts['missing_parts']} missing"
            print(f"{args.dest}: {counts['present']} of {counts['files']} files verified, {state}")
    except PackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
