"""The `s3://` store backend through boto3 (objects, conditional writes, multipart uploads) and pyarrow
(streaming reads), behind the store's circuit breaker (`infra/store_breaker.py`)."""
from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from infra.redact import redact
from infra.settings import Settings
from infra.store_base import (NotFound, ObjectInfo, PreconditionFailed, Store, StoreError, clean_error,
                              transport_error)
from infra.store_breaker import breaker_for

LOG = logging.getLogger(__name__)
MULTIPART_THRESHOLD = 512 * 2**20   # S3 objects above this go up in parts (a single PUT stops at 5 GB)
MULTIPART_PART_BYTES = 64 * 2**20   # 10,000 parts max: 640 GB objects


class S3Store(Store):
    """`s3://bucket/prefix` through boto3 (objects, conditional writes) and pyarrow (streaming)."""

    def __init__(self, uri: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.settings = settings
        self._session = boto3.session.Session(region_name=settings.s3_region)
        cfg = Config(
            retries={"max_attempts": settings.s3_retries, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.s3_endpoint else {},
            connect_timeout=5,
            read_timeout=60,
        )
        self.client = self._session.client("s3", endpoint_url=settings.s3_endpoint, config=cfg)
        self._fs: pafs.S3FileSystem | None = None
        self.breaker = breaker_for(self.uri, settings)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn, **kw):
        """`fn(Bucket=…, **kw)` with errors mapped to StoreError, through the store's breaker: an
        answer from S3 (success, 4xx) closes it; a transport failure or 5xx past the retries counts."""
        self.breaker.before()
        try:
            r = self._call_once(what, key, fn, **kw)
        except StoreError as e:
            if e.transport:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            raise
        self.breaker.succeeded()
        return r

    def _call_once(self, what: str, key: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        try:
            attempt = 0
            for attempt in range(1, max(1, self.settings.s3_retries) + 1):
                try:
                    return fn(Bucket=self.bucket, **kw)
                except HTTPError as e:
                    # botocore reads a non-streamed body (an error document, a listing) after its
                    # retry checks (endpoint.convert_to_response_dict), so a body cut there escapes
                    # as a raw urllib3 error. Such a body is never a completed write's answer (those
                    # are empty): ask again, within the same budget.
                    if attempt >= self.settings.s3_retries:
                        raise transport_error(f"{what} {self.uri_of(key)} failed: response cut after {attempt} "
                                         f"attempts: {clean_error(e)}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                retried = attempt > 1 or e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                raise PreconditionFailed(f"{self.uri_of(key)}: {what} lost (412 precondition failed)",
                                         retried=retried) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object at {self.uri_of(key)}") from None
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist ({self.uri})") from None
            err = StoreError(f"{what} {self.uri_of(key)} failed: {code or status}: "
                             f"{redact(str(e.response.get('Error', {}).get('Message', '')))}")
            err.transport = isinstance(status, int) and status >= 500
            raise err from None
        except BotoCoreError as e:
            raise transport_error(f"{what} {self.uri_of(key)} failed: {clean_error(e)}") from None

    def read_bytes(self, key: str) -> bytes:
        return self.read_with_etag(key)[0]

    def read_with_etag(self, key: str) -> tuple[bytes, str]:
        """GET `key`. botocore retries the request but not the body read that follows it (the
        body streams after the call returns), so a body cut mid-transfer is fetched again here,
        within the same attempt budget (`s3_retries`), then reported as a StoreError."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        self._count_read(key)
        attempts = max(1, self.settings.s3_retries)
        for attempt in range(1, attempts + 1):
            r = self._call("get", key, self.client.get_object, Key=self._k(key))
            try:
                return r["Body"].read(), r["ETag"].strip('"')
            except (BotoCoreError, HTTPError, OSError) as e:
                if attempt == attempts:
                    raise StoreError(f"get {self.uri_of(key)} failed: body cut after {attempts} "
                                     f"attempts: {clean_error(e)}") from None
                LOG.debug("get %s: body read failed (%s), fetching again", self.uri_of(key), type(e).__name__)
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> str:
        """One PUT; above `multipart_threshold` (S3 refuses single PUTs over 5 GB) a multipart upload."""
        if len(data) > self.multipart_threshold:
            import io

            return self._upload(key, io.BytesIO(data))
        self._count_write(key)
        r = self._call("put", key, self.client.put_object, Key=self._k(key), Body=data)
        return r["ETag"].strip('"')

    # -- multipart: large objects go up in parts (boto3 transfer), streamed both ways ---------
    multipart_threshold = MULTIPART_THRESHOLD
    multipart_part_bytes = MULTIPART_PART_BYTES

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_part_bytes, max_concurrency=4, use_threads=True)

    def _upload(self, key: str, fileobj) -> str:
        """Multipart upload (boto3 transfer: parts retried one by one, the upload aborted on failure),
        then one HEAD for the ETag ('<md5 of part md5s>-<parts>')."""
        self._count_write(key)
        self._call("put", key, lambda Bucket, **kw: self.client.upload_fileobj(
            fileobj, Bucket, self._k(key), Config=self._transfer_config()))
        info = self.head(key)
        if info is None:
            raise StoreError(f"put {self.uri_of(key)}: the multipart upload completed but the object is missing")
        return info.etag

    def upload_file(self, key: str, path: str) -> str:
        if os.path.getsize(path) <= self.multipart_threshold:
            with open(path, "rb") as f:
                return self.write_bytes(key, f.read())
        with open(path, "rb") as f:
            return self._upload(key, f)

    def download_file(self, key: str, path: str) -> None:
        self._count_read(key)
        self._call("get", key, lambda Bucket, **kw: self.client.download_file(
            Bucket, self._k(key), path, Config=self._transfer_config()))

    def put_if(self, key: str, data: bytes, *, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        kw: dict = {"Key": self._k(key), "Body": data}
        if if_match is not None:
            kw["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        self._count_write(key)
        try:
            r = self._call("conditional put", key, self.client.put_object, **kw)
        except PreconditionFailed as lost:
            etag = self._landed(key, data, lost)
            if etag is None:
                raise
            return etag
        return r["ETag"].strip('"')

    def _landed(self, key: str, data: bytes, lost: PreconditionFailed) -> str | None:
        """After a 412 on a *retried* conditional PUT: did an earlier attempt of ours land? When the
        response of a PUT that succeeded is lost, botocore retries it and the retry fails its own
        precondition (the ETag moved / the object now exists). If the object now holds exactly
        `data`, that write was ours: return its ETag (success). Callers make their payloads unique
        per writer (CURRENT and _claim.json carry a build id and a timestamp), so equal bytes cannot
        come from a rival. None: the 412 stands (not retried, other bytes, or unreadable)."""
        if not lost.retried:
            return None
        try:
            body, etag = self.read_with_etag(key)
        except StoreError:
            return None
        if body != data:
            return None
        LOG.info("conditional put %s: a retry was refused (412) but the object holds this write's bytes: "
                 "an earlier attempt landed and its response was lost; treated as success", self.uri_of(key))
        return etag

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call("head", key, self.client.head_object, Key=self._k(key))
        except NotFound:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), r["ETag"].strip('"'))

    def list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        full = self._k(prefix)
        token = None
        while True:
            kw = {"Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", prefix, self.client.list_objects_v2, **kw)
            for o in r.get("Contents", []):
                key = o["Key"][len(self.prefix) + 1:] if self.prefix else o["Key"]
                if key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                    continue  # directory markers, temp objects
                out.append(ObjectInfo(key, int(o["Size"]), o["ETag"].strip('"')))
            if not r.get("IsTruncated"):
                break
            token = r["NextContinuationToken"]
        return sorted(out, key=lambda i: i.key)

    def holds_anything(self) -> bool:
        """A missing bucket raises StoreError (say so, rather than 'empty')."""
        kw = {"Prefix": self._k("")} if self.prefix else {}
        r = self._call("list", "", self.client.list_objects_v2, MaxKeys=1, **kw)
        return bool(r.get("Contents"))

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._k(key))

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            creds = self._session.get_credentials()
            kw = {}
            if creds is not None:
                fc = creds.get_frozen_credentials()
                kw = {"access_key": fc.access_key, "secret_key": fc.secret_key}
                if fc.token:
                    kw["session_token"] = fc.token
            if self.settings.s3_endpoint:
                ep = urlparse(self.settings.s3_endpoint)
                kw["endpoint_override"] = ep.netloc
                kw["scheme"] = ep.scheme or "http"
            self._fs = pafs.S3FileSystem(
                region=self.settings.s3_region,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.settings.s3_retries),
                connect_timeout=5, request_timeout=60, **kw)
        return self._fs, f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (dev servers only; production buckets are provisioned)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)
