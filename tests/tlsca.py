"""A throwaway certificate authority for the TLS tests (the openssl CLI).

    ca = TestCA(tmp_path)                    # ca.pem + ca.key, valid two days
    cert, key = ca.issue("srv", serial=1)    # a certificate for localhost / 127.0.0.1
    ctx = ca.client_context()                # an ssl client context trusting only this CA

Keys are EC P-256 (fast to make and to handshake with); ``issue(..., rsa=True)``
makes an RSA 2048 one.
"""

from __future__ import annotations

import os
import ssl
import subprocess


def _run(*args) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


class TestCA:
    __test__ = False            # not a pytest test class

    def __init__(self, path) -> None:
        self.dir = str(path)
        os.makedirs(self.dir, exist_ok=True)
        self.cert = os.path.join(self.dir, "ca.pem")
        self.key = os.path.join(self.dir, "ca.key")
        _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", self.key, "-out", self.cert, "-days", "2", "-subj", "/CN=imd test CA")

    def issue(self, name: str, serial: int = 1, rsa: bool = False) -> tuple[str, str]:
        """A server certificate for localhost and 127.0.0.1 signed by this CA: (cert, key) paths."""
        cert, key, csr = (os.path.join(self.dir, name + ext) for ext in (".pem", ".key", ".csr"))
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=serverAuth\n")
        newkey = ["rsa:2048"] if rsa else ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        _run("openssl", "req", "-newkey", *newkey, "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
        _run("openssl", "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-set_serial", str(serial),
             "-out", cert, "-days", "2", "-extfile", ext)
        return cert, key

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)


def serial_of(tls_sock) -> int:
    """The serial number of the certificate a verified TLS connection's server showed."""
    return int(tls_sock.getpeercert()["serialNumber"], 16)
