"""The `s3` store: any S3-compatible object store (AWS S3, Cloudflare R2, MinIO, GCS
interop) through boto3.

`EMP_STORAGE_URL=s3://bucket/prefix`; `EMP_STORAGE_ENDPOINT_URL` for a store other than
AWS; credentials and region from the standard `AWS_*` variables. An upload streams in
parts (boto3's managed transfer), hashed on the way; an unfinished multipart upload is
never visible. URLs are presigned GETs valid EMP_STORAGE_URL_TTL_S, or
`EMP_STORAGE_PUBLIC_URL` + key when a CDN fronts the bucket. Retention may be left to a
lifecycle rule on the bucket instead of EMP_OUTPUT_RETENTION_DAYS.
"""

from __future__ import annotations

from datetime import datetime
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

from emp_tasks.core.config import ConfigError, Settings
from emp_tasks.storage import HashingReader, Stored

DELETE_BATCH = 1000


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        public_url: str | None = None,
        ttl_s: int = 604_800,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.public_url = public_url.rstrip("/") if public_url else None
        self.ttl_s = min(ttl_s, 604_800)  # SigV4 presigned URLs live at most 7 days
        self.endpoint_url = endpoint_url
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        parts = urlsplit(settings.storage_location)
        if not parts.netloc:
            raise ConfigError("EMP_STORAGE_URL s3://bucket/prefix needs a bucket")
        return cls(
            parts.netloc,
            parts.path,
            endpoint_url=settings.storage_endpoint_url,
            public_url=settings.storage_public_url,
            ttl_s=settings.storage_url_ttl_s,
        )

    def put(self, key: str, stream: IO[bytes], content_type: str) -> Stored:
        reader = HashingReader(stream)
        self.client.upload_fileobj(
            reader, self.bucket, self.prefix + key, ExtraArgs={"ContentType": content_type}
        )
        return Stored(key, self.url(key), content_type, reader.size, reader.sha256)

    def open(self, key: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]

    def url(self, key: str) -> str:
        if self.public_url:
            return f"{self.public_url}/{quote(key)}"
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=self.ttl_s,
        )

    def key_of(self, url: str) -> str | None:
        if self.public_url and url.startswith(self.public_url + "/"):
            return unquote(urlsplit(url).path.removeprefix(urlsplit(self.public_url).path + "/"))
        parts = urlsplit(url)
        ours = urlsplit(self.client.meta.endpoint_url)
        if (parts.scheme, parts.netloc) == (ours.scheme, ours.netloc):
            path = unquote(parts.path).removeprefix("/")
            name = f"{self.bucket}/{self.prefix}"
            return path.removeprefix(name) if path.startswith(name) else None
        if parts.netloc.startswith(f"{self.bucket}.") and parts.netloc.endswith(ours.netloc):
            path = unquote(parts.path).removeprefix("/")
            return path.removeprefix(self.prefix) if path.startswith(self.prefix) else None
        return None

    def delete_older_than(self, cutoff: datetime) -> int:
        deleted = 0
        batch: list[dict[str, str]] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                if item["LastModified"] < cutoff:
                    batch.append({"Key": item["Key"]})
                if len(batch) == DELETE_BATCH:
                    deleted += self._delete(batch)
                    batch = []
        if batch:
            deleted += self._delete(batch)
        return deleted

    def _delete(self, batch: list[dict[str, str]]) -> int:
        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(batch)
