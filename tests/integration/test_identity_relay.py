"""A tampering signaling relay cannot get between two peers: real aiortc links, two OS processes.

The parent's PeerManager and an echo peer in a child process signal through a relay the test
controls (``EchoProcess(relay_filter=...)``), standing in for a coordinator that rewrites what it
relays. Swapping the DTLS fingerprint in an SDP for another real connection's, answering with a
real attacker connection, or re-signing the swap with the attacker's own key must each make the
link fail the identity check, at once, never reaching DTLS; the same relay passing SDPs through
untouched must connect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from engine.errors import IdentityError, PeerError
from engine.transport.identity import Identity, sign_sdp
from engine.transport.measure import ECHO, EchoProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

Filter = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
#: An identity failure is noticed when the signal arrives: well under any timeout.
FAST_S = 3.0


async def _noop(peer_id: str, data: bytes) -> None:
    return None


async def _other_fingerprints() -> list[str]:
    """The fingerprint lines of a real connection that is not part of the link (the attacker's)."""
    pc = RTCPeerConnection()
    try:
        pc.createDataChannel("kluster")
        await pc.setLocalDescription(await pc.createOffer())
        return [line for line in pc.localDescription.sdp.splitlines() if line.startswith("a=fingerprint:")]
    finally:
        await pc.close()


def _with_fingerprints(sdp: str, fingerprints: list[str]) -> str:
    lines = [line for line in sdp.splitlines() if not line.startswith("a=fingerprint:")]
    at = next(i for i, line in enumerate(lines) if line.startswith("a=setup:"))
    return "\r\n".join(lines[:at] + fingerprints + lines[at:]) + "\r\n"


def _tamper(direction: str, change: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> Filter:
    async def relay(way: str, data: dict[str, Any]) -> dict[str, Any] | None:
        return await change(data) if way == direction else data

    return relay


async def _send_fails_with_identity_error(echo: EchoProcess) -> IdentityError:
    start = time.monotonic()
    with pytest.raises(IdentityError) as err:
        await echo.manager.send(echo.echo_id, ECHO + b"x")
    assert time.monotonic() - start < FAST_S
    assert isinstance(err.value, PeerError)
    assert str(err.value).startswith(f"peer {echo.echo_id} failed identity check: ")
    assert not echo.manager.links() and not echo.manager.is_connected(echo.echo_id)
    return err.value


async def test_an_untampered_relay_connects_and_carries_signed_sdps() -> None:
    seen: list[dict[str, Any]] = []

    async def relay(way: str, data: dict[str, Any]) -> dict[str, Any]:
        seen.append({"way": way, **data})
        return data

    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(peer_id: str, data: bytes) -> None:
        replies.put_nowait(data)

    async with EchoProcess(on_message, connect_timeout=20, relay_filter=relay) as echo:
        await echo.manager.send(echo.echo_id, ECHO + b"through the relay")
        assert await asyncio.wait_for(replies.get(), 20) == ECHO + b"through the relay"
        assert [(s["way"], s["type"]) for s in seen] == [("to_echo", "offer"), ("from_echo", "answer")]
        offer, answer = seen
        assert offer["key"] == echo.identity.public_b64 and answer["key"] != offer["key"]
        assert all(isinstance(s["sig"], str) for s in seen)
        assert echo.manager.bad_signals == 0 and echo.refused.empty()


async def test_an_answer_with_a_swapped_fingerprint_fails_fast_and_the_next_untampered_one_connects() -> None:
    theirs = await _other_fingerprints()
    tampering = True

    async def swap(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "sdp": _with_fingerprints(data["sdp"], theirs)} if tampering else data

    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(peer_id: str, data: bytes) -> None:
        replies.put_nowait(data)

    async with EchoProcess(on_message, connect_timeout=20, relay_filter=_tamper("from_echo", swap)) as echo:
        error = await _send_fails_with_identity_error(echo)
        assert "signature does not cover this link's DTLS fingerprints" in str(error)
        assert echo.manager.bad_signals == 1
        # The failure was the tampering alone: the same relay, honest again, connects.
        tampering = False
        await echo.manager.send(echo.echo_id, ECHO + b"honest")
        assert await asyncio.wait_for(replies.get(), 20) == ECHO + b"honest"


async def test_an_attacker_answering_with_its_own_connection_is_refused() -> None:
    """A full man in the middle: the relay answers our offer from its own RTCPeerConnection (its
    certificate, its candidates) and keeps the echo peer's key and signature."""
    attacker = RTCPeerConnection()
    offers: list[str] = []

    async def note_offer(data: dict[str, Any]) -> dict[str, Any]:
        offers.append(data["sdp"])
        return data

    async def answer_ourselves(data: dict[str, Any]) -> dict[str, Any]:
        await attacker.setRemoteDescription(RTCSessionDescription(sdp=offers[-1], type="offer"))
        await attacker.setLocalDescription(await attacker.createAnswer())
        return {**data, "sdp": attacker.localDescription.sdp}

    async def relay(way: str, data: dict[str, Any]) -> dict[str, Any]:
        return await (note_offer(data) if way == "to_echo" else answer_ourselves(data))

    try:
        async with EchoProcess(_noop, connect_timeout=20, relay_filter=relay) as echo:
            error = await _send_fails_with_identity_error(echo)
            assert "signature does not cover" in str(error)
            await asyncio.sleep(0.5)
            assert attacker.connectionState != "connected"  # our side never even tried its DTLS
    finally:
        await attacker.close()


async def test_an_attacker_resigning_a_swapped_answer_with_its_own_key_is_refused() -> None:
    mallory = Identity.ephemeral()
    theirs = await _other_fingerprints()
    captured: dict[str, str] = {}

    async def resign(data: dict[str, Any]) -> dict[str, Any]:
        sdp = _with_fingerprints(data["sdp"], theirs)
        # A valid signature, by a key the relay holds, over exactly the swapped fingerprints.
        signed = sign_sdp(mallory, "answer", data["link"], captured["echo"], captured["me"], sdp)
        return {**data, "sdp": sdp, **signed}

    async with EchoProcess(_noop, connect_timeout=20, relay_filter=_tamper("from_echo", resign)) as echo:
        captured.update(echo=echo.echo_id, me=echo.self_id)
        error = await _send_fails_with_identity_error(echo)
        assert "its key does not match its peer id" in str(error)


@pytest.mark.parametrize("resign", [False, True], ids=["swapped", "swapped-and-resigned"])
async def test_an_offer_with_a_swapped_fingerprint_is_left_unanswered(resign: bool) -> None:
    mallory = Identity.ephemeral()
    theirs = await _other_fingerprints()
    captured: dict[str, str] = {}

    async def swap(data: dict[str, Any]) -> dict[str, Any]:
        sdp = _with_fingerprints(data["sdp"], theirs)
        out = {**data, "sdp": sdp}
        if resign:
            out.update(sign_sdp(mallory, "offer", data["link"], captured["me"], captured["echo"], sdp))
        return out

    async with EchoProcess(_noop, connect_timeout=2, relay_filter=_tamper("to_echo", swap)) as echo:
        captured.update(echo=echo.echo_id, me=echo.self_id)
        sending = asyncio.create_task(echo.manager.send(echo.echo_id, ECHO + b"x"))
        reason = await asyncio.wait_for(echo.refused.get(), FAST_S)
        assert reason.startswith(f"peer {echo.self_id} failed identity check: ")
        why = "its key does not match its peer id" if resign else "signature does not cover"
        assert why in reason
        # No answer comes back: our connect runs into its timeout (the echo peer opened nothing).
        with pytest.raises(PeerError, match="did not open a link"):
            await sending
