"""Signed events: every event a service publishes carries its signature, and
every consumer checks it before the event can change anything.

A service signs with its own Ed25519 key (the one that signs its calls,
services.common.identities) the event's subject as published, its signer's
name and the whole payload (the envelope: body, event id, time, actor,
correlation). Two headers carry it: `Ik-Signer` (the service) and
`Ik-Signature` (base64url). A consumer accepts an event only when

- both headers are there (`unsigned` otherwise),
- the signer is a known service whose public key it has (`unknown_signer`),
- the signer owns the subject: only the executor publishes `ik.executor.*`
  (and its job dispatch, `ik.dispatch.*`), only the approval service
  `ik.approval.*`, and so on (`wrong_signer`),
- the signature matches subject, signer and payload (`bad_signature`).

Anything else is dead-lettered with a warning and counted
(`ik_events_rejected_total{consumer,reason}`): a client that can publish on
NATS (anonymous, a leaked credential of another service, or a copy of a real
event moved to another subject) changes nothing. A replayed event, signed and
unchanged, is the event already applied: the consumer's inbox drops it."""
from __future__ import annotations

import base64
import binascii
import logging

from cryptography.exceptions import InvalidSignature

from services.common import metrics
from services.common.bus import Names
from services.common.errors import Unauthenticated
from services.common.events import context_of
from services.common.identities import CALLERS, ServiceIdentity

log = logging.getLogger(__name__)

SIGNER_HEADER = "Ik-Signer"
SIGNATURE_HEADER = "Ik-Signature"
_DOMAIN = b"infrakitchen-event-v1\0"  # a signature made for this, never mistaken for another use of the key

UNSIGNED, UNKNOWN_SIGNER, WRONG_SIGNER, BAD_SIGNATURE = "unsigned", "unknown_signer", "wrong_signer", "bad_signature"
REASONS = (UNSIGNED, UNKNOWN_SIGNER, WRONG_SIGNER, BAD_SIGNATURE)
SERVICES = frozenset(CALLERS)
# Subjects that are not a context's events, and the service that owns them.
OWNERS = {"dispatch": "executor"}


def _signed_bytes(signer: str, subject: str, payload: bytes) -> bytes:
    return b"".join((_DOMAIN, signer.encode(), b"\0", subject.encode(), b"\0", payload))


class EventSigner:
    """Signs what one service publishes."""

    def __init__(self, identity: ServiceIdentity):
        self.identity = identity

    def headers(self, subject: str, payload: bytes) -> dict[str, str]:
        signature = self.identity.sign(_signed_bytes(self.identity.service, subject, payload))
        return {SIGNER_HEADER: self.identity.service,
                SIGNATURE_HEADER: base64.urlsafe_b64encode(signature).decode().rstrip("=")}


class EventVerifier:
    """Checks that an event was published by the service that owns its subject."""

    def __init__(self, identity: ServiceIdentity, names: Names):
        self.identity = identity
        self.names = names

    def refuses(self, msg, consumer: str) -> str | None:
        """Why a NATS message is refused (warned and counted for `consumer`),
        or None when it is genuine; what happens to a refused one is the caller's."""
        if (reason := self.rejects(msg.subject, msg.headers, msg.data)) is not None:
            signer = (msg.headers or {}).get(SIGNER_HEADER, "")
            log.warning("%s: message on %s refused (%s, signer %r)", consumer, msg.subject[:200], reason,
                        signer[:64])
            metrics.EVENTS_REJECTED.labels(consumer, reason).inc()
        return reason

    def rejects(self, subject: str, headers: dict[str, str] | None, payload: bytes) -> str | None:
        """Why the event is refused (one of REASONS), or None when it is genuine."""
        headers = headers or {}
        signer, encoded = headers.get(SIGNER_HEADER, ""), headers.get(SIGNATURE_HEADER, "")
        if not signer or not encoded:
            return UNSIGNED
        if signer not in SERVICES:
            return UNKNOWN_SIGNER
        try:
            context = context_of(self.names.unprefixed(subject))
        except ValueError:
            return WRONG_SIGNER
        owner = OWNERS.get(context, context)
        if owner != signer:
            return WRONG_SIGNER
        try:
            signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            key = self.identity.public_key(signer)
        except (binascii.Error, ValueError):
            return BAD_SIGNATURE
        except Unauthenticated:  # no public key of that service here
            return UNKNOWN_SIGNER
        try:
            key.verify(signature, _signed_bytes(signer, subject, payload))
        except InvalidSignature:
            return BAD_SIGNATURE
        return None
