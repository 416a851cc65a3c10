"""Short-lived AWS credentials from AWS IoT Core's credentials provider.

A device of a fleet holds an X.509 certificate, never long-lived AWS keys. Over mutual
TLS it asks the provider for the credentials of a role alias:

    GET https://<iot_endpoint>/role-aliases/<iot_role_alias>/credentials
    x-amzn-iot-thingname: <iot_thing_name>

and gets ``{"credentials": {"accessKeyId", "secretAccessKey", "sessionToken",
"expiration"}}``. Passing the thing name lets the role's policy name the device
(``${credentials-iot:ThingName}``), so each device reaches only its own prefix and index
partition (docs/iam-policy.json).

`iot_session()` gives a boto3 session whose credentials fetch themselves on first use
and again `REFRESH_BEFORE_S` before they expire (botocore's RefreshableCredentials, in
the thread of the call that needs them: sync runs store calls in worker threads). A
failure is a `StoreError` naming the setting to fix, which the store calls pass on to the
syncer like any other: the captures wait on the device and the breaker backs off.
The certificate and key are read again at every fetch, so replacing them needs no restart.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.credentials
import botocore.session
from cryptography import x509

from heimdall_edge.cloud.errors import ErrorKind
from heimdall_edge.sync.store_errors import StoreError

if TYPE_CHECKING:
    from heimdall_edge.settings import SyncSettings

SERVICE = "iot"
THING_HEADER = "x-amzn-iot-thingname"
REFRESH_BEFORE_S = 5 * 60
"""Fetch new credentials this long before expiry. botocore's default (15 min) would
refetch on every call with the provider's shortest lifetime, 15 min."""
MUST_REFRESH_BEFORE_S = 60
"""Inside this margin every call waits for the new credentials (before it, one thread
fetches while the others go on with the old ones)."""
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class IotIdentity:
    """Who the device is to the credentials provider; from `[sync]` (see `from_settings`)."""

    endpoint: str
    """host or host:port, as `aws iot describe-endpoint --endpoint-type iot:CredentialProvider` gives it."""
    role_alias: str
    thing_name: str
    cert: Path
    key: Path
    ca: Path | None = None
    """Amazon Root CA 1 (or a test CA); None: the system's trust store."""

    @classmethod
    def from_settings(cls, sync: SyncSettings) -> IotIdentity | None:
        """The identity `[sync]` names; None unless credentials = "iot" (the settings
        validator has made sure every field is then set)."""
        if sync.credentials != "iot":
            return None
        assert sync.iot_endpoint and sync.iot_role_alias and sync.iot_thing_name
        assert sync.iot_cert and sync.iot_key
        return cls(
            endpoint=sync.iot_endpoint,
            role_alias=sync.iot_role_alias,
            thing_name=sync.iot_thing_name,
            cert=sync.iot_cert,
            key=sync.iot_key,
            ca=sync.iot_ca,
        )

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.endpoint.partition(":")
        return host, int(port or 443)


class IotCredentialsProvider:
    """Fetches credentials for one identity; every call is one attempt."""

    def __init__(
        self,
        identity: IotIdentity,
        *,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.identity = identity
        self._timeout_s = timeout_s
        self._clock = clock

    def check_files(self) -> None:
        """Raise a StoreError (AUTH) if the certificate or key is missing, unreadable,
        not PEM, expired, or not a pair; or the CA file is unusable. Reads no network."""
        self._tls_context()

    def fetch(self) -> dict[str, str]:
        """One request to the provider: botocore's credential metadata
        (access_key, secret_key, token, expiry_time)."""
        context = self._tls_context()
        host, port = self.identity.host_port
        path = f"/role-aliases/{self.identity.role_alias}/credentials"
        connection = http.client.HTTPSConnection(
            host, port, context=context, timeout=self._timeout_s
        )
        try:
            connection.request("GET", path, headers={THING_HEADER: self.identity.thing_name})
            response = connection.getresponse()
            body = response.read(64 * 1024)
        except ssl.SSLCertVerificationError as exc:
            raise _error(
                ErrorKind.AUTH,
                f"the credentials provider at {self.identity.endpoint} has a certificate "
                f"the device does not trust ({exc.verify_message}): check sync.iot_endpoint "
                "and sync.iot_ca (Amazon Root CA 1) and the device clock",
            ) from None
        except ssl.SSLError as exc:
            raise self._tls_refused(exc) from None
        except TimeoutError:
            raise _error(
                ErrorKind.TIMEOUT,
                f"the credentials provider at {self.identity.endpoint} did not answer in "
                f"{self._timeout_s:g} s: retry later",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _error(
                ErrorKind.CONNECTION,
                f"cannot reach the credentials provider at {self.identity.endpoint} "
                f"({type(exc).__name__}): check the network and sync.iot_endpoint; "
                "captures wait on the device",
            ) from None
        finally:
            connection.close()
        if response.status != 200:
            raise self._refused(response.status, response.headers, body)
        return self._parse(body)

    # --- the answer -----------------------------------------------------------------------------

    def _parse(self, body: bytes) -> dict[str, str]:
        try:
            credentials = json.loads(body)["credentials"]
            metadata = {
                "access_key": str(credentials["accessKeyId"]),
                "secret_key": str(credentials["secretAccessKey"]),
                "token": str(credentials["sessionToken"]),
                "expiry_time": str(credentials["expiration"]),
            }
            expiry = datetime.fromisoformat(metadata["expiry_time"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _error(
                ErrorKind.MALFORMED,
                f"the credentials provider sent an answer we cannot read ({type(exc).__name__}): "
                "retry later",
            ) from None
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
        if expiry <= self._clock():
            raise _error(
                ErrorKind.MALFORMED,
                "the credentials provider sent credentials that expired at "
                f"{expiry:%Y-%m-%d %H:%M:%S}Z: check the device clock (NTP)",
            )
        return metadata

    def _refused(self, status: int, headers: Mapping[str, str], body: bytes) -> StoreError:
        """A non-200 answer, as what to fix. The provider's own message is short, fixed
        text ("Role alias does not exist"), kept for the operator once made printable."""
        said = _provider_message(body)
        alias, thing = self.identity.role_alias, self.identity.thing_name
        if status == 404:
            return _error(
                ErrorKind.AUTH,
                f"the credentials provider has no role alias {alias!r}{said}: fix "
                "sync.iot_role_alias (aws iot list-role-aliases)",
                status=status,
            )
        if status in (400, 401, 403):
            return _error(
                ErrorKind.AUTH,
                f"the credentials provider refused thing {thing!r} the role alias "
                f"{alias!r} (HTTP {status}{said}): check that sync.iot_thing_name is attached "
                "to the certificate sync.iot_cert, that the certificate is active, and that "
                "its IoT policy allows iot:AssumeRoleWithCertificate on the alias",
                status=status,
            )
        if status == 429:
            retry = headers.get("Retry-After")
            return _error(
                ErrorKind.RATE_LIMIT,
                "the credentials provider is throttling this device: retry later",
                status=status,
                retry_after_s=float(retry) if retry and retry.isdigit() else None,
            )
        kind = ErrorKind.SERVER if status >= 500 else ErrorKind.CLIENT
        return _error(kind, f"the credentials provider answered HTTP {status}{said}", status=status)

    def _tls_refused(self, exc: ssl.SSLError) -> StoreError:
        """A TLS alert from the provider: it did not accept the device certificate."""
        reason = exc.reason or type(exc).__name__
        if "EXPIRED" in reason:
            advice = "it has expired: issue a new certificate and update sync.iot_cert"
        elif "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "UNSUPPORTED" in reason:
            advice = (
                "it is not registered or not active in AWS IoT: check sync.iot_cert "
                "(aws iot describe-certificate)"
            )
        else:
            advice = "check sync.iot_cert, sync.iot_key and sync.iot_endpoint"
        return _error(
            ErrorKind.AUTH,
            f"the credentials provider refused the device certificate ({reason}): {advice}",
        )

    # --- the certificate ------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        identity = self.identity
        try:
            context = ssl.create_default_context(cafile=_readable(identity.ca, "sync.iot_ca"))
        except ssl.SSLError as exc:
            raise _error(
                ErrorKind.AUTH,
                f"sync.iot_ca ({identity.ca}) holds no usable PEM certificate ({exc.reason}): "
                "give Amazon Root CA 1 (AmazonRootCA1.pem), or unset it for the system's CAs",
            ) from None
        cert_file = _readable(identity.cert, "sync.iot_cert")
        key_file = _readable(identity.key, "sync.iot_key")
        assert cert_file and key_file
        self._check_not_expired(cert_file)
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_password)
        except ssl.SSLError as exc:
            mismatch = "KEY_VALUES_MISMATCH" in (exc.reason or "")
            raise _error(
                ErrorKind.AUTH,
                f"sync.iot_key ({identity.key}) is not the key of sync.iot_cert ({identity.cert}): "
                "give the private key the certificate was issued for"
                if mismatch
                else f"sync.iot_key ({identity.key}) is not a usable PEM private key "
                f"({exc.reason}): give the unencrypted private key of sync.iot_cert",
            ) from None
        return context

    def _check_not_expired(self, cert_file: str) -> None:
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except ValueError:
            raise _error(
                ErrorKind.AUTH,
                f"sync.iot_cert ({cert_file}) is not a PEM certificate: give the device "
                "certificate AWS IoT issued (certificate.pem.crt)",
            ) from None
        expiry = cert.not_valid_after_utc
        if expiry <= self._clock():
            raise _error(
                ErrorKind.AUTH,
                f"sync.iot_cert ({cert_file}) expired on {expiry:%Y-%m-%d}: issue a new "
                "certificate for the thing and update sync.iot_cert and sync.iot_key",
            )


class _RefreshingCredentials(botocore.credentials.DeferredRefreshableCredentials):
    """Fetched on first use; refreshed `REFRESH_BEFORE_S` before expiry."""

    _advisory_refresh_timeout = REFRESH_BEFORE_S
    _mandatory_refresh_timeout = MUST_REFRESH_BEFORE_S


def iot_session(provider: IotCredentialsProvider) -> boto3.session.Session:
    """A boto3 session whose every client signs with the provider's credentials."""
    # botocore logs each failed refresh as a warning with a traceback; the StoreError it
    # passes on says the same in one line, where the syncer logs it.
    logging.getLogger("botocore.credentials").setLevel(logging.ERROR)
    core = botocore.session.get_session()
    core._credentials = _RefreshingCredentials(provider.fetch, method="iot-credentials-provider")
    return boto3.session.Session(botocore_session=core)


def _error(kind: ErrorKind, message: str, **extra: Any) -> StoreError:
    return StoreError(SERVICE, kind, message, **extra)


def _readable(path: Path | None, setting: str) -> str | None:
    """`path` as a string if it is a readable file; a StoreError naming `setting` if not."""
    if path is None:
        return None
    try:
        with path.open("rb") as file:
            file.read(1)
    except FileNotFoundError:
        problem = "does not exist"
    except PermissionError:
        problem = "is not readable by the service user"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
    else:
        return str(path)
    raise _error(
        ErrorKind.AUTH,
        f"{setting} ({path}) {problem}: put the file there (owned by the service user, "
        "mode 0600 for the key) or fix the path",
    )


def _no_password() -> bytes:
    raise ssl.SSLError("the key is encrypted")


def _provider_message(body: bytes) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(message, str):
        return ""
    printable = "".join(c if c.isprintable() else "?" for c in message[:120])
    return f': "{printable}"'
