"""Throwaway certificates for the tests' TLS servers, made with the openssl command (as
tests/e2e/test_redis_tls_ha.py does): a CA, and a server certificate it signs for
`localhost` and 127.0.0.1. `trustme` would do the same but is not a dependency; openssl is
on every machine the TLS tests run on (they skip without it).

Dev tooling: not on the product's import path.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from devtools.rabbitmq import TlsFiles


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA `name` valid for a day; its certificate's path (key beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt"


def make_server(directory: Path, ca: Path, name: str = "server") -> TlsFiles:
    """A server certificate signed by `ca` for DNS:localhost and IP:127.0.0.1."""
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", "/CN=localhost", cwd=directory,
    )  # fmt: skip
    (directory / f"{name}-san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}-san.cnf",
        cwd=directory,
    )  # fmt: skip
    for file in (f"{name}.key", f"{name}.crt"):  # the node reads them as the caller
        (directory / file).chmod(0o644)
    return TlsFiles(ca=ca, certificate=directory / f"{name}.crt", key=directory / f"{name}.key")
