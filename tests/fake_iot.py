"""A loopback stand-in for AWS IoT Core's credentials provider, and the certificates to use it.

    pki = TestPki(tmp_path)                       # a CA, the server's certificate, devices
    device = pki.device("kitchen-pi")             # cert + key signed by the CA
    with FakeIotProvider(pki, {"heimdall-sync": 900}) as iot:
        iot.register(device)                      # the thing, attached to its certificate
        ... sync with iot_endpoint=iot.endpoint, iot_ca=pki.ca_file ...

It speaks the provider's protocol: HTTPS that requires a client certificate signed by
the CA (TLS 1.2+), ``GET /role-aliases/<alias>/credentials`` with the
``x-amzn-iot-thingname`` header, and ``{"credentials": {"accessKeyId",
"secretAccessKey", "sessionToken", "expiration"}}`` for `duration_s` of the alias.
Refusals are JSON ``{"message": ...}`` with ``x-amzn-ErrorType``, as the real one
sends: 404 for an unknown alias, 403 for a thing not attached to the certificate,
400 without the header. `fault` makes it answer 429, 500, garbage, or hang.

`issue` decides what credentials it hands out: random ones by default, or (with moto
under `enable_auth()`) real temporary credentials from moto's STS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import secrets
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

THING_HEADER = "x-amzn-iot-thingname"


@dataclass(frozen=True)
class DeviceCert:
    thing: str
    cert_file: Path
    key_file: Path

    @property
    def fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


class TestPki:
    """A test CA with the provider's server certificate (for 127.0.0.1) and device certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Heimdall Test Root CA")])
        self._ca_cert = (
            self._builder(name, name, self._ca_key.public_key(), days=30)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.server = self._issue(
            "server",
            "127.0.0.1",
            extension=x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(_loopback())]
            ),
        )

    def device(self, thing: str, *, expired: bool = False, name: str | None = None) -> DeviceCert:
        """A device certificate for `thing`, signed by the CA (`expired`: ended yesterday)."""
        return self._issue(name or thing, thing, expired=expired)

    def _issue(
        self,
        stem: str,
        common_name: str,
        *,
        expired: bool = False,
        extension: x509.ExtensionType | None = None,
    ) -> DeviceCert:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(
            subject, self._ca_cert.subject, key.public_key(), days=-1 if expired else 30
        )
        if extension is not None:
            builder = builder.add_extension(extension, critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        cert_file, key_file = self.folder / f"{stem}.pem.crt", self.folder / f"{stem}.pem.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return DeviceCert(common_name, cert_file, key_file)

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public_key: Any, *, days: int
    ) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        start, end = (now - dt.timedelta(days=3), now + dt.timedelta(days=days))
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )


def random_credentials(thing: str, alias: str, duration_s: int) -> dict[str, str]:
    """Credentials of the provider's shape that only the fake knows."""
    expiration = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=duration_s)
    return {
        "accessKeyId": "ASIA" + secrets.token_hex(8).upper(),
        "secretAccessKey": secrets.token_urlsafe(30),
        "sessionToken": secrets.token_urlsafe(60),
        "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass
class Issued:
    thing: str
    alias: str
    status: int
    access_key: str | None = None


@dataclass
class FakeIotProvider:
    pki: TestPki
    aliases: dict[str, int]
    """Role alias -> credential lifetime in seconds."""
    issue: Callable[[str, str, int], dict[str, str]] = random_credentials
    fault: str | None = None
    """None: answer; "429", "500", "garbage", "hang": that instead."""
    requests: list[Issued] = field(default_factory=list)
    _things: dict[str, str] = field(default_factory=dict)
    _server: http.server.ThreadingHTTPServer | None = None
    _release: threading.Event = field(default_factory=threading.Event)

    def register(self, device: DeviceCert) -> None:
        """Attach `device.thing` to its certificate (AttachThingPrincipal)."""
        self._things[device.thing] = device.fingerprint

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def issued(self, status: int = 200) -> list[Issued]:
        return [r for r in self.requests if r.status == status]

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.pki.server.cert_file, self.pki.server.key_file)
        context.load_verify_locations(self.pki.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                provider._answer(self)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.handle_error = lambda request, address: None  # a refused handshake, by design
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- one request ------------------------------------------------------------------------------

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        parts = handler.path.split("/")
        thing = handler.headers.get(THING_HEADER, "")
        alias = parts[2] if len(parts) == 4 and parts[1] == "role-aliases" else ""
        if self.fault == "hang":
            self._release.wait(30)
            return
        if self.fault in ("429", "500"):
            return self._send(handler, Issued(thing, alias, int(self.fault)), "Throttled")
        if len(parts) != 4 or parts[1] != "role-aliases" or parts[3] != "credentials":
            return self._send(handler, Issued(thing, alias, 404), "ResourceNotFound")
        if not thing:
            return self._send(handler, Issued(thing, alias, 400), "InvalidRequest")
        if alias not in self.aliases:
            return self._send(handler, Issued(thing, alias, 404), "Role alias does not exist")
        peer = handler.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if self._things.get(thing) != hashlib.sha256(peer).hexdigest():
            return self._send(handler, Issued(thing, alias, 403), "Access Denied")
        if self.fault == "garbage":
            return self._reply(handler, 200, b'{"credentials": {"accessKeyId": ')
        credentials = self.issue(thing, alias, self.aliases[alias])
        self.requests.append(Issued(thing, alias, 200, credentials["accessKeyId"]))
        self._reply(handler, 200, json.dumps({"credentials": credentials}).encode())

    def _send(self, handler: Any, issued: Issued, message: str) -> None:
        self.requests.append(issued)
        error_type = {400: "InvalidRequestException", 403: "AccessDeniedException",
                      404: "ResourceNotFoundException", 429: "ThrottlingException"}  # fmt: skip
        body = json.dumps({"message": message}).encode()
        self._reply(handler, issued.status, body, error_type.get(issued.status, "InternalFailure"))

    @staticmethod
    def _reply(handler: Any, status: int, body: bytes, error_type: str | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        if error_type:
            handler.send_header("x-amzn-ErrorType", error_type)
        if status == 429:
            handler.send_header("Retry-After", "2")
        handler.end_headers()
        handler.wfile.write(body)


def _loopback() -> Any:
    import ipaddress

    return ipaddress.ip_address("127.0.0.1")
