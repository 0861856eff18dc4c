"""The OIDC issuer's keys (services/executor/adapters/oidc.py): a new one when
the newest is due, the old one published while its tokens may live, then
forgotten; tokens signed by the newest."""
from __future__ import annotations

import datetime as dt

import jwt

from services.executor.adapters.oidc import MAX_TOKEN_SECONDS, PUBLISH_AHEAD, OidcIssuer, OidcSettings


class FakeKeys:
    def __init__(self):
        self.rows: list[tuple[str, bytes, dt.datetime]] = []

    async def all(self):
        return sorted(self.rows, key=lambda r: r[2], reverse=True)

    async def add(self, kid, pem, now):
        self.rows.append((kid, pem, now))

    async def delete(self, kid):
        self.rows = [r for r in self.rows if r[0] != kid]


class FakeUow:
    def __init__(self, keys: FakeKeys):
        self.oidc_keys = keys

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def commit(self):
        pass


T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


async def test_keys_rotate_and_old_ones_stay_published_while_their_tokens_may_live():
    keys = FakeKeys()
    issuer = OidcIssuer(OidcSettings("https://ik.example", 0, 7 * 24 * 3600), vault=None)
    uow = FakeUow(keys)
    await issuer.rotate(uow, T0)
    first = [k["kid"] for k in issuer.published()["keys"]]
    assert len(first) == 1
    await issuer.rotate(uow, T0 + dt.timedelta(days=6))
    assert [k["kid"] for k in issuer.published()["keys"]] == first  # not due yet

    await issuer.rotate(uow, T0 + dt.timedelta(days=7))
    published = [k["kid"] for k in issuer.published()["keys"]]
    assert len(published) == 2 and published[1] == first[0]  # the newest first; the old one still verifies

    # The new key signs once every replica and cloud had time to see it published.
    early = await issuer.mint(lambda: FakeUow(keys), {"sub": "resource:r", "aud": "a"}, 300,
                              T0 + dt.timedelta(days=7, seconds=PUBLISH_AHEAD - 1))
    assert jwt.get_unverified_header(early)["kid"] == first[0]
    token = await issuer.mint(lambda: FakeUow(keys), {"sub": "resource:r", "aud": "a"}, 300,
                              T0 + dt.timedelta(days=7, seconds=PUBLISH_AHEAD))
    assert jwt.get_unverified_header(token)["kid"] == published[0]

    # Once no token the old key signed can be valid, it is gone.
    await issuer.rotate(uow, T0 + dt.timedelta(days=7, seconds=PUBLISH_AHEAD + MAX_TOKEN_SECONDS + 601))
    assert [k["kid"] for k in issuer.published()["keys"]] == published[:1]
    assert len(keys.rows) == 1


async def test_a_token_lives_as_long_as_the_job_may_run_at_most_a_day():
    keys = FakeKeys()
    issuer = OidcIssuer(OidcSettings("https://ik.example", 0, 7 * 24 * 3600), vault=None)
    short = await issuer.mint(lambda: FakeUow(keys), {"sub": "x", "aud": "a"}, 900, T0)
    long = await issuer.mint(lambda: FakeUow(keys), {"sub": "x", "aud": "a"}, 10 * 24 * 3600, T0)
    claims = [jwt.decode(t, options={"verify_signature": False}) for t in (short, long)]
    assert [c["exp"] - c["iat"] for c in claims] == [900, MAX_TOKEN_SECONDS]
    assert all(c["iss"] == "https://ik.example" for c in claims)
