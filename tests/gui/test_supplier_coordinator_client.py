"""The app's coordinator client against a fake coordinator: sign-in, nodes, earnings, errors."""

from __future__ import annotations

import pytest
from supplier_fakes import FakeCoordinator

from supplier_gui.coordinator import (
    CoordinatorClient,
    CoordinatorError,
    EarningsUnavailable,
    Unauthorized,
    parse_earnings,
)


@pytest.fixture
def secured() -> FakeCoordinator:
    fake = FakeCoordinator(accounts={"sup-tok": ("alice", "supplier"), "dev-tok": ("bob", "developer")}).start()
    yield fake
    fake.stop()


def test_open_coordinator(fake_coordinator: FakeCoordinator) -> None:
    fake_coordinator.nodes = [{"name": "box", "peer_id": "n-1", "state": "ready"}]
    client = CoordinatorClient(fake_coordinator.url, "a-token-we-do-not-need")
    result = client.sign_in()
    assert result.auth is False
    assert client.node("box") == {"name": "box", "peer_id": "n-1", "state": "ready"}
    assert client.node("other") is None
    # an open coordinator refuses account tokens, so the client never sent ours
    assert not any(r.startswith("POST") for r in fake_coordinator.requests)
    with pytest.raises(EarningsUnavailable, match="earnings not available from this coordinator"):
        client.earnings()
    fake_coordinator.set_earnings(today=5, week=50, total=500)
    e = client.earnings()
    assert (e.today.amount, e.last_7_days.amount, e.total.amount, e.today.units) == (5, 50, 500, 50)
    assert e.per_job["job-0"].amount == 500


def test_secured_coordinator(secured: FakeCoordinator) -> None:
    with pytest.raises(Unauthorized, match="requires a supplier token"):
        CoordinatorClient(secured.url).sign_in()
    with pytest.raises(Unauthorized, match="unknown account token"):
        CoordinatorClient(secured.url, "wrong").sign_in()
    with pytest.raises(Unauthorized, match="developer account"):
        CoordinatorClient(secured.url, "dev-tok").sign_in()
    client = CoordinatorClient(secured.url, "sup-tok")
    result = client.sign_in()
    assert (result.auth, result.account, result.role) == (True, "alice", "supplier")
    secured.nodes = [{"name": "box"}]
    assert client.nodes() == [{"name": "box"}]
    # the session is reused, and renewed once when the coordinator forgets it (a restart)
    posts = sum(r.startswith("POST") for r in secured.requests)
    client.nodes()
    assert sum(r.startswith("POST") for r in secured.requests) == posts
    secured.sessions.clear()
    assert client.nodes() == [{"name": "box"}]
    assert sum(r.startswith("POST") for r in secured.requests) == posts + 1


def test_unreachable_coordinator() -> None:
    with pytest.raises(CoordinatorError, match=r"cannot reach the coordinator at http://127\.0\.0\.1:9"):
        CoordinatorClient("http://127.0.0.1:9", timeout_s=2).sign_in()


def test_earnings_contract_is_checked() -> None:
    good = {
        "account": "a",
        "today": {"units": 1, "amount": 2},
        "last_7_days": {"units": 1, "amount": 2},
        "total": {"units": 1, "amount": 2},
        "per_job": {},
        "currency_micro": True,
    }
    assert parse_earnings(good).total.amount == 2
    with pytest.raises(CoordinatorError, match="micro-units"):
        parse_earnings({**good, "currency_micro": False})
    with pytest.raises(CoordinatorError, match="integer"):
        parse_earnings({**good, "today": {"units": 1, "amount": 2.5}})
    with pytest.raises(CoordinatorError, match="not an object"):
        parse_earnings({**good, "total": None})
