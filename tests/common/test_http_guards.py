"""What the HTTP servers put in front of their apps (common/http_guards.py): the Host check against
DNS rebinding, the deadline for a request's headers, and TLS."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from fedprefix.common.errors import ConfigError
from fedprefix.common.http_guards import HostCheck, allowed_hosts, check_tls, host_name, uvicorn_server


def test_which_host_names_a_server_answers():
    loopback = allowed_hosts("127.0.0.1")
    assert {"localhost", "127.0.0.1", "::1"} <= loopback and "attacker.example" not in loopback
    assert "gateway.lan" in allowed_hosts("::1", ["Gateway.LAN "]) and "::1" in allowed_hosts("[::1]")
    assert allowed_hosts("127.0.0.1", ["*"]) is None  # the operator lets every name in
    assert allowed_hosts("0.0.0.0") is None  # exposed on purpose: any of its names
    assert allowed_hosts("0.0.0.0", ["api.example"]) == {"api.example"}
    assert "proxy.example" in allowed_hosts("127.0.0.1", ["Proxy.Example:8443"])  # compared as a Host header is
    assert allowed_hosts("LOCALHOST.") == allowed_hosts("localhost")  # not mistaken for an exposed address
    assert [host_name(v) for v in (b"LocalHost.:8000", b"[::1]:80", b"::1", b"a.example", b"[::1]evil")] == [
        "localhost",
        "::1",
        "::1",
        "a.example",
        "[::1]evil",
    ]


def guarded_app(allowed) -> FastAPI:
    app = FastAPI()
    app.get("/")(lambda: {"ok": True})
    app.add_middleware(HostCheck, allowed=allowed, refuse=lambda scope, message: JSONResponse({"no": message}, 400))
    return app


def test_a_rebound_name_is_refused_and_loopback_names_answer():
    """A page at attacker.example whose name now points at 127.0.0.1 sends Host: attacker.example."""
    client = TestClient(guarded_app(allowed_hosts("127.0.0.1")))
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        assert client.get("/", headers={"host": host}).json() == {"ok": True}, host
    refused = client.get("/", headers={"host": "attacker.example:8000"})
    assert refused.status_code == 400 and "attacker" not in refused.text and "--allowed-host" in refused.text
    assert TestClient(guarded_app(None)).get("/", headers={"host": "attacker.example"}).status_code == 200


def raw_server(timeout_s: float, expired):
    """A uvicorn server with the headers deadline on a free loopback port (started, then stopped by the caller)."""
    app = FastAPI()
    app.get("/")(lambda: {"ok": True})
    server = uvicorn_server(app, "127.0.0.1", 0, expired=expired, header_timeout_s=timeout_s)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def read_all(connection: socket.socket) -> bytes:
    connection.settimeout(10)
    data = b""
    while chunk := connection.recv(4096):
        data += chunk
    return data


def test_a_request_whose_headers_never_come_whole_is_closed():
    """uvicorn timed a connection only after a response: a silent or half-sent request held it forever."""
    expiries = []
    server, thread, port = raw_server(0.5, lambda: expiries.append(1))
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        assert read_all(silent) == b""  # closed, nothing said to a client that said nothing
        assert read_all(half).startswith(b"HTTP/1.1 408 Request Timeout")
        assert time.monotonic() - started < 5 and len(expiries) == 2
        kept = socket.create_connection(("127.0.0.1", port))  # a whole request, then half of a second one
        kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET / HTTP/1.1\r\nHo")
        answered = read_all(kept)
        assert answered.startswith(b"HTTP/1.1 200 OK") and b"408 Request Timeout" in answered
        idle = socket.create_connection(("127.0.0.1", port))  # answered, then bytes that start no request
        idle.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        idle.settimeout(10)
        assert idle.recv(4096).startswith(b"HTTP/1.1 200 OK")
        idle.sendall(b"\r\n")  # cancelled uvicorn's keep-alive timer, and began no request: held for ever
        assert read_all(idle) == b""
        prompt = socket.create_connection(("127.0.0.1", port))  # and the server serves on
        prompt.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_all(prompt).startswith(b"HTTP/1.1 200 OK")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def self_signed(folder) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(certfile), str(keyfile)


def test_tls_files_are_checked_before_listening_and_then_served(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    check_tls(None, None)
    with pytest.raises(ConfigError, match="needs both --ssl-certfile and --ssl-keyfile"):
        check_tls(certfile, None)
    with pytest.raises(ConfigError, match=f"cannot use {keyfile} with {certfile} for TLS"):
        check_tls(keyfile, certfile)
    with pytest.raises(ConfigError, match="missing.pem is not a file"):
        check_tls(str(tmp_path / "missing.pem"), keyfile)
    key = serialization.load_pem_private_key(open(keyfile, "rb").read(), None)
    encrypted = tmp_path / "encrypted.pem"
    encryption = serialization.BestAvailableEncryption(b"secret")
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    with pytest.raises(ConfigError, match="encrypted.pem is encrypted"):  # OpenSSL had asked on the terminal
        check_tls(certfile, str(encrypted))
    check_tls(certfile, keyfile)

    app = FastAPI()
    app.get("/")(lambda: {"ok": True})
    server = uvicorn_server(app, "127.0.0.1", 0, certfile, keyfile)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        context = ssl.create_default_context(cafile=certfile)
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1])) as plain:
            with context.wrap_socket(plain, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert read_all(tls).startswith(b"HTTP/1.1 200 OK")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
