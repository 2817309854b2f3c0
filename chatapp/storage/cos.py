"""Tencent COS through cos-python-sdk-v5: the client talks to COS directly with presigned URLs."""

from __future__ import annotations

import re
from typing import Any

from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosException, CosServiceError

from .base import InvalidKey, Origin, PresignedUpload, Storage, StorageError
from .keys import content_type_for, is_valid_key, is_valid_prefix

DELETE_BATCH = 1000  # the most DeleteObjects (and one ListObjects page) takes
_HOST_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
SECURITY_TOKEN_PARAM = "x-cos-security-token"  # noqa: S105 (a parameter name, not a secret)


def _check_host_parts(bucket: str, region: str, domain: str | None) -> None:
    """They are pasted into a URL's host, so a stray "https://" or "/" must fail loudly here."""
    domain_host, _, domain_port = (domain or "").partition(":")
    if not (_HOST_PART.fullmatch(bucket) and _HOST_PART.fullmatch(region)):
        raise ValueError("bucket and region must be plain names")
    if domain is not None and not (
        _HOST_PART.fullmatch(domain_host) and (not domain_port or domain_port.isdigit())
    ):
        raise ValueError("domain must be a bare host[:port], without scheme or path")


class COSStorage(Storage):
    def __init__(
        self,
        secret_id: str,
        secret_key: str,
        region: str,
        bucket: str,
        *,
        token: str | None = None,
        domain: str | None = None,
        scheme: str = "https",
        client: Any = None,
    ) -> None:
        """bucket is the full name ("name-appid"); domain, if set, is a bare host bound to the bucket."""
        _check_host_parts(bucket, region, domain)
        self.bucket = bucket
        self._origin = Origin.parse(f"{scheme}://{domain or f'{bucket}.cos.{region}.myqcloud.com'}")
        # CosConfig(Token=) only reaches requests the SDK sends itself; get_presigned_url ignores it,
        # so the STS token has to ride in the URL as a (signed) query parameter
        self._params = {SECURITY_TOKEN_PARAM: token} if token else {}
        if client is None:
            config = CosConfig(
                Region=region,
                SecretId=secret_id,
                SecretKey=secret_key,
                Token=token,
                Domain=domain,
                Scheme=scheme,
            )
            client = CosS3Client(config)
        self._client = client

    def _presign(self, method: str, key: str, expires_in: int, headers: dict[str, str]) -> str:
        if not is_valid_key(key):
            raise InvalidKey(f"invalid key: {key!r}")
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        try:
            url: str = self._client.get_presigned_url(
                Bucket=self.bucket,
                Key=key,
                Method=method,
                Expired=expires_in,
                Params=dict(self._params),
                Headers=headers,
            )
        except CosException as exc:
            raise StorageError("could not sign a COS URL") from exc
        return url

    def presign_upload(self, key: str, content_type: str, max_bytes: int, expires_in: int) -> PresignedUpload:
        """A PUT whose signature covers Content-Type.

        COS cannot cap the size of a presigned PUT; max_bytes is checked by whoever later reads the object.
        """
        if content_type != content_type_for(key):
            raise ValueError(f"content type {content_type!r} does not match key {key!r}")
        headers = {"Content-Type": content_type}
        url = self._presign("PUT", key, expires_in, dict(headers))
        return PresignedUpload(key=key, url=url, method="PUT", headers=headers, expires_in=expires_in)

    def presign_download(self, key: str, expires_in: int) -> str:
        return self._presign("GET", key, expires_in, {})

    def key_from_url(self, url_or_key: str) -> str | None:
        return self._origin.key_from_url(url_or_key)

    def size(self, key: str) -> int | None:
        # A presigned PUT cannot cap the size on COS, so the size is checked when a message uses the image.
        if not is_valid_key(key):
            return None
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except CosServiceError as exc:
            if exc.get_status_code() == 404:
                return None
            raise StorageError("COS head_object failed") from exc
        except CosException as exc:
            raise StorageError("COS head_object failed") from exc
        # The SDK answers with the response headers.
        return int(head.get("Content-Length") or head.get("content-length") or 0)

    def delete_prefix(self, prefix: str) -> int:
        if not is_valid_prefix(prefix):
            raise InvalidKey(f"invalid prefix: {prefix!r}")
        deleted = failed = 0
        marker = ""
        try:
            while True:
                listing = self._client.list_objects(
                    Bucket=self.bucket, Prefix=prefix, Marker=marker, MaxKeys=DELETE_BATCH
                )
                listed = [entry["Key"] for entry in listing.get("Contents") or []]
                keys = [key for key in listed if key.startswith(prefix)]
                if keys:
                    result = self._client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Object": [{"Key": key} for key in keys], "Quiet": "true"},
                    )
                    errors = len((result or {}).get("Error") or [])
                    deleted += len(keys) - errors
                    failed += errors
                next_marker = listing.get("NextMarker") or (listed[-1] if listed else "")
                # stop on the last page, and on a listing that would not move forward
                if str(listing.get("IsTruncated", "false")).lower() != "true" or next_marker in ("", marker):
                    break
                marker = next_marker
        except CosException as exc:
            raise StorageError("COS delete failed") from exc
        if failed:
            raise StorageError(
                f"COS refused to delete {failed} of {deleted + failed} objects under the prefix"
            )
        return deleted
