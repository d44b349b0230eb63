"""Create the federation's keys: a CA, the SuperLink's TLS certificate, one SuperNode key pair per
hospital.

Usage (from the repository root)::

    python -m deploy.certs --out /etc/fedmedsegdiff/pki --superlink-host fl.example.org \\
        --superlink-host 127.0.0.1 --site site-a --site site-b --site site-c

Writes::

    ca.crt                 the federation's root certificate: every SuperNode and every `flwr`
                           user gets it (``--root-certificates`` / ``root-certificates``)
    ca.key                 the CA's private key: keep it offline, it signs SuperLink certificates
    superlink.crt/.key     the SuperLink's TLS certificate (SANs: every --superlink-host)
    nodes/<site>           the site's SuperNode authentication key (EC P-384, OpenSSH format),
                           created for the hospital and handed over once; better, the hospital
                           makes its own (``ssh-keygen -t ecdsa -b 384 -N "" -f <site>``) and
                           sends only the ``.pub``
    nodes/<site>.pub       its public key: the coordinator registers it with
                           ``flwr supernode register nodes/<site>.pub <federation>``
    metrics/<name>.crt/.key  with ``--metrics NAME=HOST,...``: an exporter's TLS certificate
                           (``[metrics] tls-cert``/``tls-key``, ``exporter server --tls-cert``)
    prometheus.crt/.key    with ``--scraper``: Prometheus's client certificate, for exporters
                           that require one (``[metrics] client-ca = ca.crt``)

Existing files are kept (run it again to add a site); ``--force`` makes everything anew.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity browsers and most TLS stacks accept for a leaf


@dataclass(frozen=True)
class Pki:
    """Paths of the federation's keys under one folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def node_key(self, site: str) -> Path:
        return self.root / "nodes" / site

    def metrics_cert(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.crt"

    def metrics_key(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.key"

    @property
    def scraper_cert(self) -> Path:
        return self.root / "prometheus.crt"

    @property
    def scraper_key(self) -> Path:
        return self.root / "prometheus.key"

    def node_public_key(self, site: str) -> Path:
        return self.root / "nodes" / f"{site}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedMedSegDiff federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(pki: Pki, *, name: str = "FedMedSegDiff federation CA") -> None:
    """A self-signed CA (EC P-384) that signs only leaf certificates."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(pki.ca_key, _pem_key(key))
    _write_public(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _leaf_cert(
    pki: Pki,
    cert_path: Path,
    key_path: Path,
    common_name: str,
    hosts: Sequence[str],
    usage: x509.ObjectIdentifier,
) -> None:
    """A leaf certificate signed by the CA, for ``usage`` (server or client authentication)."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(pki: Pki, hosts: Sequence[str]) -> None:
    """The SuperLink's TLS certificate, signed by the CA, valid for every name in ``hosts``."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or address")
    _leaf_cert(
        pki, pki.server_cert, pki.server_key, hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH
    )


def make_metrics_cert(pki: Pki, name: str, hosts: Sequence[str]) -> None:
    """An exporter's TLS certificate (``/metrics`` over https), valid for ``hosts``."""
    if not hosts:
        raise ValueError(f"metrics certificate {name!r} needs at least one host name or address")
    _leaf_cert(
        pki,
        pki.metrics_cert(name),
        pki.metrics_key(name),
        hosts[0],
        hosts,
        ExtendedKeyUsageOID.SERVER_AUTH,
    )


def make_scraper_cert(pki: Pki) -> None:
    """Prometheus's client certificate: what exporters with ``client-ca`` ask of a scraper."""
    _leaf_cert(
        pki, pki.scraper_cert, pki.scraper_key, "prometheus", [], ExtendedKeyUsageOID.CLIENT_AUTH
    )


def make_node_key(pki: Pki, site: str) -> None:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(pki.node_key(site), private)
    _write_public(pki.node_public_key(site), public + f" {site}\n".encode())


def create_pki(
    out: Path,
    *,
    hosts: Sequence[str],
    sites: Sequence[str],
    metrics: Mapping[str, Sequence[str]] | None = None,
    scraper: bool = False,
    force: bool = False,
) -> Pki:
    """Everything a federation needs; keeps what exists unless ``force``.

    ``metrics`` (certificate name -> hosts) adds TLS certificates for exporters, ``scraper``
    a client certificate for Prometheus (both signed by the same CA)."""
    pki = Pki(Path(out))
    pki.root.mkdir(parents=True, exist_ok=True)
    for site in sites:
        if not site or Path(site).name != site or site.startswith("."):
            raise ValueError(f"site name {site!r}: use letters, digits, '-' or '_'")
    new_ca = force or not pki.ca_cert.exists()
    if new_ca:
        make_ca(pki)
    if new_ca or not pki.server_cert.exists():
        make_server_cert(pki, list(hosts))
    for site in sites:
        if force or not pki.node_key(site).exists():
            make_node_key(pki, site)
    for name, names in (metrics or {}).items():
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"metrics certificate name {name!r}: use letters, digits, '-' or '_'")
        if new_ca or force or not pki.metrics_cert(name).exists():
            make_metrics_cert(pki, name, list(names))
    if scraper and (new_ca or force or not pki.scraper_cert.exists()):
        make_scraper_cert(pki)
    return pki


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the keys")
    parser.add_argument(
        "--superlink-host",
        action="append",
        default=[],
        help="a DNS name or IP address SuperNodes use to reach the SuperLink (repeatable)",
    )
    parser.add_argument("--site", action="append", default=[], help="hospital name (repeatable)")
    parser.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="NAME=HOST[,HOST...]",
        help="a TLS certificate for an exporter's /metrics, valid for these hosts (repeatable)",
    )
    parser.add_argument(
        "--scraper",
        action="store_true",
        help="a client certificate for Prometheus (for exporters that require one)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing keys")
    args = parser.parse_args(argv)
    hosts = args.superlink_host or ["localhost", "127.0.0.1"]
    metrics = {}
    for item in args.metrics:
        name, sep, names = item.partition("=")
        if not sep or not names:
            parser.error(f"--metrics {item!r}: expected NAME=HOST[,HOST...]")
        metrics[name] = [h for h in names.split(",") if h]
    pki = create_pki(
        args.out,
        hosts=hosts,
        sites=args.site,
        metrics=metrics,
        scraper=args.scraper,
        force=args.force,
    )
    print(f"CA certificate: {pki.ca_cert} (give it to every site and flwr user)")
    print(f"SuperLink TLS:  {pki.server_cert}, {pki.server_key} (for {', '.join(hosts)})")
    for site in args.site:
        print(f"{site}: private {pki.node_key(site)}, public {pki.node_public_key(site)}")
    for name, names in metrics.items():
        print(
            f"metrics {name}: {pki.metrics_cert(name)}, {pki.metrics_key(name)} "
            f"(for {', '.join(names)})"
        )
    if args.scraper:
        print(f"Prometheus client: {pki.scraper_cert}, {pki.scraper_key}")


if __name__ == "__main__":
    main()
