"""The typed errors a caller can act on.

Every error carries a short machine-readable ``reason`` (stable, used in logs and
metrics) and a human sentence. The CLI turns them into one line and an exit code.
"""

from __future__ import annotations


class EhrnodeError(Exception):
    """Base of every error ehrnode raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CodecError(EhrnodeError):
    """Bytes that are not the canonical CBOR we accept (size, depth, form, trailing bytes)."""

    reason = "codec"


class SchemaError(CodecError):
    """Well-formed CBOR whose shape does not match the expected message."""

    reason = "schema"


class CryptoError(EhrnodeError):
    """A key that cannot be loaded, or a signature that does not verify."""

    reason = "crypto"


class InvalidMessage(EhrnodeError):
    """A consensus message that is well-formed but must not be accepted.

    ``reason`` names the rule it broke (``bad_signature``, ``duplicate_signer``,
    ``unknown_signer``, ``round_too_far``, ...).
    """

    reason = "invalid"


class SafetyViolation(EhrnodeError):
    """The safety rules refused to sign: signing would break a consensus rule."""

    reason = "unsafe"


class KeyUnavailable(EhrnodeError):
    """This member does not hold the epoch key a committed envelope needs: it cannot apply it."""

    reason = "key_unavailable"


class StoreError(EhrnodeError):
    """A persistent store could not be read or written; the node must not go on."""

    reason = "store"


class ConfigError(EhrnodeError):
    """A configuration or genesis file is missing or wrong."""

    reason = "config"


class ProtocolError(EhrnodeError):
    """A peer or client broke the wire protocol (handshake, framing, message order)."""

    reason = "protocol"


class AdmissionError(EhrnodeError):
    """A transaction the mempool will not take: ``reason`` says why (``mempool_full``, ``duplicate``, ...)."""

    reason = "rejected"


class FhirError(EhrnodeError):
    """Input that is not FHIR R4 we accept; the message names the file, line or entry, resource and field."""

    reason = "invalid_fhir"


class DeidentificationError(EhrnodeError):
    """A de-identification profile that cannot be loaded, or a resource it cannot safely release."""

    reason = "deidentification"


class IntegrityError(EhrnodeError):
    """Stored or served data that does not match what was signed or anchored."""

    reason = "integrity"


class PullError(EhrnodeError):
    """A pull that did not deliver a verified record: refused by the owner (``reason`` from its
    access log: consent, policy, erased, not_found...), rejected as not authentic (bad_signature,
    stale, replayed), or not answered (unreachable, timeout)."""

    reason = "pull"

    def __init__(self, message: str, *, reason: str | None = None, access_tx: bytes | None = None) -> None:
        super().__init__(message, reason=reason)
        self.access_tx = access_tx


def innermost(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (or ``exc`` itself).

    trio wraps what escapes a nursery in an ExceptionGroup; callers that handle one kind
    of failure look through it with this.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
