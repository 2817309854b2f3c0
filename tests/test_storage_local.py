"""Local storage backend and key helpers: signed URLs, streaming saves, traversal, key extraction."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest

from chatapp.storage import local as local_module
from chatapp.storage.base import (
    InvalidKey,
    InvalidSignature,
    NotAnImage,
    ObjectNotFound,
    StorageError,
    StorageFull,
    TooLarge,
)
from chatapp.storage.keys import (
    IMAGE_SUFFIXES,
    content_type_for,
    image_prefix,
    is_valid_key,
    is_valid_prefix,
    make_image_key,
    sniff_image_type,
)
from chatapp.storage.local import CHUNK_SIZE, LocalStorage

BASE_URL = "http://127.0.0.1:5000"
ROUTE = "/api/v1/storage/"
SECRET = b"test-secret-0123456789abcdef0123"
USER, CONV = "5f0c2b3e8a9d4e61b7c2a1d3e4f50617", "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(200)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)
GIF = b"GIF89a" + bytes(200)
WEBP = b"RIFF\x00\x01\x00\x00WEBPVP8 " + bytes(200)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def storage(root: Path, clock: Clock) -> LocalStorage:
    return LocalStorage(root, SECRET, base_url=BASE_URL, clock=clock)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == BASE_URL
    assert parts.path.startswith(ROUTE)
    return unquote(parts.path[len(ROUTE) :]), dict(parse_qsl(parts.query))


def all_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def png_key() -> str:
    return make_image_key(USER, CONV, "png")


# -- keys ---------------------------------------------------------------------------------------


def test_make_image_key_shape() -> None:
    key = make_image_key(USER, CONV, "JPG")
    user, conv, images, name = key.split("/")
    assert (user, conv, images) == (USER, CONV, "images")
    stem, suffix = name.split(".")
    assert suffix == "jpg" and len(stem) == 32 and int(stem, 16) >= 0
    assert key.startswith(image_prefix(USER, CONV)) and is_valid_key(key)
    assert make_image_key(USER, CONV, "png") != make_image_key(USER, CONV, "png")


@pytest.mark.parametrize("suffix", ["exe", "svg", "", "png/../x", "jpg.exe", "pn g"])
def test_make_image_key_refuses_bad_suffix(suffix: str) -> None:
    with pytest.raises(ValueError):
        make_image_key(USER, CONV, suffix)


@pytest.mark.parametrize("user_id", ["..", "", "a/b", "a\x00"])
def test_image_prefix_refuses_bad_ids(user_id: str) -> None:
    with pytest.raises(ValueError):
        image_prefix(user_id, CONV)


@pytest.mark.parametrize(
    "key",
    ["u/c/images/abc.png", "u/c/images/abc.JPG", "a/b.webp", "U_1/c-2/images/x.y.gif", "u/c/images/a.jpeg"],
)
def test_valid_keys(key: str) -> None:
    assert is_valid_key(key)


TRAVERSAL_KEYS = [
    "../x.png",
    "a/../../etc/passwd.png",
    "%2e%2e/../x.png",
    "%2e%2e/..",
    "/etc/passwd.png",
    "/abs/x.png",
    "a/b\x00.png",
    "a\\..\\x.png",
    "a/./x.png",
    "a//x.png",
    "a/b/",
    "./a/x.png",
]


@pytest.mark.parametrize(
    "key",
    [
        *TRAVERSAL_KEYS,
        "",
        "x.png",
        "a/b.exe",
        "a/b.png.exe",
        "a/png",
        "a/.hidden.png",
        "a/b c.png",
        "a/b\n.png",
        "a/b\t.png",
        "a/é.png",
        "a/" + "x" * 129 + ".png",
        "/".join(["abcdefgh"] * 60) + ".png",
        None,
        42,
    ],
)
def test_invalid_keys(key: object) -> None:
    assert not is_valid_key(key)


def test_prefix_validation() -> None:
    assert is_valid_prefix(image_prefix(USER, CONV))
    for prefix in ["", "/", "u", "u/../", "../", "/u/", "u//", "u/c/images"]:
        assert not is_valid_prefix(prefix), prefix


def test_content_types_and_sniffing() -> None:
    assert content_type_for("a/b.JPG") == content_type_for("a/b.jpeg") == "image/jpeg"
    assert {content_type_for(f"a/b.{s}") for s in IMAGE_SUFFIXES} == set(IMAGE_SUFFIXES.values())
    with pytest.raises(ValueError):
        content_type_for("a/b.txt")
    assert sniff_image_type(PNG) == "image/png"
    assert sniff_image_type(JPEG) == "image/jpeg"
    assert sniff_image_type(GIF) == "image/gif"
    assert sniff_image_type(b"GIF87a....") == "image/gif"
    assert sniff_image_type(WEBP) == "image/webp"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_image_type(b"<svg xmlns=") is None
    assert sniff_image_type(b"") is None


# -- signed URLs --------------------------------------------------------------------------------


def test_upload_round_trip(storage: LocalStorage, clock: Clock) -> None:
    key = png_key()
    upload = storage.presign_upload(key, "image/png", 1000, 300)
    assert (upload.key, upload.method, upload.expires_in) == (key, "PUT", 300)
    assert upload.headers == {"Content-Type": "image/png"}
    assert upload.url.startswith(f"{BASE_URL}{ROUTE}{key}?")
    url_key, query = split_url(upload.url)
    assert url_key == key
    assert set(query) == {"expires", "max", "ct", "signature"}
    assert query["expires"] == str(int(clock.now) + 300)
    assert (query["max"], query["ct"]) == ("1000", "image/png")

    grant = storage.verify("PUT", key, query, content_type="image/png")
    assert (grant.method, grant.key, grant.content_type, grant.max_bytes) == ("PUT", key, "image/png", 1000)
    assert storage.save(key, io.BytesIO(PNG), grant.content_type, grant.max_bytes) == len(PNG)

    file, size, content_type = storage.open(key)
    with file:
        assert (file.read(), size, content_type) == (PNG, len(PNG), "image/png")
    assert storage.exists(key)


def test_download_round_trip(storage: LocalStorage) -> None:
    key = png_key()
    url = storage.presign_download(key, 60)
    url_key, query = split_url(url)
    assert url_key == key and set(query) == {"expires", "signature"}
    for method in ("GET", "get", "HEAD"):
        grant = storage.verify(method, key, query)
        assert (grant.method, grant.content_type, grant.max_bytes) == ("GET", None, None)


def test_as_dict_matches_the_api_shape(storage: LocalStorage) -> None:
    upload = storage.presign_upload(png_key(), "image/png", 10, 60)
    assert set(upload.as_dict()) == {"key", "url", "method", "headers", "expires_in"}


def _flip(hex_digest: str) -> str:
    return ("0" if hex_digest[0] != "0" else "1") + hex_digest[1:]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda q: q.update(signature=_flip(q["signature"])),
        lambda q: q.update(signature=q["signature"].upper()),
        lambda q: q.update(signature=q["signature"][:-1]),
        lambda q: q.pop("signature"),
        lambda q: q.update(expires=str(int(q["expires"]) + 3600)),
        lambda q: q.update(expires="0" + q["expires"]),
        lambda q: q.pop("expires"),
        lambda q: q.update(expires="soon"),
        lambda q: q.update(expires="-1"),
        lambda q: q.update(expires=" " + q["expires"]),
        lambda q: q.update(ct="image/gif"),
        lambda q: q.update(ct="image/png\n1000"),
        lambda q: q.update(max="100000000"),
        lambda q: q.update(max="1_000"),
    ],
)
def test_tampered_upload_query_is_refused(storage: LocalStorage, tamper) -> None:
    key = png_key()
    _, query = split_url(storage.presign_upload(key, "image/png", 1000, 300).url)
    tamper(query)
    with pytest.raises(InvalidSignature) as caught:
        storage.verify("PUT", key, query)
    assert caught.value.code == "signature_invalid"


def test_tampered_key_is_refused(storage: LocalStorage) -> None:
    key, other = png_key(), png_key()
    _, query = split_url(storage.presign_upload(key, "image/png", 1000, 300).url)
    with pytest.raises(InvalidSignature) as caught:
        storage.verify("PUT", other, query)
    assert caught.value.code == "signature_invalid"
    _, query = split_url(storage.presign_download(key, 300))
    for bad_key in (other, "../" + key, key.replace("/images/", "/images/../")):
        with pytest.raises(InvalidSignature):
            storage.verify("GET", bad_key, query)


def test_other_secret_cannot_verify(storage: LocalStorage, root: Path, clock: Clock) -> None:
    key = png_key()
    _, query = split_url(storage.presign_download(key, 300))
    other = LocalStorage(root, b"another-secret", base_url=BASE_URL, clock=clock)
    with pytest.raises(InvalidSignature):
        other.verify("GET", key, query)


def test_expired_url(storage: LocalStorage, clock: Clock) -> None:
    key = png_key()
    _, put_query = split_url(storage.presign_upload(key, "image/png", 1000, 300).url)
    _, get_query = split_url(storage.presign_download(key, 300))
    clock.now += 300  # the last valid second
    storage.verify("PUT", key, put_query)
    storage.verify("GET", key, get_query)
    clock.now += 1
    for method, query in (("PUT", put_query), ("GET", get_query)):
        with pytest.raises(InvalidSignature) as caught:
            storage.verify(method, key, query)
        assert caught.value.code == "url_expired"


def test_url_is_good_for_its_method_only(storage: LocalStorage) -> None:
    key = png_key()
    _, put_query = split_url(storage.presign_upload(key, "image/png", 1000, 300).url)
    _, get_query = split_url(storage.presign_download(key, 300))
    # a download URL dressed up with an upload's fields still is not an upload URL
    dressed = {**get_query, "ct": "image/png", "max": "1000"}
    cases = [
        ("GET", put_query),
        ("HEAD", put_query),
        ("PUT", get_query),
        ("PUT", dressed),
        ("DELETE", get_query),
    ]
    for method, query in cases:
        with pytest.raises(InvalidSignature) as caught:
            storage.verify(method, key, query)
        assert caught.value.code == "method_not_allowed", method


def test_wrong_content_type(storage: LocalStorage, root: Path) -> None:
    key = png_key()
    _, query = split_url(storage.presign_upload(key, "image/png", 1000, 300).url)
    assert (
        storage.verify("PUT", key, query, content_type="Image/PNG; charset=binary").content_type
        == "image/png"
    )
    for sent in ("image/jpeg", "text/html", ""):
        with pytest.raises(InvalidSignature) as caught:
            storage.verify("PUT", key, query, content_type=sent)
        assert caught.value.code == "signature_invalid"
    with pytest.raises(ValueError):
        storage.presign_upload(key, "image/jpeg", 1000, 300)
    with pytest.raises(NotAnImage):
        storage.save(key, io.BytesIO(JPEG), "image/png", 1000)
    with pytest.raises(NotAnImage):
        storage.save(key, io.BytesIO(PNG), "text/html", 1000)
    assert all_files(root) == []


def test_jpg_and_jpeg_both_take_jpeg_bytes(storage: LocalStorage) -> None:
    for suffix in ("jpg", "jpeg"):
        key = make_image_key(USER, CONV, suffix)
        assert storage.presign_upload(key, "image/jpeg", 1000, 60).headers["Content-Type"] == "image/jpeg"
        assert storage.save(key, io.BytesIO(JPEG), "image/jpeg", 1000) == len(JPEG)


@pytest.mark.parametrize(
    "body,content_type", [(GIF, "image/gif"), (WEBP, "image/webp"), (b"GIF87a", "image/gif")]
)
def test_other_image_types_are_stored(storage: LocalStorage, body: bytes, content_type: str) -> None:
    suffix = content_type.split("/")[1]
    assert storage.save(make_image_key(USER, CONV, suffix), io.BytesIO(body), content_type, 1000) == len(body)


def test_bad_presign_arguments(storage: LocalStorage, root: Path, clock: Clock) -> None:
    with pytest.raises(InvalidKey):
        storage.presign_upload("../x.png", "image/png", 10, 60)
    with pytest.raises(InvalidKey):
        storage.presign_download("a/b.txt", 60)
    with pytest.raises(ValueError):
        storage.presign_upload(png_key(), "image/png", 0, 60)
    with pytest.raises(ValueError):
        storage.presign_download(png_key(), 0)
    unbound = LocalStorage(root, SECRET, clock=clock)
    with pytest.raises(StorageError):
        unbound.presign_download(png_key(), 60)
    with pytest.raises(ValueError):
        LocalStorage(root, b"")
    with pytest.raises(ValueError):
        LocalStorage(root, SECRET, base_url="http://user@127.0.0.1:5000")


# -- saving -------------------------------------------------------------------------------------


class EndlessImage(io.RawIOBase):
    """A PNG that never ends, counting what was read: proves the limit bites while streaming."""

    def __init__(self) -> None:
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert 0 < size <= 1 << 20, "save must read in bounded chunks"
        chunk = (PNG if self.sent == 0 else b"")[:size]
        chunk += bytes(size - len(chunk))
        self.sent += size
        return chunk


def test_oversize_body_is_stopped_while_streaming(storage: LocalStorage, root: Path) -> None:
    stream = EndlessImage()
    with pytest.raises(TooLarge):
        storage.save(png_key(), stream, "image/png", 200_000)  # type: ignore[arg-type]
    assert stream.sent <= 200_000 + CHUNK_SIZE
    assert all_files(root) == []


def test_size_limit_is_exact(storage: LocalStorage, root: Path) -> None:
    key = png_key()
    assert storage.save(key, io.BytesIO(PNG), "image/png", len(PNG)) == len(PNG)
    with pytest.raises(TooLarge):
        storage.save(png_key(), io.BytesIO(PNG + b"x"), "image/png", len(PNG))
    assert all_files(root) == [root / key]


@pytest.mark.parametrize(
    "body", [b"", b"\x89PN", b"hello, world, not an image", b"<svg></svg>" * 10, b"\x00" * 5000]
)
def test_non_image_body_is_refused(storage: LocalStorage, root: Path, body: bytes) -> None:
    with pytest.raises(NotAnImage):
        storage.save(png_key(), io.BytesIO(body), "image/png", 10_000)
    assert all_files(root) == []


class TrickleStream(io.RawIOBase):
    """Hands out one byte per read, as a slow client might."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data[:1], self.data[1:]
        return chunk


def test_head_split_across_reads_still_sniffs(storage: LocalStorage) -> None:
    key = png_key()
    assert storage.save(key, TrickleStream(PNG), "image/png", 1000) == len(PNG)  # type: ignore[arg-type]
    file, _, _ = storage.open(key)
    with file:
        assert file.read() == PNG


@pytest.mark.parametrize("key", TRAVERSAL_KEYS)
def test_traversal_keys_are_refused(storage: LocalStorage, tmp_path: Path, root: Path, key: str) -> None:
    with pytest.raises(InvalidKey):
        storage.save(key, io.BytesIO(PNG), "image/png", 1000)
    with pytest.raises(InvalidKey):
        storage.open(key)
    assert not storage.exists(key)
    assert all_files(tmp_path) == []


@pytest.mark.parametrize(
    "key",
    [
        "../x.png",
        "a/../../etc/passwd.png",
        "%2e%2e/..",
        "/etc/passwd.png",
        str(Path("/tmp/x.png")),
        "a/b\x00.png",
        "..",
    ],
)
def test_path_check_holds_even_without_key_validation(
    storage: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setattr(local_module, "is_valid_key", lambda _key: True)
    with pytest.raises(InvalidKey):
        storage.save(key, io.BytesIO(PNG), "image/png", 1000)
    with pytest.raises(InvalidKey):
        storage.open(key)
    assert all_files(tmp_path) == []
    assert not Path("/etc/passwd.png").exists()


def test_atomic_write_leaves_no_temp_files(storage: LocalStorage, root: Path) -> None:
    key = png_key()
    storage.save(key, io.BytesIO(PNG), "image/png", 1000)
    storage.save(key, io.BytesIO(PNG[:-1]), "image/png", 1000)  # overwrite
    assert all_files(root) == [root / key]
    with pytest.raises(NotAnImage):
        storage.save(key, io.BytesIO(JPEG), "image/png", 1000)
    with pytest.raises(TooLarge):
        storage.save(key, io.BytesIO(PNG * 10), "image/png", 1000)
    assert all_files(root) == [root / key]
    assert (root / key).read_bytes() == PNG[:-1]  # a failed overwrite never touches the stored object


class BrokenStream(io.RawIOBase):
    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 2:
            raise OSError(errno.ECONNRESET, "client went away")
        return PNG


def test_interrupted_upload_keeps_the_old_object(storage: LocalStorage, root: Path) -> None:
    key = png_key()
    storage.save(key, io.BytesIO(JPEG), "image/jpeg", 1000)
    with pytest.raises(StorageError):
        storage.save(key, BrokenStream(), "image/png", 10_000)  # type: ignore[arg-type]
    assert all_files(root) == [root / key]
    assert (root / key).read_bytes() == JPEG


def test_full_disk_is_storage_full(
    storage: LocalStorage, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(local_module.os, "fsync", no_space)
    with pytest.raises(StorageFull):
        storage.save(png_key(), io.BytesIO(PNG), "image/png", 1000)
    monkeypatch.undo()
    assert all_files(root) == []


def test_open_missing_object(storage: LocalStorage) -> None:
    key = png_key()
    with pytest.raises(ObjectNotFound):
        storage.open(key)
    assert not storage.exists(key)
    storage.save(key, io.BytesIO(PNG), "image/png", 1000)
    with pytest.raises(ObjectNotFound):
        storage.open(key.rsplit("/", 1)[0] + "/missing.png")


def test_delete_prefix_removes_one_conversation_only(storage: LocalStorage, root: Path) -> None:
    mine = [make_image_key("u1", "c1", "png") for _ in range(3)]
    others = [
        make_image_key("u1", "c2", "png"),
        make_image_key("u1", "c10", "png"),
        make_image_key("u2", "c1", "png"),
    ]
    for key in mine + others:
        storage.save(key, io.BytesIO(PNG), "image/png", 1000)

    assert storage.delete_prefix(image_prefix("u1", "c1")) == 3
    assert all_files(root) == sorted(root / key for key in others)
    assert not (root / "u1" / "c1").exists()  # emptied folders go too
    assert root.is_dir()
    assert storage.delete_prefix(image_prefix("u1", "c1")) == 0
    assert storage.delete_prefix(image_prefix("nobody", "c1")) == 0

    assert storage.delete_prefix(image_prefix("u1", "c2")) == 1
    assert storage.delete_prefix(image_prefix("u1", "c10")) == 1
    assert storage.delete_prefix("u2/") == 1
    assert all_files(root) == [] and root.is_dir()


@pytest.mark.parametrize("prefix", ["", "/", "u1", "u1/c1", "../", "u1/../", "/etc/", "u1//"])
def test_delete_prefix_refuses_bad_prefixes(storage: LocalStorage, root: Path, prefix: str) -> None:
    key = make_image_key("u1", "c1", "png")
    storage.save(key, io.BytesIO(PNG), "image/png", 1000)
    with pytest.raises(InvalidKey):
        storage.delete_prefix(prefix)
    assert all_files(root) == [root / key]


# -- key_from_url -------------------------------------------------------------------------------


def test_key_from_issued_urls(storage: LocalStorage, clock: Clock) -> None:
    key = png_key()
    upload_url = storage.presign_upload(key, "image/png", 1000, 60).url
    download_url = storage.presign_download(key, 60)
    clock.now += 10_000  # long expired: the key is still what the URL names
    assert storage.key_from_url(upload_url) == key
    assert storage.key_from_url(download_url) == key
    assert storage.key_from_url(key) == key
    assert storage.key_from_url(f"{BASE_URL}{ROUTE}{key}") == key
    assert storage.key_from_url(f"{BASE_URL}{ROUTE}{key}?signature=forged") == key
    assert storage.key_from_url(f"http://127.0.0.1:5000{ROUTE}{quote(key, safe='')}") == key


def _refused_urls(key: str) -> list[str]:
    path = f"{ROUTE}{key}"
    return [
        f"http://evil.example{path}",
        f"http://127.0.0.1.evil:5000{path}",
        f"http://127.0.0.1:5000.evil{path}",
        f"http://127.0.0.1:5001{path}",
        f"http://127.0.0.1{path}",
        f"http://good@evil{path}",
        f"http://127.0.0.1:5000@evil.example{path}",
        f"http://evil@127.0.0.1:5000{path}",
        f"http://evil.example\\@127.0.0.1:5000{path}",
        f"http://evil.example\\.127.0.0.1:5000{path}",
        f"//127.0.0.1:5000{path}",
        path,
        f"ftp://127.0.0.1:5000{path}",
        f"file://127.0.0.1:5000{path}",
        f"javascript://127.0.0.1:5000{path}",
        "data:image/png;base64,iVBORw0KGgo=",
        f"data:{key}",
        f"http://127.0.0.1:5000/other{path}",
        f"http://127.0.0.1:5000/api/v1/storagex/{key}",
        f"http://127.0.0.1:5000/api/v1/{key}",
        f"http://127.0.0.1:5000{ROUTE}",
        f"http://127.0.0.1:5000{ROUTE}../{key}",
        f"http://127.0.0.1:5000{ROUTE}%2e%2e/%2e%2e/etc/passwd.png",
        f"http://127.0.0.1:5000{ROUTE}%252e%252e/%252e%252e/etc/passwd.png",
        f"http://127.0.0.1:5000{ROUTE}{key.replace('/', '%252F')}",
        f"http://127.0.0.1:5000{ROUTE}u/c/images/x.exe",
        f"http://127.0.0.1:5000{ROUTE}u/c/images/a%20b.png",
        f"http://127.0.0.1:5000{ROUTE}u/c/images/a%00.png",
        f"http://127.0.0.1:5000{path}#frag",
        f"http://127.0.0.1:5000\t{path}",
        f" {BASE_URL}{path}",
        f"{BASE_URL}{path}\n",
        f"http://127.0.0.1:5000:80{path}",
        f"http://[::1]:5000{path}",
        "../" + key,
        "",
        "x" * 5000,
    ]


def test_key_from_url_refuses_foreign_and_tricky_urls(storage: LocalStorage) -> None:
    key = png_key()
    for url in _refused_urls(key):
        assert storage.key_from_url(url) is None, url


def test_key_from_url_without_base_url_takes_bare_keys_only(root: Path, clock: Clock) -> None:
    unbound = LocalStorage(root, SECRET, clock=clock)
    key = png_key()
    assert unbound.key_from_url(key) == key
    assert unbound.key_from_url(f"{BASE_URL}{ROUTE}{key}") is None


def test_with_base_url(root: Path, storage: LocalStorage, clock: Clock) -> None:
    unbound = LocalStorage(root, SECRET, clock=clock)
    bound = unbound.with_base_url("http://localhost:8000/")
    assert bound is not unbound and unbound.base_url is None
    key = png_key()
    url = bound.presign_download(key, 60)
    assert url.startswith(f"http://localhost:8000{ROUTE}{key}?")
    assert bound.key_from_url(url) == key
    assert bound.key_from_url(f"http://LOCALHOST:8000{ROUTE}{key}") == key
    assert bound.key_from_url(f"{BASE_URL}{ROUTE}{key}") is None
    bound.verify("GET", key, split_url(url.replace("http://localhost:8000", BASE_URL))[1])  # same secret
    assert storage.with_base_url("http://localhost:8000") is storage  # the configured URL wins


def test_base_url_with_a_path(root: Path, clock: Clock) -> None:
    mounted = LocalStorage(root, SECRET, base_url="https://chat.example.test/app/", clock=clock)
    key = png_key()
    url = mounted.presign_download(key, 60)
    assert url.startswith(f"https://chat.example.test/app{ROUTE}{key}?")
    assert mounted.key_from_url(url) == key
    assert mounted.key_from_url(f"https://chat.example.test:443/app{ROUTE}{key}") == key
    assert mounted.key_from_url(f"https://chat.example.test{ROUTE}{key}") is None
    assert mounted.key_from_url(f"http://chat.example.test/app{ROUTE}{key}") is None
