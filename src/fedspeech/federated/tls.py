"""Key material for Flower's Deployment Engine: a private CA with a server certificate
(TLS between SuperLink, SuperNodes and ``flwr``), and EC key pairs for SuperNode
authentication.

Why our own: Flower's docs generate these with an openssl shell script that is not part of
the wheel; ``cryptography`` is already installed as a Flower dependency and works offline.
The files are what a real multi-machine federation needs too (see docs/deployment.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """Paths of a generated CA and server certificate (PEM)."""

    ca_cert: Path  # give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile (keep on the SuperLink machine only)


@dataclass(frozen=True)
class SuperNodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format, NIST P-384)."""

    private_key: Path  # flower-supernode --auth-supernode-private-key (stays on the node)
    public_key: Path  # flwr supernode register PUBLIC_KEY (given to the federation owner)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _san_entries(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    """IP addresses become IPAddress SANs, anything else a DNSName: TLS checks the one
    the client dialled, so list every name/IP SuperNodes and ``flwr`` will use."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_self_signed_certs(
    folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365
) -> Certificates:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` into ``folder``.

    ``hosts`` are the addresses SuperNodes and ``flwr`` use to reach the SuperLink (for a
    real deployment: its DNS name and/or public IP).
    """
    if not hosts:
        raise ValueError("make_self_signed_certs: hosts must name at least one host or IP")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedspeech federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certs = Certificates(ca_cert=folder / "ca.crt", server_cert=folder / "server.pem", server_key=folder / "server.key")
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        certs.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return certs


def make_supernode_keys(folder: Path, name: str) -> SuperNodeKeys:
    """Write ``NAME`` (private) and ``NAME.pub`` (public) in OpenSSH format, as
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
    read them (both require a NIST EC curve)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = SuperNodeKeys(private_key=folder / name, public_key=folder / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return keys
