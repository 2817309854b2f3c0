"""COS backend, fully offline: presigned URLs checked against Tencent's documented signing algorithm.

The checker below is written from the COS "request signature" documentation
(https://cloud.tencent.com/document/product/436/7778), not from the SDK, so a wrong or missing
signature part in the SDK's output shows up here.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from chatapp.storage.base import InvalidKey, StorageError
from chatapp.storage.cos import COSStorage
from chatapp.storage.keys import image_prefix, make_image_key

SECRET_ID = "AKIDexampleSecretId0123456789"
SECRET_KEY = "exampleSecretKey0123456789abcd"
REGION = "ap-guangzhou"
BUCKET = "examplebucket-1250000000"
DEFAULT_HOST = f"{BUCKET}.cos.{REGION}.myqcloud.com"
CUSTOM_DOMAIN = "img.chat.example.test"
TOKEN = "sts/token+with=odd&chars"  # a fake STS token whose characters need encoding
USER, CONV = "u1", "c1"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach Tencent: any lookup or connection beyond 127.0.0.1 fails the test."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1"):
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> Any:
        if not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


def cos_signature_ok(
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
    now: float | None = None,
) -> bool:
    """Would COS accept this request (method, presigned url, the headers the client sends)?"""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(pairs)
    if query.get("q-sign-algorithm") != "sha1" or query.get("q-ak") != secret_id:
        return False
    key_time = query["q-key-time"]
    if query["q-sign-time"] != key_time:
        return False
    start, end = (int(t) for t in key_time.split(";"))
    if not start <= (time.time() if now is None else now) <= end:
        return False

    def encode(text: str) -> str:  # RFC 3986 percent-encoding, only -_.~ left bare
        return quote(text, safe="-_.~")

    # HttpParameters: the listed query parameters, names lower-cased, both sides encoded, sorted
    url_params = {encode(k).lower(): encode(v) for k, v in pairs if not k.startswith("q-")}
    param_list = [name for name in query["q-url-param-list"].split(";") if name]
    if any(name not in url_params for name in param_list):
        return False
    http_parameters = "&".join(f"{name}={url_params[name]}" for name in sorted(param_list))

    # HttpHeaders: the listed headers as the client sends them (Host comes from the URL)
    sent = {encode(k).lower(): encode(v) for k, v in headers.items()}
    sent.setdefault("host", encode(parts.netloc))
    header_list = [name for name in query["q-header-list"].split(";") if name]
    if any(name not in sent for name in header_list):
        return False
    http_headers = "&".join(f"{name}={sent[name]}" for name in sorted(header_list))

    http_string = f"{method.lower()}\n{unquote(parts.path)}\n{http_parameters}\n{http_headers}\n"
    string_to_sign = f"sha1\n{key_time}\n{hashlib.sha1(http_string.encode()).hexdigest()}\n"
    sign_key = hmac.new(secret_key.encode(), key_time.encode(), hashlib.sha1).hexdigest()
    signature = hmac.new(sign_key.encode(), string_to_sign.encode(), hashlib.sha1).hexdigest()
    return hmac.compare_digest(signature, query["q-signature"])


def make_storage(**kwargs: Any) -> COSStorage:
    return COSStorage(SECRET_ID, SECRET_KEY, REGION, BUCKET, **kwargs)


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


# -- presigned URLs -----------------------------------------------------------------------------


def test_presigned_put_on_default_domain() -> None:
    storage = make_storage()
    key = make_image_key(USER, CONV, "png")
    before = int(time.time())
    upload = storage.presign_upload(key, "image/png", 10 * 1024 * 1024, 600)
    assert (upload.key, upload.method, upload.expires_in) == (key, "PUT", 600)
    assert upload.headers == {"Content-Type": "image/png"}

    parts = urlsplit(upload.url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", DEFAULT_HOST, f"/{key}")
    query = query_of(upload.url)
    assert query["q-header-list"].split(";") == ["content-type", "host"]
    start, end = (int(t) for t in query["q-key-time"].split(";"))
    assert start <= before and before + 600 <= end <= int(time.time()) + 600
    assert "x-cos-security-token" not in query

    assert cos_signature_ok("PUT", upload.url, upload.headers)
    assert cos_signature_ok("PUT", upload.url, {"content-type": "image/png"})


def test_put_signature_covers_the_content_type() -> None:
    upload = make_storage().presign_upload(make_image_key(USER, CONV, "png"), "image/png", 1000, 600)
    assert cos_signature_ok("PUT", upload.url, {"Content-Type": "image/png"})
    for content_type in ("image/jpeg", "text/html", "image/png; charset=utf-8", "IMAGE/PNG"):
        assert not cos_signature_ok("PUT", upload.url, {"Content-Type": content_type}), content_type
    assert not cos_signature_ok("PUT", upload.url, {})


def test_signature_binds_method_key_host_secret_and_time() -> None:
    storage = make_storage()
    key = make_image_key(USER, CONV, "png")
    upload = storage.presign_upload(key, "image/png", 1000, 600)
    download = storage.presign_download(key, 600)
    assert cos_signature_ok("GET", download, {})
    assert not cos_signature_ok("PUT", download, {"Content-Type": "image/png"})
    assert not cos_signature_ok("GET", upload.url, {"Content-Type": "image/png"})
    other_key = make_image_key(USER, CONV, "png")
    assert not cos_signature_ok("GET", download.replace(key, other_key), {})
    assert not cos_signature_ok("GET", download, {"Host": "other-1250000000.cos.ap-guangzhou.myqcloud.com"})
    assert not cos_signature_ok("GET", download, {}, secret_key="wrong")
    assert not cos_signature_ok("GET", download, {}, now=time.time() + 601 + 60)


def test_presigned_get_on_custom_domain() -> None:
    storage = make_storage(domain=CUSTOM_DOMAIN)
    key = make_image_key(USER, CONV, "webp")
    download = storage.presign_download(key, 300)
    parts = urlsplit(download)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", CUSTOM_DOMAIN, f"/{key}")
    assert query_of(download)["q-header-list"] == "host"
    assert cos_signature_ok("GET", download, {})
    upload = storage.presign_upload(key, "image/webp", 1000, 300)
    assert urlsplit(upload.url).netloc == CUSTOM_DOMAIN
    assert cos_signature_ok("PUT", upload.url, {"Content-Type": "image/webp"})


def test_http_scheme() -> None:
    url = make_storage(scheme="http").presign_download(make_image_key(USER, CONV, "gif"), 60)
    assert url.startswith(f"http://{DEFAULT_HOST}/")


def test_sts_token_rides_in_the_url_and_is_signed() -> None:
    storage = make_storage(token=TOKEN)
    key = make_image_key(USER, CONV, "jpg")
    upload = storage.presign_upload(key, "image/jpeg", 1000, 600)
    download = storage.presign_download(key, 600)
    for method, url, headers in (("PUT", upload.url, upload.headers), ("GET", download, {})):
        query = query_of(url)
        assert query["x-cos-security-token"] == TOKEN
        assert query["q-url-param-list"] == "x-cos-security-token"
        assert cos_signature_ok(method, url, headers)
        tampered = url.replace(quote(TOKEN, safe=""), "other-token")
        assert tampered != url and not cos_signature_ok(method, tampered, headers)


def test_sdk_alone_leaves_the_token_out_of_presigned_urls() -> None:
    """Why COSStorage adds the token itself: CosConfig(Token=) only reaches requests the SDK sends."""
    client = CosS3Client(CosConfig(Region=REGION, SecretId=SECRET_ID, SecretKey=SECRET_KEY, Token=TOKEN))
    url = client.get_presigned_url(Bucket=BUCKET, Key="u1/c1/images/a.png", Method="GET", Expired=60)
    assert "x-cos-security-token" not in url


def test_bad_presign_arguments() -> None:
    storage = make_storage()
    with pytest.raises(InvalidKey):
        storage.presign_upload("../x.png", "image/png", 10, 60)
    with pytest.raises(InvalidKey):
        storage.presign_download("/u1/c1/images/a.png", 60)
    with pytest.raises(ValueError):
        storage.presign_upload(make_image_key(USER, CONV, "png"), "image/gif", 10, 60)
    with pytest.raises(ValueError):
        storage.presign_download(make_image_key(USER, CONV, "png"), 0)
    with pytest.raises(ValueError):
        make_storage(domain="https://img.example.test")
    assert storage.with_base_url("http://127.0.0.1:5000") is storage


# -- key_from_url -------------------------------------------------------------------------------


def test_key_from_real_shaped_urls() -> None:
    storage, custom = make_storage(token=TOKEN), make_storage(domain=CUSTOM_DOMAIN)
    key = make_image_key(USER, CONV, "png")
    assert storage.key_from_url(storage.presign_upload(key, "image/png", 10, 60).url) == key
    assert storage.key_from_url(storage.presign_download(key, 60)) == key
    assert storage.key_from_url(key) == key
    assert storage.key_from_url(f"https://{DEFAULT_HOST}:443/{key}") == key
    assert custom.key_from_url(custom.presign_download(key, 60)) == key
    assert custom.key_from_url(custom.presign_upload(key, "image/png", 10, 60).url) == key
    assert custom.key_from_url(f"https://{DEFAULT_HOST}/{key}") is None  # not the host it issues


@pytest.mark.parametrize(
    "template",
    [
        "https://{host}.evil.com/{key}",
        "https://evil.com/{host}/{key}",
        "https://evil.com/?u=https://{host}/{key}",
        "https://{host}@evil.com/{key}",
        "https://evil.com@{host}/{key}",
        "https://evil.com\\@{host}/{key}",
        "https://x{host}/{key}",
        "https://{host}./{key}",
        "https://{host}:8443/{key}",
        "http://{host}/{key}",
        "ftp://{host}/{key}",
        "//{host}/{key}",
        "/{key}",
        "https://otherbucket-1250000000.cos.ap-guangzhou.myqcloud.com/{key}",
        "https://{bucket}.cos.ap-shanghai.myqcloud.com/{key}",
        "https://{host}/../{key}",
        "https://{host}/%2e%2e/%2e%2e/etc/passwd.png",
        "https://{host}/%252e%252e/%252e%252e/etc/passwd.png",
        "https://{host}/u1/c1/images/evil.svg",
        "https://{host}/{key}#x",
        "https://{host}/",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_key_from_url_refuses_look_alikes(template: str) -> None:
    key = make_image_key(USER, CONV, "png")
    url = template.format(host=DEFAULT_HOST, bucket=BUCKET, key=key)
    assert make_storage().key_from_url(url) is None


# -- objects, with a fake client --------------------------------------------------------------


class FakeCos:
    """Just enough of CosS3Client's list/delete/head behaviour, with ListObjects' marker paging."""

    def __init__(self, keys: list[str], *, next_marker: bool = True, leak_foreign: bool = False) -> None:
        self.keys = sorted(keys)
        self.next_marker = next_marker
        self.leak_foreign = leak_foreign
        self.deletes: list[list[str]] = []
        self.lists = 0

    def list_objects(
        self, Bucket: str, Prefix: str = "", Marker: str = "", MaxKeys: int = 1000, **_: Any
    ) -> dict:
        assert Bucket == BUCKET and MaxKeys <= 1000
        self.lists += 1
        matching = [k for k in self.keys if k > Marker and (self.leak_foreign or k.startswith(Prefix))]
        page, truncated = matching[:MaxKeys], len(matching) > MaxKeys
        result: dict[str, Any] = {"Prefix": Prefix, "IsTruncated": "true" if truncated else "false"}
        if page:
            result["Contents"] = [{"Key": k, "Size": "10"} for k in page]
        if truncated and self.next_marker:
            result["NextMarker"] = page[-1]
        return result

    def delete_objects(self, Bucket: str, Delete: dict, **_: Any) -> dict:
        assert Bucket == BUCKET and Delete["Quiet"] == "true"
        batch = [entry["Key"] for entry in Delete["Object"]]
        assert 0 < len(batch) <= 1000
        self.deletes.append(batch)
        self.keys = [k for k in self.keys if k not in set(batch)]
        return {}

    def head_object(self, Bucket: str, Key: str, **_: Any) -> dict:
        if Key not in self.keys:
            raise CosServiceError("HEAD", {"code": "NoSuchResource", "message": "", "resource": Key}, 404)
        return {"Content-Length": "10"}


def _keys(user: str, conv: str, count: int) -> list[str]:
    return [make_image_key(user, conv, "png") for _ in range(count)]


@pytest.mark.parametrize("next_marker", [True, False])
def test_delete_prefix_batches_and_touches_only_the_prefix(next_marker: bool) -> None:
    mine = _keys("u1", "c1", 2500)
    others = [*_keys("u1", "c10", 5), *_keys("u1", "c2", 5), *_keys("u2", "c1", 5), "u1/c1/imagesx/a.png"]
    fake = FakeCos(mine + others, next_marker=next_marker)
    storage = make_storage(client=fake)

    assert storage.delete_prefix(image_prefix("u1", "c1")) == 2500
    assert [len(batch) for batch in fake.deletes] == [1000, 1000, 500]
    assert sorted(k for batch in fake.deletes for k in batch) == sorted(mine)
    assert fake.keys == sorted(others)
    assert storage.delete_prefix(image_prefix("u1", "c1")) == 0
    assert len(fake.deletes) == 3


def test_delete_prefix_ignores_foreign_keys_in_a_listing() -> None:
    mine, others = _keys("u1", "c1", 3), _keys("u9", "c9", 3)
    fake = FakeCos(mine + others, leak_foreign=True)
    assert make_storage(client=fake).delete_prefix(image_prefix("u1", "c1")) == 3
    assert fake.keys == sorted(others)


@pytest.mark.parametrize("prefix", ["", "/", "u1", "u1/c1", "../", "u1/../", "u1//"])
def test_delete_prefix_refuses_bad_prefixes(prefix: str) -> None:
    fake = FakeCos(_keys("u1", "c1", 3))
    with pytest.raises(InvalidKey):
        make_storage(client=fake).delete_prefix(prefix)
    assert fake.lists == 0 and fake.deletes == []


def test_delete_prefix_reports_failures() -> None:
    class PartlyFailing(FakeCos):
        def delete_objects(self, Bucket: str, Delete: dict, **kwargs: Any) -> dict:
            super().delete_objects(Bucket, Delete, **kwargs)
            return {"Error": [{"Key": Delete["Object"][0]["Key"], "Code": "AccessDenied"}]}

    class Unreachable(FakeCos):
        def list_objects(self, *args: Any, **kwargs: Any) -> dict:
            raise CosClientError("timeout")

    with pytest.raises(StorageError, match="1 of 3"):
        make_storage(client=PartlyFailing(_keys("u1", "c1", 3))).delete_prefix("u1/c1/images/")
    with pytest.raises(StorageError):
        make_storage(client=Unreachable([])).delete_prefix("u1/c1/images/")


def test_exists() -> None:
    key = make_image_key(USER, CONV, "png")
    storage = make_storage(client=FakeCos([key]))
    assert storage.exists(key)
    assert not storage.exists(make_image_key(USER, CONV, "png"))
    assert not storage.exists("../etc/passwd.png")

    class Forbidden(FakeCos):
        def head_object(self, Bucket: str, Key: str, **_: Any) -> dict:
            raise CosServiceError("HEAD", {"code": "AccessDenied", "message": "", "resource": Key}, 403)

    with pytest.raises(StorageError):
        make_storage(client=Forbidden([key])).exists(key)
