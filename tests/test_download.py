"""Downloads against an HTTP server on 127.0.0.1 serving archives the tests build: success, resume after an
interruption, checksum mismatch, corrupt archive, path traversal."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fgvc.build import build_dataset
from fgvc.config import DataConfig
from fgvc.data.download import ARCHIVES, Archive, DownloadError, download, download_dataset, extract, published_md5


class ArchiveServer(BaseHTTPRequestHandler):
    """Serves `files` (path -> bytes) with HTTP Range support; `cut` (path -> n) sends only the first n bytes of
    the next full response for that path and drops the connection, as a network failure would."""

    files: dict[str, bytes] = {}
    cut: dict[str, int] = {}
    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        self.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        if start >= len(data) and requested:
            self.send_error(416)
            return
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if not requested and self.path in self.cut:
            body = body[: self.cut.pop(self.path)]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    ArchiveServer.files, ArchiveServer.cut, ArchiveServer.ranges = {}, {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tree_archive(root: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname=top)
    return buffer.getvalue()


def test_cub_download_end_to_end(server: str, small_birds: Path, tmp_path: Path, monkeypatch) -> None:
    data = tree_archive(small_birds, "CUB_200_2011")
    ArchiveServer.files["/CUB_200_2011.tgz"] = data
    monkeypatch.setitem(ARCHIVES, "cub200", Archive(f"{server}/CUB_200_2011.tgz", "CUB_200_2011", md5=md5(data)))
    cfg = DataConfig(dataset="cub200", root=str(tmp_path / "data"), download=True)
    dataset = build_dataset(cfg, "test")
    assert len(dataset) > 0 and (tmp_path / "data" / "CUB_200_2011" / "images.txt").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["CUB_200_2011"]  # archive removed, no debris
    ArchiveServer.ranges.clear()
    build_dataset(cfg, "train")  # present: nothing is fetched again
    assert ArchiveServer.ranges == []


def test_download_resumes_after_an_interruption(server: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    ArchiveServer.files["/a.tar.gz"] = data
    ArchiveServer.cut["/a.tar.gz"] = 300_000
    target = tmp_path / "a.tar.gz"
    with pytest.raises(DownloadError, match="interrupted after 300000 bytes.*run the same command again"):
        download(f"{server}/a.tar.gz", target, md5(data), echo=lambda _: None)
    assert (tmp_path / "a.tar.gz.part").stat().st_size == 300_000 and not target.exists()
    messages = []
    download(f"{server}/a.tar.gz", target, md5(data), echo=messages.append)
    assert ArchiveServer.ranges[-1] == "bytes=300000-" and any("resuming" in m for m in messages)
    assert target.read_bytes() == data and not (tmp_path / "a.tar.gz.part").exists()


def test_a_complete_part_file_is_verified_without_fetching_again(server: str, tmp_path: Path) -> None:
    data = b"all of it"
    ArchiveServer.files["/a.tar.gz"] = data
    (tmp_path / "a.tar.gz.part").write_bytes(data)  # an earlier attempt got every byte, then stopped
    download(f"{server}/a.tar.gz", tmp_path / "a.tar.gz", md5(data), echo=lambda _: None)
    assert ArchiveServer.ranges == [f"bytes={len(data)}-"]  # answered 416: nothing left to send
    assert (tmp_path / "a.tar.gz").read_bytes() == data


def test_checksum_mismatch_deletes_the_download(server: str, tmp_path: Path) -> None:
    ArchiveServer.files["/a.tar.gz"] = b"some bytes"
    with pytest.raises(DownloadError, match=f"checksum mismatch, expected MD5 {'0' * 32}, got {md5(b'some bytes')}"):
        download(f"{server}/a.tar.gz", tmp_path / "a.tar.gz", "0" * 32, echo=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_http_errors_are_named(server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="missing.tar.gz: HTTP 404"):
        download(f"{server}/missing.tar.gz", tmp_path / "a.tar.gz", "0" * 32, echo=lambda _: None)


def test_corrupt_archive_extracts_nothing(tmp_path: Path) -> None:
    data = tar_gz({"top/a.txt": b"a" * 5000, "top/b.txt": b"b" * 5000})
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DownloadError, match="corrupt or unreadable archive.*nothing was extracted"):
        extract(archive, target, echo=lambda _: None)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/absolute-escape.txt", "top/../../escape.txt"])
def test_path_traversal_is_refused_before_writing(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"top/fine.txt": b"fine", member: b"evil"}))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DownloadError, match="unsafe member.*nothing was extracted"):
        extract(archive, target, echo=lambda _: None)
    assert list(target.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_links_out_of_the_target_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("top/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(buffer.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="unsafe member 'top/passwd'"):
        extract(archive, tmp_path / "out", echo=lambda _: None)


def test_published_checksum_page(server: str, tmp_path: Path, monkeypatch) -> None:
    data = tree_archive(tmp_path, "fgvc-aircraft-2013b")
    ArchiveServer.files["/fgvc-aircraft-2013b.tar.gz"] = data
    ArchiveServer.files["/sum.html"] = f"<html><pre>MD5 (fgvc-aircraft-2013b.tar.gz) = {md5(data)}</pre>".encode()
    ArchiveServer.files["/none.html"] = b"<html>no sums here</html>"
    assert published_md5(f"{server}/sum.html") == md5(data)
    with pytest.raises(DownloadError, match="exactly one MD5 sum, found 0"):
        published_md5(f"{server}/none.html")
    monkeypatch.setitem(ARCHIVES, "aircraft100", Archive(f"{server}/fgvc-aircraft-2013b.tar.gz",
                                                         "fgvc-aircraft-2013b", md5_url=f"{server}/sum.html"))
    target = download_dataset("aircraft100", tmp_path / "data", echo=lambda _: None)
    assert target == tmp_path / "data" / "fgvc-aircraft-2013b" and target.is_dir()


def test_datasets_without_a_download_say_so(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="'cars196' has no official download"):
        download_dataset("cars196", tmp_path)
