"""The single exception hierarchy of Kluster.

Every failure a user can cause or meet (bad input, a corrupt file, an unreachable peer) is a
``KlusterError`` subclass with a one-line message; the CLI prints that line and exits non-zero
instead of showing a traceback. Anything else escaping is a bug.
"""

from __future__ import annotations


class KlusterError(Exception):
    """Base class: ``str(err)`` is a complete one-line explanation for the user."""

    #: Stable machine-readable code (sent in wire error replies and JSON events).
    code: str = "error"
    #: The node this failure is blamed on, when known (drives failover).
    peer_id: str | None = None


class ConfigError(KlusterError):
    """A bad option, path or configuration value."""

    code = "bad_config"


class ModelNotFoundError(KlusterError):
    """The requested model is neither known, a local folder, nor fetchable."""

    code = "model_not_found"


class ModelFormatError(KlusterError):
    """A model folder or file exists but cannot be understood (unsupported architecture, bad config)."""

    code = "bad_model"


class FragmentError(KlusterError):
    """A fragment is corrupt, incomplete or does not match its manifest."""

    code = "bad_fragment"


class ProtocolError(KlusterError):
    """A received message is malformed (bad framing, dtype, shape, size or values)."""

    code = "bad_message"


class CapacityError(KlusterError):
    """A node has no room for another session (memory budget reached)."""

    code = "node_full"


class SessionError(KlusterError):
    """A message refers to an unknown or expired session, or breaks its order."""

    code = "bad_session"


class SessionLostError(SessionError):
    """A node no longer holds a session's state (it restarted, or the session expired): replayable."""

    code = "session_lost"


class CoordinatorError(KlusterError):
    """The coordinator is unreachable or answered with an error."""

    code = "coordinator"


class NoRouteError(KlusterError):
    """No set of live nodes covers every layer of the requested model."""

    code = "no_route"


class PeerError(KlusterError):
    """A peer could not be reached or stopped answering."""

    code = "peer"


class IdentityError(PeerError):
    """A peer failed the identity check: its key, its peer id and the DTLS fingerprints its
    signaling carries do not all match (see ``engine.transport.identity``)."""

    code = "bad_identity"


class TransportError(KlusterError):
    """A WebRTC link failed to open or broke."""

    code = "transport"


class JobNotFoundError(KlusterError):
    """No job has this id (or it was purged long ago)."""

    code = "job_not_found"


class JobStateError(KlusterError):
    """The requested transition is not allowed from the job's current state (e.g. done after cancel)."""

    code = "bad_job_state"


class QueueFullError(CapacityError):
    """Admission control refused a job: the tenant's or the grid's queue is full."""

    code = "queue_full"


def error_for_code(code: str | None, message: str) -> KlusterError:
    """Rebuild a typed error from a code received over the wire (unknown codes become PeerError)."""
    for cls in (
        ConfigError,
        ModelNotFoundError,
        ModelFormatError,
        FragmentError,
        ProtocolError,
        QueueFullError,
        CapacityError,
        JobNotFoundError,
        JobStateError,
        SessionLostError,
        SessionError,
        CoordinatorError,
        NoRouteError,
        TransportError,
    ):
        if cls.code == code:
            return cls(message)
    return PeerError(message)
