"""TLS for peer links and the local API, with certificates from the consortium's own CA.

Theory of operation
-------------------
``consortium init --tls`` creates a certificate authority for the consortium
(ECDSA P-256; its key is for the consortium's administrators to keep offline)
and, for each member, a key and a certificate whose subject common name is the
member's name. With ``[tls]`` in node.toml:

* peer links are TLS 1.3 with both sides presenting their certificate, each
  verified against the consortium CA. That only proves "some member"; the
  connection is bound to one member by requiring the certificate's name to be
  the name the application handshake then proves with the member's
  genesis-listed Ed25519 key (dialers check it before the handshake, listeners
  after it). A certificate from another CA, none, or another member's, closes
  the connection with a logged reason;
* the local API (``api = true``) is TLS 1.3 with the node's certificate;
  clients verify it against the CA and check that it names the node they meant
  to reach. Users still authenticate with their credentials inside.

TLS adds confidentiality against whoever can read the network between members,
and a second check of who is at the other end; the handshake's signatures
remain what proves membership, and they cover the SHA-256 of both certificates
as each side saw them, so a relay with certificates of its own (minted with the
CA's key) cannot sit between two members.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..crypto import write_secret_file
from ..errors import ConfigError, ProtocolError

CA_YEARS = 10
CERT_YEARS = 3


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def create_ca(directory: Path, consortium: str) -> tuple[Path, Path]:
    """A new consortium CA in ``directory``: ``ca.pem`` (public) and ``ca.key`` (0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(f"{consortium} consortium CA")).issuer_name(_name(f"{consortium} consortium CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    write_secret_file(key_path, _private_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue(ca_cert_path: Path, ca_key_path: Path, member: str, cert_path: Path, key_path: Path) -> None:
    """A key (0600) and a certificate naming ``member``, signed by the consortium CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_path.write_bytes(certificate(ca_cert_path, ca_key_path, member, key.public_key()))
    write_secret_file(key_path, _private_pem(key))


def request(member: str, key_path: Path) -> bytes:
    """A TLS key for ``member`` (written 0600 to ``key_path``) and the certificate signing request
    (PEM) the consortium's CA signs: the key never leaves the member's machine."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(member)).sign(key, hashes.SHA256())
    write_secret_file(key_path, _private_pem(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def check_request(member: str, csr_pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """The public key of ``member``'s certificate signing request (PEM); ConfigError if it is not
    a valid request of ``member``'s, signed by that key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii") if isinstance(csr_pem, str) else csr_pem)
    except ValueError as exc:  # UnicodeEncodeError included: a PEM is ASCII
        raise ConfigError(f"{member}: the TLS certificate request does not parse: {exc}") from exc
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not csr.is_signature_valid or [n.value for n in names] != [member]:
        raise ConfigError(f"{member}: the TLS certificate request is not signed by its key, or names another member")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{member}: the TLS certificate request is not for an ECDSA key")
    return public


def certificate(ca_cert_path: Path, ca_key_path: Path, member: str, public: ec.EllipticCurvePublicKey) -> bytes:
    """A member certificate (PEM) for ``public``, signed by the consortium CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(member)).issuer_name(ca_cert.subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * CERT_YEARS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(member.lower())]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TlsContexts:
    """The SSL contexts of one node: peer links both ways, and the local API."""

    peer_server: ssl.SSLContext
    peer_client: ssl.SSLContext
    api_server: ssl.SSLContext | None
    own: bytes  # SHA-256 of this node's certificate (DER), for the handshake's channel binding

    def channel(self, stream: trio.SSLStream, *, dialer: bool) -> bytes:
        """The channel binding: SHA-256 of the dialer's certificate, then of the listener's."""
        der = stream.getpeercert(binary_form=True)
        if not der:
            raise ProtocolError("the other end presented no TLS certificate", reason="tls")
        theirs = hashlib.sha256(der).digest()
        return self.own + theirs if dialer else theirs + self.own

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path, *, api: bool) -> TlsContexts:
        def context(purpose: ssl.Purpose, *, require_client: bool) -> ssl.SSLContext:
            ctx = ssl.create_default_context(purpose, cafile=str(ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False  # the certificate's name is checked against the member, below
            ctx.verify_mode = ssl.CERT_REQUIRED if purpose is ssl.Purpose.SERVER_AUTH or require_client \
                else ssl.CERT_NONE
            ctx.load_cert_chain(str(cert), str(key))
            return ctx

        try:
            own = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(serialization.Encoding.DER)
            return cls(context(ssl.Purpose.CLIENT_AUTH, require_client=True),
                       context(ssl.Purpose.SERVER_AUTH, require_client=True),
                       context(ssl.Purpose.CLIENT_AUTH, require_client=False) if api else None,
                       hashlib.sha256(own).digest())
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"[tls]: cannot load the CA {ca}, certificate {cert} or key {key}: {exc}") from exc


def client_context(ca: Path) -> ssl.SSLContext:
    """For a client of the local API: the node's certificate must come from the consortium CA."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[tls] ca: cannot load {ca}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    return ctx


def check_certificate(cert: Path, ca: Path, member: str) -> datetime.datetime:
    """ConfigError unless ``cert`` names ``member``, was issued by ``ca`` and both are valid now (caught
    at start, not at the first connection); returns when the first of them expires."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        authorities = x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[tls]: cannot read {cert} or {ca}: {exc}") from exc
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != member:
        raise ConfigError(f"[tls] cert {cert} names {names[0].value if names else 'nobody'!r}, not {member!r}")
    for authority in authorities:  # a CA file may hold more than one CA (during a change of CA)
        try:
            certificate.verify_directly_issued_by(authority)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise ConfigError(f"[tls] cert {cert} was not issued by the CA {ca}")
    now = datetime.datetime.now(datetime.UTC)
    for what, path, c in (("cert", cert, certificate), ("ca", ca, authority)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ConfigError(f"[tls] {what} {path} is valid only from {c.not_valid_before_utc:%Y-%m-%d} to "
                              f"{c.not_valid_after_utc:%Y-%m-%d}: issue a new one from the consortium CA")
    return min(certificate.not_valid_after_utc, authority.not_valid_after_utc)


class Watched(trio.abc.Stream):
    """A TLS stream that notices when the other end refuses it after the handshake.

    With TLS 1.3 a server checks the client's certificate after the client's handshake has
    returned, so a refusal shows up as the first read failing, inside the websocket library's
    reader task, which then just stops. This wrapper keeps that failure and cancels ``scope``,
    so the dialer learns at once, and why, instead of waiting out its timeout.
    """

    def __init__(self, stream: trio.SSLStream, scope: trio.CancelScope) -> None:
        self.stream = stream
        self.scope = scope
        self.failure: BaseException | None = None

    def _failed(self, exc: trio.BrokenResourceError) -> None:
        if self.failure is None:
            self.failure = exc.__cause__ or exc
            self.scope.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self._failed(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._failed(exc)
            raise

    async def aclose(self) -> None:
        await self.stream.aclose()

    def refusal(self) -> ProtocolError | None:
        """Why the other end ended the connection before answering, if it did.

        A TLS 1.3 server that refuses the client's certificate often just closes (its alert is
        not flushed), so an end of stream here, before any answer, is reported as a refusal.
        """
        if self.failure is None:
            return None
        detail = self.failure.reason if isinstance(self.failure, ssl.SSLError) else None
        return ProtocolError("the other end closed the TLS connection before answering: it refused this node's "
                             f"certificate, or trusts another CA ({detail or self.failure})", reason="tls")


def certified_name(stream: trio.SSLStream) -> str | None:
    """The member name the other end's verified certificate carries (None: it presented none)."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def require_name(stream: trio.SSLStream, expected: str) -> None:
    """ProtocolError unless the other end's certificate names ``expected``."""
    found = certified_name(stream)
    if found != expected:
        raise ProtocolError(f"the TLS certificate names {found!r}, not {expected!r}", reason="tls_identity")
