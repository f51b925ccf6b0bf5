"""The socket driver over loopback: handshake, mutual TLS, pre-shared key.

Certificates are made for the test with the openssl command line.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest

from migrator.migration.transport import Auth, Channel, TransportError
from migrator.protocol.connection import State
from migrator.protocol.frames import ProtocolError


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl command missing: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", f"/CN={ca}", "-keyout", f"{ca}.key", "-out",
                 f"{ca}.pem", cwd=d)
    for name, ca in (("node-a", "ca"), ("node-b", "ca"), ("rogue", "otherca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj",
                 f"/CN={name}", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
                 "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "1",
                 "-out", f"{name}.pem", cwd=d)
    return d


def tls(d, name, ca="ca"):
    return Auth(tls_cert=str(d / f"{name}.pem"), tls_key=str(d / f"{name}.key"),
                tls_ca=str(d / f"{ca}.pem"))


def serve_once(auth: Auth):
    """A receiver on loopback doing the handshake; returns (port, result)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    result = {}

    def run():
        try:
            sock, _ = srv.accept()
            try:
                if auth.tls:
                    sock = auth.context(server=True).wrap_socket(
                        sock, server_side=True)
                ch = Channel(sock, auth.connection("receiver", "b"), timeout=5)
                ch.handshake()
                result["state"] = ch.conn.state
            finally:
                sock.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = e
        finally:
            srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, result, t


def connect(port, auth):
    ch = Channel.connect(f"127.0.0.1:{port}", auth, "a", timeout=5)
    state = ch.conn.state
    ch.close()
    return state


def test_mutual_tls_handshake(pki):
    port, result, t = serve_once(tls(pki, "node-b"))
    assert connect(port, tls(pki, "node-a")) is State.READY
    t.join(10)
    assert result.get("state") is State.READY, result


def test_certificate_from_another_ca_is_refused(pki):
    port, result, t = serve_once(tls(pki, "node-b"))
    with pytest.raises((TransportError, ProtocolError)):
        connect(port, tls(pki, "rogue", ca="ca"))
    t.join(10)
    assert "error" in result


def test_client_without_certificate_is_refused(pki):
    port, result, t = serve_once(tls(pki, "node-b"))
    with pytest.raises((TransportError, ProtocolError)):
        connect(port, Auth(insecure=True))
    t.join(10)
    assert "error" in result


def test_psk_handshake_and_wrong_key():
    port, result, t = serve_once(Auth(psk=b"k" * 32))
    assert connect(port, Auth(psk=b"k" * 32)) is State.READY
    t.join(10)
    assert result.get("state") is State.READY
    port, result, t = serve_once(Auth(psk=b"k" * 32))
    with pytest.raises(ProtocolError):
        connect(port, Auth(psk=b"x" * 32))
    t.join(10)
    assert "error" in result


def test_auth_options_are_checked():
    with pytest.raises(ValueError, match="--insecure"):
        Auth().check()
    with pytest.raises(ValueError, match="all of"):
        Auth(tls_cert="c").check()
    Auth(insecure=True).check()
