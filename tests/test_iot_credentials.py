"""Per-device credentials from AWS IoT Core's credentials provider.

Against `fake_iot.FakeIotProvider`: real mutual TLS on loopback with a test CA, the
provider's path, header and JSON. End to end, the fake hands out real temporary
credentials from moto's STS for a role whose policy is docs/iam-policy.json for that
thing, and moto checks every signature and permission (`enable_auth`): the dummy
environment key would be refused, so a capture that reaches S3 went up with the
device's own credentials, and the same credentials cannot write another device's prefix.
(moto enforces actions and resources, not the policy's conditions: `s3:prefix` and
`dynamodb:LeadingKeys` are checked in test_iam_policy.py.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from heimdall_edge.cloud.errors import ErrorKind
from heimdall_edge.settings import Settings, SettingsError, load_settings
from heimdall_edge.sync.iot_credentials import (
    REFRESH_BEFORE_S,
    IotCredentialsProvider,
    IotIdentity,
    iot_session,
)
from heimdall_edge.sync.store_errors import StoreError
from heimdall_edge.testing.moto import DEFAULT_REGION, MotoServer, use_aws_test_env
from tests.fake_iot import DeviceCert, FakeIotProvider, TestPki

ALIAS, THING, BUCKET = "heimdall-sync", "kitchen-pi", "heimdall-iot-test"
POLICY = Path(__file__).resolve().parents[1] / "docs" / "iam-policy.json"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def device(pki: TestPki) -> DeviceCert:
    return pki.device(THING)


@pytest.fixture
def iot(pki: TestPki, device: DeviceCert) -> Iterator[FakeIotProvider]:
    with FakeIotProvider(pki, {ALIAS: 900}) as provider:
        provider.register(device)
        yield provider


def identity(iot: FakeIotProvider, pki: TestPki, device: DeviceCert, **change: Any) -> IotIdentity:
    fields = {
        "endpoint": iot.endpoint,
        "role_alias": ALIAS,
        "thing_name": THING,
        "cert": device.cert_file,
        "key": device.key_file,
        "ca": pki.ca_file,
    }
    return IotIdentity(**(fields | change))


def test_fetches_credentials_over_mutual_tls_with_the_thing_name(
    iot: FakeIotProvider, pki: TestPki, device: DeviceCert
) -> None:
    got = IotCredentialsProvider(identity(iot, pki, device)).fetch()
    assert got["access_key"].startswith("ASIA") and got["secret_key"] and got["token"]
    assert [(r.thing, r.alias, r.access_key) for r in iot.requests] == [
        (THING, ALIAS, got["access_key"])
    ]


def bad_inputs(pki: TestPki, device: DeviceCert, tmp: Path) -> dict[str, tuple[dict, str]]:
    """What an operator can get wrong -> (the identity's change, what the error must say)."""
    stranger = TestPki(tmp / "other-ca").device(THING)  # a CA the provider does not know
    other = pki.device("hall-pi", name="hall")
    expired = pki.device(THING, expired=True, name="kitchen-expired")
    not_pem = tmp / "not.pem"
    not_pem.write_text("hello\n")
    return {
        "unknown role alias": ({"role_alias": "nope"}, "no role alias 'nope'.*sync.iot_role_alias"),
        "thing not attached": ({"thing_name": "hall-pi"}, "refused thing 'hall-pi'.*sync.iot_thing_name"),
        "another device's cert": ({"cert": other.cert_file, "key": other.key_file}, "HTTP 403.*sync.iot_cert"),
        "cert of an unknown CA": ({"cert": stranger.cert_file, "key": stranger.key_file}, "refused the device certificate.*sync.iot_cert"),
        "key not matching": ({"key": other.key_file}, "sync.iot_key .* is not the key of sync.iot_cert"),
        "expired cert": ({"cert": expired.cert_file, "key": expired.key_file}, "sync.iot_cert .* expired on"),
        "missing cert": ({"cert": tmp / "gone.pem"}, r"sync.iot_cert \(.*gone.pem\) does not exist"),
        "unreadable key": ({"key": tmp}, r"sync.iot_key \(.*\) cannot be read"),
        "cert not PEM": ({"cert": not_pem}, "sync.iot_cert .* is not a PEM certificate"),
        "key not PEM": ({"key": not_pem}, "sync.iot_key .* is not a usable PEM private key"),
        "CA not PEM": ({"ca": not_pem}, "sync.iot_ca .* holds no usable PEM certificate"),
        "provider not trusted": ({"ca": None}, "certificate the device does not trust.*sync.iot_ca"),
    }  # fmt: skip


def test_every_bad_certificate_key_alias_or_thing_names_the_setting_to_fix(
    iot: FakeIotProvider, pki: TestPki, device: DeviceCert, tmp_path: Path
) -> None:
    for case, (change, expected) in bad_inputs(pki, device, tmp_path).items():
        with pytest.raises(StoreError, match=expected) as caught:
            IotCredentialsProvider(identity(iot, pki, device, **change)).fetch()
        assert caught.value.kind is ErrorKind.AUTH, case
        assert caught.value.service == "iot", case


def test_outages_and_garbage_are_retryable_not_auth(
    iot: FakeIotProvider, pki: TestPki, device: DeviceCert
) -> None:
    provider = IotCredentialsProvider(identity(iot, pki, device), timeout_s=0.5)
    expected = {
        "429": ErrorKind.RATE_LIMIT,
        "500": ErrorKind.SERVER,
        "garbage": ErrorKind.MALFORMED,
        "hang": ErrorKind.TIMEOUT,
    }
    for fault, kind in expected.items():
        iot.fault = fault
        with pytest.raises(StoreError) as caught:
            provider.fetch()
        assert caught.value.kind is kind, fault
    iot.fault = None
    refused = IotCredentialsProvider(identity(iot, pki, device, endpoint="127.0.0.1:9"))
    with pytest.raises(StoreError, match="cannot reach the credentials provider") as caught:
        refused.fetch()
    assert caught.value.kind is ErrorKind.CONNECTION


def test_credentials_are_refreshed_before_they_expire_and_never_logged(
    pki: TestPki, device: DeviceCert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeIotProvider(pki, {ALIAS: REFRESH_BEFORE_S + 2}) as iot:
        iot.register(device)
        session = iot_session(IotCredentialsProvider(identity(iot, pki, device)))
        credentials = session.get_credentials()
        first = credentials.get_frozen_credentials()
        assert credentials.get_frozen_credentials() == first  # still fresh: no new request
        assert len(iot.issued()) == 1
        time.sleep(2.5)  # now inside the refresh margin
        second = credentials.get_frozen_credentials()
        assert second.access_key != first.access_key
        assert len(iot.issued()) == 2
    for secret in (first.secret_key, first.token, second.secret_key, second.token):
        assert secret not in caplog.text


def test_settings_need_every_iot_field_and_the_device_is_its_thing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"

    def load(text: str) -> Settings:
        config.write_text(text)
        return load_settings(config)

    with pytest.raises(SettingsError, match="needs sync.iot_endpoint, sync.iot_role_alias"):
        load(
            f'[sync]\ncredentials = "iot"\niot_thing_name = "{THING}"\niot_cert = "c"\niot_key = "k"\n'
        )
    with pytest.raises(SettingsError, match="iot_endpoint"):
        load('[sync]\niot_endpoint = "https://x.example"\n')  # a host, not a URL
    complete = (
        '[sync]\ncredentials = "iot"\niot_endpoint = "c2ab.credentials.iot.eu-west-1.amazonaws.com"\n'
        f'iot_role_alias = "{ALIAS}"\niot_thing_name = "{THING}"\niot_cert = "c"\niot_key = "k"\n'
    )
    assert load(complete).device_id == THING
    with pytest.raises(SettingsError, match="device_id 'other' differs from sync.iot_thing_name"):
        load('device_id = "other"\n' + complete)


# --- end to end: the real CLI, moto checking every signature ---------------------------------


def moto_issuer(aws: MotoServer, things: list[str]) -> Any:
    """What the real provider does behind TLS: STS AssumeRole for the alias's role, whose
    policy names the thing. moto does not resolve ${credentials-iot:ThingName}, so each
    thing gets a role with its name already in the policy. Call before `enable_auth`."""
    key_id, secret = aws.create_user("iot-credentials-provider", ["sts:AssumeRole"])
    sts = boto3.client(
        "sts", endpoint_url=aws.url, region_name=DEFAULT_REGION,
        aws_access_key_id=key_id, aws_secret_access_key=secret,
    )  # fmt: skip
    iam = aws.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}  # fmt: skip
    roles = {}
    for thing in things:
        role = iam.create_role(RoleName=f"heimdall-{thing}",
                               AssumeRolePolicyDocument=json.dumps(trust))["Role"]  # fmt: skip
        policy = POLICY.read_text().replace("${credentials-iot:ThingName}", thing)
        iam.put_role_policy(RoleName=role["RoleName"], PolicyName="device",
                            PolicyDocument=policy.replace("BUCKET", BUCKET))  # fmt: skip
        roles[thing] = role["Arn"]

    def issue(thing: str, _alias: str, duration_s: int) -> dict[str, str]:
        # STS (and the real provider) issue at least 900 s; a test's shorter lifetime is
        # the expiration the fake announces, so the device refreshes on the test's clock.
        got = sts.assume_role(RoleArn=roles[thing], RoleSessionName=thing,
                              DurationSeconds=max(900, duration_s))["Credentials"]  # fmt: skip
        expiration = datetime.now(UTC) + timedelta(seconds=duration_s)
        return {
            "accessKeyId": got["AccessKeyId"],
            "secretAccessKey": got["SecretAccessKey"],
            "sessionToken": got["SessionToken"],
            "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    return issue


@pytest.fixture
def fleet(
    monkeypatch: pytest.MonkeyPatch, pki: TestPki, device: DeviceCert
) -> Iterator[tuple[MotoServer, FakeIotProvider]]:
    """moto (bucket, no table: capture.json alone describes each capture) behind the fake
    provider, auth on; the environment set as a device of the fleet would have it."""
    use_aws_test_env(monkeypatch)
    with MotoServer() as aws:
        aws.reset()
        aws.create_bucket(BUCKET)
        with FakeIotProvider(pki, {ALIAS: 900}, issue=moto_issuer(aws, [THING, "hall-pi"])) as iot:
            iot.register(device)
            aws.enable_auth()
            for name, value in {
                "HEIMDALL_S3_BUCKET": BUCKET,
                "HEIMDALL_S3_ENDPOINT_URL": aws.url,
                "HEIMDALL_SYNC__REGION": DEFAULT_REGION,
                "HEIMDALL_SYNC__CREDENTIALS": "iot",
                "HEIMDALL_SYNC__IOT_ENDPOINT": iot.endpoint,
                "HEIMDALL_SYNC__IOT_ROLE_ALIAS": ALIAS,
                "HEIMDALL_SYNC__IOT_THING_NAME": THING,
                "HEIMDALL_SYNC__IOT_CERT": str(device.cert_file),
                "HEIMDALL_SYNC__IOT_KEY": str(device.key_file),
                "HEIMDALL_SYNC__IOT_CA": str(pki.ca_file),
            }.items():
                monkeypatch.setenv(name, value)
            yield aws, iot
            aws.disable_auth()


def heimdall(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heimdall_edge.cli", *args],
        check=False, capture_output=True, text=True, timeout=180, env=dict(os.environ),
    )  # fmt: skip


def test_a_fleet_device_syncs_with_its_own_short_lived_credentials_and_only_its_prefix(
    fleet: tuple[MotoServer, FakeIotProvider], clip: Path, pki: TestPki, device: DeviceCert
) -> None:
    aws, iot = fleet
    made = heimdall("demo", "--input", str(clip), "--json")
    assert made.returncode == 0, made.stderr

    done = heimdall("sync", "--once", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["synced"] == 1
    assert [r.thing for r in iot.issued()] == [THING]  # one fetch served the whole pass
    aws.disable_auth()
    keys = [o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]]
    aws.enable_auth()
    # device_id defaulted to the thing name, so everything is under the thing's prefix.
    assert keys and all(key.startswith(f"captures/{THING}/") for key in keys)
    assert any(re.search(r"/capture\.r\d+\.json$", key) for key in keys)
    issued = iot.issued()[0]
    assert issued.access_key not in done.stdout + done.stderr

    # The same credentials cannot forge another device's capture.
    credentials = IotCredentialsProvider(identity(iot, pki, device)).fetch()
    s3 = boto3.client(
        "s3", endpoint_url=aws.url, region_name=DEFAULT_REGION,
        aws_access_key_id=credentials["access_key"], aws_secret_access_key=credentials["secret_key"],
        aws_session_token=credentials["token"],
    )  # fmt: skip
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        s3.put_object(Bucket=BUCKET, Key="captures/hall-pi/2026/12/02/x/audio.wav", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key=f"captures/{THING}/probe.txt", Body=b"x")  # its own: fine


def test_a_bad_key_is_named_in_sync_and_doctor_and_the_captures_wait(
    fleet: tuple[MotoServer, FakeIotProvider],
    clip: Path,
    pki: TestPki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = heimdall("demo", "--input", str(clip), "--json")
    assert made.returncode == 0, made.stderr
    wrong = pki.device("hall-pi", name="hall-e2e")
    monkeypatch.setenv("HEIMDALL_SYNC__IOT_KEY", str(wrong.key_file))

    failed = heimdall("sync", "--once", "--json")
    assert failed.returncode == 1
    assert "sync.iot_key" in json.loads(failed.stdout)["error"]
    doctor = heimdall("doctor")
    sync_line = next(line for line in doctor.stdout.splitlines() if " sync" in line)
    assert "FAIL" in sync_line and "is not the key of sync.iot_cert" in sync_line
    listed = json.loads(heimdall("captures", "--json").stdout)
    assert [c["sync_state"] for c in listed] == ["pending"]

    monkeypatch.setenv(
        "HEIMDALL_SYNC__IOT_KEY", os.environ["HEIMDALL_SYNC__IOT_CERT"][:-4] + ".key"
    )
    done = heimdall("sync", "--once", "--json")
    assert done.returncode == 0, done.stderr
    assert [c["sync_state"] for c in json.loads(heimdall("captures", "--json").stdout)] == [
        "synced"
    ]


def test_the_service_refreshes_its_credentials_before_they_expire(
    fleet: tuple[MotoServer, FakeIotProvider], clip: Path, speech_dir: Path
) -> None:
    aws, iot = fleet
    iot.aliases[ALIAS] = REFRESH_BEFORE_S + 2  # due for refresh 2 s after each fetch
    daemon = subprocess.Popen(
        [sys.executable, "-m", "heimdall_edge.cli", "sync"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HEIMDALL_SYNC__INTERVAL_S": "0.5"},
    )  # fmt: skip
    try:
        for wav in (clip, speech_dir / "sr_english.wav"):
            made = heimdall("demo", "--input", str(wav), "--json")
            assert made.returncode == 0, made.stderr
            deadline = time.monotonic() + 60
            while "pending" in {
                c["sync_state"] for c in json.loads(heimdall("captures", "--json").stdout)
            }:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    daemon.terminate()
                    raise AssertionError("not synced:\n" + daemon.communicate(timeout=60)[1])
                time.sleep(0.5)
            time.sleep(2.5)  # the credentials are now inside their refresh margin
    finally:
        daemon.terminate()
        _out, err = daemon.communicate(timeout=60)
    keys = [r.access_key for r in iot.issued()]
    assert len(keys) >= 2 and len(set(keys)) == len(keys), keys  # fetched again, new each time
    assert all(key not in err for key in keys)
    aws.disable_auth()
    listed = aws.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]
    assert len({o["Key"].split("/")[-2] for o in listed}) == 2  # both captures, both accepted
