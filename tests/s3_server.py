"""An S3 server on loopback for tests and benchmarks: moto's server mode, started and ended by its PID.

`S3Server()` picks a free port on 127.0.0.1 (or takes `endpoint`), `start()` waits until it answers, `stop()`
ends it. `env` holds what a client needs to reach it through the standard variables: `AWS_ENDPOINT_URL`
and test credentials (pyarrow, boto3 and Ray's workers all read them).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    def __init__(self, endpoint: str | None = None, log_path: str = os.devnull):
        self.endpoint = endpoint or f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        command = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if command is None:
            raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (the dev extra has it)")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([command, "-H", "127.0.0.1", "-p", self.endpoint.rsplit(":", 1)[1]],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return self
            except urllib.error.HTTPError:  # it answers: it is up
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None

    def create_bucket(self, prefix: str = "raylm-test") -> str:
        """A new, empty bucket: `s3://<prefix>-<id>`."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        ).create_bucket(Bucket=name)
        return f"s3://{name}"
