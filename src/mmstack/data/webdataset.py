"""WebDataset tar shards with the standard library (``tarfile``): patterns, reading, writing, member references.

The layout is webdataset's, so shards written here load with the ``webdataset`` package and back:
a shard is a plain POSIX tar; a *sample* is a run of consecutive members that share a *key*, the member
path up to the first dot of its basename (``a/000001.jpg`` and ``a/000001.txt`` form sample ``a/000001``
with extensions ``jpg`` and ``txt``). Only uncompressed ``.tar`` shards are supported: members are read
by offset, which a gzip stream would not allow.

Member references: ``path/to/shard.tar#a/000001.jpg`` names one member. ``read_member`` reads it with a
single seek, using an index of the shard's headers that is built once per shard and cached, so random
access into shards costs no more than opening a file.
"""

from __future__ import annotations

import functools
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmstack.errors import DataError
from mmstack.utils.atomic import atomic_write_bytes

REF_SEP = ".tar#"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass
class TarMember:
    """One file inside a shard: where its bytes are, and the bytes themselves when small ones were read."""

    shard: Path
    name: str
    offset: int
    size: int
    data: bytes | None = None

    @property
    def ref(self) -> Path:
        """The ``shard.tar#member`` reference that ``read_member`` (and ``load_image``) accept."""
        return Path(f"{self.shard}#{self.name}")

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with self.shard.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class TarSample:
    """The members of one sample by extension (``"jpg"``, ``"txt"``, ``"json"``...), plus layout problems."""

    shard: Path
    key: str
    members: dict[str, TarMember] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def split_key(name: str) -> tuple[str, str]:
    """``"a/000001.seg.png"`` -> ``("a/000001", "seg.png")``: the webdataset key/extension rule."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(
    shard: str | Path, read_exts: frozenset[str] = frozenset({"txt", "json", "cls"})
) -> Iterator[TarSample]:
    """Yield the samples of one shard in order; members with an extension in ``read_exts`` are read inline.

    Raises:
        DataError: the shard is missing, not a tar, or truncated (raised where the damage is found).
    """
    shard = Path(shard)
    if not shard.is_file():
        raise DataError(f"tar shard not found: {shard}; check the path or the shard pattern")
    current: TarSample | None = None
    try:
        with tarfile.open(shard, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(shard, key)
                if ext in current.members:
                    current.problems.append(f"member '{info.name}' repeats extension '{ext}' of sample '{key}'")
                    continue
                data = tf.extractfile(info).read() if ext in read_exts else None
                current.members[ext] = TarMember(shard, info.name, info.offset_data, info.size, data)
            _check_complete(shard, tf.offset)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{shard}: not a readable tar shard, or truncated ({err}); re-create the shard (plain .tar, not .tar.gz)"
        ) from None
    if current is not None:
        yield current


def _check_complete(shard: Path, end: int) -> None:
    """Raise unless the end-of-archive marker follows the last member.

    ``tarfile`` stops quietly at a truncated header, so without this a cut-off shard (an interrupted
    copy or download) would just lose its last samples. Every tar writer emits the two zero blocks.
    """
    with shard.open("rb") as f:
        f.seek(end)
        trailer = f.read(2 * tarfile.BLOCKSIZE)
    if len(trailer) < 2 * tarfile.BLOCKSIZE or trailer.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end}, the file is cut off")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges (zero padding kept) and ``{a,b}`` lists, as webdataset and bash do."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match[1]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng[1]), int(rng[2])
        width = len(rng[1]) if rng[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [expanded for opt in options for expanded in expand_braces(head + opt + tail)]


def expand_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a path, a brace pattern or a list; every shard must exist and end in ``.tar``."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    shards = [Path(p) for item in items for p in expand_braces(str(item))]
    not_tar = [str(p) for p in shards if p.suffix != ".tar"]
    if not_tar:
        raise DataError(f"not tar shards: {', '.join(not_tar[:3])}; webdataset shards are uncompressed .tar files")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"tar shard not found: {', '.join(missing[:3])}{more}; check the path or the shard pattern")
    return shards


def brace_pattern(paths: Sequence[str | Path]) -> str | None:
    """The ``{000..NNN}`` pattern that names exactly ``paths`` (as written by ``write_shards``), if any."""
    names = [str(p) for p in paths]
    if len(names) <= 1:
        return names[0] if names else None
    first, last = names[0], names[-1]
    head = os.path.commonprefix([first, last]).rstrip("0123456789")
    tail = os.path.commonprefix([first[::-1], last[::-1]])[::-1].lstrip("0123456789")
    pattern = f"{head}{{{first[len(head) : len(first) - len(tail)]}..{last[len(head) : len(last) - len(tail)]}}}{tail}"
    return pattern if expand_braces(pattern) == names else None


def shard_paths(pattern: str | Path, n_shards: int) -> list[Path]:
    """Paths for ``n_shards`` shards: ``out/s-%06d.tar``, ``out/s-{000..009}.tar`` or a single ``out/s.tar``."""
    pattern = str(pattern)
    if not pattern.endswith(".tar"):
        raise DataError(f"shard pattern {pattern!r} must end in .tar (e.g. 'out/shards-%06d.tar')")
    if "%" in pattern:
        try:
            return [Path(pattern % i) for i in range(n_shards)]
        except (TypeError, ValueError) as err:
            raise DataError(
                f"bad shard pattern {pattern!r} ({err}); use one %d field, e.g. 'shards-%06d.tar'"
            ) from None
    names = expand_braces(pattern)
    if len(names) < n_shards:
        raise DataError(
            f"shard pattern {pattern!r} names {len(names)} shard(s) but {n_shards} are needed; "
            "use 'shards-%06d.tar', a wider {000..NNN} range, or a larger --shard-size"
        )
    return [Path(n) for n in names[:n_shards]]


def write_shards(samples: Sequence[tuple[str, dict[str, bytes]]], pattern: str | Path, shard_size: int) -> list[Path]:
    """Write ``(key, {ext: bytes})`` samples into shards of ``shard_size`` samples; returns the shard paths.

    Each shard is assembled in memory and written atomically; headers carry no time or owner, so the same
    samples give byte-identical shards.
    """
    if shard_size <= 0:
        raise DataError(f"shard_size must be positive, got {shard_size}")
    n_shards = -(-len(samples) // shard_size)
    paths = shard_paths(pattern, n_shards)
    for i, path in enumerate(paths):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for key, members in samples[i * shard_size : (i + 1) * shard_size]:
                for ext, data in members.items():
                    _add_member(tf, f"{key}.{ext}", data)
        atomic_write_bytes(path, buf.getvalue())
    return paths


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def is_member_ref(path: str | Path) -> bool:
    """True for ``shard.tar#member`` references."""
    return REF_SEP in str(path)


def split_member_ref(ref: str | Path) -> tuple[Path, str]:
    """``"d/s.tar#a/1.png"`` -> ``(Path("d/s.tar"), "a/1.png")``."""
    shard, _, name = str(ref).partition(REF_SEP)
    return Path(shard + ".tar"), name


def read_member(ref: str | Path) -> bytes:
    """The bytes of the member named by a ``shard.tar#member`` reference (one seek, cached header index)."""
    shard, name = split_member_ref(ref)
    if not shard.is_file():
        raise DataError(f"{ref}: tar shard not found: {shard}")
    stat = shard.stat()
    where = _member_index(str(shard), stat.st_mtime_ns, stat.st_size).get(name)
    if where is None:
        raise DataError(f"{ref}: no member {name!r} in {shard}; the shard changed or the reference is wrong")
    with shard.open("rb") as f:
        f.seek(where[0])
        return f.read(where[1])


@functools.lru_cache(maxsize=64)
def _member_index(shard: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    # mtime and size are part of the cache key so a rewritten shard is indexed again.
    try:
        with tarfile.open(shard, "r:") as tf:
            index = {info.name: (info.offset_data, info.size) for info in tf if info.isfile()}
            _check_complete(Path(shard), tf.offset)
            return index
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{shard}: not a readable tar shard, or truncated ({err})") from None
