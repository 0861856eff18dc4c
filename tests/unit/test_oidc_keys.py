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


def test_each_cloud_gets_its_standard_variables(tmp_path):
    import json

    from services.executor.adapters.oidc import check_federation, federation_env
    token = tmp_path / "oidc-token.jwt"
    aws = federation_env({"cloud": "aws", "role_arn": "arn:aws:iam::1:role/r"}, token, tmp_path, "job-1")
    assert aws == {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": "arn:aws:iam::1:role/r",
                   "AWS_ROLE_SESSION_NAME": "infrakitchen-job-1"}
    azure = federation_env({"cloud": "azure", "azure_client_id": "c", "azure_tenant_id": "t"}, token, tmp_path, "j")
    assert azure == {"ARM_USE_OIDC": "true", "ARM_OIDC_TOKEN_FILE_PATH": str(token), "ARM_CLIENT_ID": "c",
                     "ARM_TENANT_ID": "t"}
    provider = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/ik"
    google = federation_env({"cloud": "google", "audience": provider, "service_account_email": "sa@p.iam"},
                            token, tmp_path, "j")
    config = json.loads(open(google["GOOGLE_APPLICATION_CREDENTIALS"]).read())
    assert config["audience"] == provider and config["credential_source"] == {"file": str(token)}
    assert config["service_account_impersonation_url"].endswith("sa@p.iam:generateAccessToken")
    assert (tmp_path / "google-external-account.json").stat().st_mode & 0o777 == 0o600
    assert federation_env({"cloud": "generic", "audience": "a"}, token, tmp_path, "j") == {
        "IK_OIDC_TOKEN_FILE": str(token)}
    problems = dict(check_federation({"cloud": "generic", "audience": "a\nb", "token_file_env": "LD_PRELOAD"}))
    assert set(problems) == {"integration.oidc.audience", "integration.oidc.token_file_env"}
    assert "integration.oidc.role_arn" in dict(check_federation({"cloud": "aws"}))


def test_a_token_names_what_a_service_that_knows_says_the_job_is_for():
    from services.executor.app.runs import _claims
    from services.executor.domain.model import Correlation, Integration, Job, Source
    integration = Integration("int-1", "aws", "", "oidc", {}, oidc={"cloud": "aws", "role_arn": "arn:x"})

    def job(via: str, **correlation) -> Job:
        return Job(id="job-1", action="plan", source=Source("u", "v1", ""), variables={}, sensitive_variables=[],
                   integration_ids=["int-1"], secret_ids=[], storage_id="", state_path="s",
                   correlation=Correlation(**correlation), creator="alice", attempt=1, via=via)
    named = {"resource_id": "r-1", "template_id": "t-1", "workflow_id": "w-1", "step_id": "s-1"}
    resources = _claims(job("resource", **named), integration)
    assert resources["sub"] == "integration:int-1:resource:r-1" and resources["template_id"] == "t-1"
    assert resources["aud"] == "sts.amazonaws.com"
    plan = _claims(job("workflow", **{**named, "resource_id": ""}), integration)
    assert plan["sub"] == "integration:int-1:workflow:w-1:step:s-1" and plan["step_id"] == "s-1"
    users = _claims(job("", **named), integration)
    assert users["sub"] == "integration:int-1:job:job-1"
    assert (users["resource_id"], users["template_id"], users["workflow_id"], users["step_id"]) == ("", "", "", "")
