"""Opt-in downloads of the datasets that have an official archive: resumable, checksum-verified, extracted safely.

- Resumable: bytes go to `<archive>.part`; a later attempt asks the server for the rest (HTTP Range) and appends.
  A server that ignores the range restarts the file, never corrupts it.
- Verified: the archive's MD5 must equal the published one before anything is extracted; a mismatch deletes the
  download and says both sums. Where the project does not ship the sum, it is read from the dataset's own
  checksum page, which must contain exactly one MD5.
- Safe: tar members are extracted with Python's "data" filter (no absolute paths, no "..", no links or devices that
  point outside the target), every member is checked before the first byte is written, and extraction goes to a
  staging folder that is renamed into place only when complete: a corrupt or hostile archive leaves nothing behind.
Stanford Cars has no working download; its loader says exactly which files to put where.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A download, checksum or extraction failure; the message names the URL or file and what went wrong."""


@dataclass(frozen=True)
class Archive:
    url: str
    folder: str  # the top-level folder the archive extracts to
    md5: str | None = None
    md5_url: str | None = None  # a page publishing the MD5, read when `md5` is not shipped

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "cub200": Archive("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011",
                      md5="97eceeb196236b17998738112f37df78"),
    "aircraft100": Archive("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                           "fgvc-aircraft-2013b",
                           md5_url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
                                   "fgvc-aircraft-2013b.html"),
}


def download_dataset(name: str, root: str | os.PathLike, *, echo: Callable[[str], None] = print) -> Path:
    """Download, verify and extract dataset `name` into `root`; returns the extracted folder. Nothing is fetched
    when that folder already exists."""
    if name not in ARCHIVES:
        raise DownloadError(f"dataset {name!r} has no official download; datasets with one: {', '.join(ARCHIVES)}")
    archive = ARCHIVES[name]
    root = Path(root).expanduser()
    target = root / archive.folder
    if target.exists():
        echo(f"{target} already exists; not downloading")
        return target
    root.mkdir(parents=True, exist_ok=True)
    expected = archive.md5 or published_md5(archive.md5_url)
    path = download(archive.url, root / archive.filename, expected, echo=echo)
    extract(path, root, echo=echo)
    if not target.is_dir():
        raise DownloadError(f"{path} did not contain the expected folder {archive.folder}/")
    path.unlink()
    return target


def published_md5(url: str) -> str:
    """The single MD5 sum on a checksum page."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"cannot read the published checksum at {url}: {error}") from error
    sums = set(re.findall(r"\b[0-9a-fA-F]{32}\b", text))
    if len(sums) != 1:
        raise DownloadError(f"{url} should publish exactly one MD5 sum, found {len(sums)}; not downloading "
                            "an archive that cannot be verified")
    return sums.pop().lower()


def download(url: str, path: Path, md5: str, *, echo: Callable[[str], None] = print) -> Path:
    """Fetch `url` to `path`, resuming `path.part` when a previous attempt left one, and verify its MD5."""
    partial = path.with_name(path.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = offset > 0 and response.status == 206
            if offset and not resumed:
                echo(f"{url}: the server does not resume; starting again")
            elif resumed:
                echo(f"resuming {url} at {offset} bytes")
            length = response.headers.get("Content-Length")
            total = int(length) + (offset if resumed else 0) if length is not None else None
            echo(f"downloading {url} -> {path}" + (f" ({total} bytes)" if total is not None else ""))
            with open(partial, "ab" if resumed else "wb") as file:
                shutil.copyfileobj(response, file, CHUNK_BYTES)
                file.flush()
                os.fsync(file.fileno())
            # http.client returns a short body without complaint when the connection drops mid-transfer.
            if total is not None and partial.stat().st_size < total:
                raise ConnectionError(f"the connection closed {total - partial.stat().st_size} bytes early")
    except urllib.error.HTTPError as error:
        if not (error.code == 416 and offset):  # 416 to a resume: the part file is already complete; verify it
            raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        size = partial.stat().st_size if partial.exists() else 0
        raise DownloadError(f"{url}: download interrupted after {size} bytes ({error}); run the same command again "
                            f"to resume from {partial}") from error
    actual = file_md5(partial)
    if actual != md5.lower():
        partial.unlink()
        raise DownloadError(f"{url}: checksum mismatch, expected MD5 {md5.lower()}, got {actual}; the download was "
                            "deleted (a changed or damaged file on the server, or a proxy rewrote it)")
    os.replace(partial, path)
    return path


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: Path, target: Path, *, echo: Callable[[str], None] = print) -> None:
    """Extract a tar archive (any compression) into `target`: all of it, or nothing."""
    staging = target / f".extracting-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    echo(f"extracting {archive} into {target}")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:  # check everything first: refuse before writing anything
                try:
                    if member.name.startswith(("/", "\\")):  # the filter would strip the slash; refuse instead
                        raise tarfile.AbsolutePathError(member)
                    tarfile.data_filter(member, str(staging))
                except tarfile.FilterError as error:
                    raise DownloadError(f"{archive}: unsafe member {member.name!r} refused ({error}); nothing was "
                                        "extracted") from None
            tar.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: corrupt or unreadable archive ({error}); nothing was extracted") from error
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    clashes = [entry.name for entry in staging.iterdir() if (target / entry.name).exists()]
    if clashes:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: {', '.join(clashes)} already exist in {target}; not overwriting")
    for entry in staging.iterdir():
        os.replace(entry, target / entry.name)
    staging.rmdir()
