"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, and
SuperNode key pairs for node authentication.

Made with the ``cryptography`` package (already installed with Flower), for testing
and small deployments; a production federation should use its own PKI. The CA signs
a server certificate whose subject alternative names are the hosts SuperNodes dial.
Node keys are ECDSA on SECP384R1, the public key in OpenSSH format, which is what
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
take.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smallfed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey,
                   fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    """Created owner-only from the start, and never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, fmt,
                                   serialization.NoEncryption()))


def make_certificates(out_dir: str | Path, hosts: list[str]) -> dict[str, Path]:
    """ca.crt, ca.key, server.pem, server.key in ``out_dir``; the server valid for ``hosts``
    (names or IP addresses). Refuses to overwrite existing files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"would overwrite {', '.join(existing)}; choose another folder")
    if not hosts:
        raise ValueError("give at least one host the SuperNodes will dial, e.g. localhost")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("smallfed CA"))
          .issuer_name(_name("smallfed CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca.key"], ca_key)
    paths["server.pem"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server.key"], server_key)
    return paths


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """``<name>`` (private, PEM) and ``<name>.pub`` (OpenSSH) for one SuperNode."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"--name {name!r}: a plain file name, without folders")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / name, out / f"{name}.pub"
    if private.exists() or public.exists():
        raise FileExistsError(f"would overwrite {private}; choose another name")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public
