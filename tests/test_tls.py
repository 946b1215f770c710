"""TLS and mutual TLS on the gateway, with certificates made for the test."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.settings import CoordinatorSettings, GatewaySettings
from fedq.config import SettingsError
from fedq.plan import TrainingPlan
from fedq.tls import ClientTls, ServerTls
from proto import fedq_v1_pb2 as pb
from proto import fedq_v1_pb2_grpc as pb_grpc
from tests.support import start_stack

_SETTINGS = CoordinatorSettings(
    rounds=1, clients_per_round=1, evaluate=False, plan=TrainingPlan(round=0, dp_mode="none")
)


def _certificate(name: str, key, *, issuer=None, issuer_key=None, ca: bool = False, san=()):
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("fedq test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "localhost", server_key, issuer=ca, issuer_key=ca_key, san=[x509.DNSName("localhost")]
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("client-a", client_key, issuer=ca, issuer_key=ca_key)
    paths = {"ca": _write(folder, "ca", ca, ca_key)[0]}
    paths["server_cert"], paths["server_key"] = _write(folder, "server", server, server_key)
    paths["client_cert"], paths["client_key"] = _write(folder, "client", client, client_key)
    return paths


async def _join(port: int, credentials: grpc.ChannelCredentials | None) -> pb.JoinReply:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    try:
        stub = pb_grpc.FederationStub(channel)
        return await stub.Join(pb.JoinRequest(client_id="tls-client", num_examples=10), timeout=10)
    finally:
        await channel.close()


async def test_a_tls_gateway_serves_clients_that_trust_its_ca_and_refuses_plaintext(
    redis, queue, pki
):
    tls = ServerTls(cert=pki["server_cert"], key=pki["server_key"])
    stack = await start_stack(
        redis,
        queue,
        clients=[],
        settings=_SETTINGS,
        gateway_settings=replace(GatewaySettings(), tls=tls),
    )
    try:
        reply = await _join(stack.gateway.port, ClientTls(ca=pki["ca"]).credentials())
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await _join(stack.gateway.port, None)
    finally:
        await stack.close()

    assert reply.token
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(redis, queue, pki):
    tls = ServerTls(cert=pki["server_cert"], key=pki["server_key"], client_ca=pki["ca"])
    stack = await start_stack(
        redis,
        queue,
        clients=[],
        settings=_SETTINGS,
        gateway_settings=replace(GatewaySettings(), tls=tls),
    )
    try:
        with_cert = await _join(
            stack.gateway.port,
            ClientTls(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]).credentials(),
        )
        with pytest.raises(grpc.aio.AioRpcError) as without_cert:
            await _join(stack.gateway.port, ClientTls(ca=pki["ca"]).credentials())
    finally:
        await stack.close()

    assert with_cert.token
    assert without_cert.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_must_come_in_pairs_and_files_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="FEDQ_TLS_CERT and FEDQ_TLS_KEY"):
        ServerTls(cert="a.crt")
    with pytest.raises(SettingsError, match="FEDQ_TLS_CLIENT_CA"):
        ServerTls(client_ca="ca.crt")
    with pytest.raises(SettingsError, match="cannot read the PEM file"):
        ServerTls(cert=str(tmp_path / "no.crt"), key=str(tmp_path / "no.key")).credentials()
