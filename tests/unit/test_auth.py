import time

import pytest

from services.common import auth, errors

SECRET = "unit-test-secret-of-thirty-two-bytes!"


def test_token_round_trip_carries_user_and_role():
    token = auth.mint_token(SECRET, "bob", auth.Role.WRITE)
    principal = auth.verify_token(SECRET, token)
    assert principal == auth.Principal("bob", auth.Role.WRITE)


def test_token_signed_with_another_secret_is_refused():
    token = auth.mint_token(SECRET, "bob", auth.Role.ADMIN)
    with pytest.raises(errors.Unauthenticated) as info:
        auth.verify_token(SECRET + "x", token)
    assert info.value.reason == "TOKEN_INVALID"


def test_expired_token_is_refused():
    token = auth.mint_token(SECRET, "bob", auth.Role.ADMIN, ttl_seconds=-10)
    with pytest.raises(errors.Unauthenticated) as info:
        auth.verify_token(SECRET, token)
    assert info.value.reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer not.a.jwt"])
def test_malformed_authorization_metadata_is_unauthenticated(header):
    with pytest.raises(errors.Unauthenticated):
        auth.principal_from_metadata(SECRET, header)


def test_roles_are_ordered_read_write_admin():
    reader = auth.Principal("r", auth.Role.READ)
    admin = auth.Principal("a", auth.Role.ADMIN)
    assert admin.has(auth.Role.WRITE) and admin.has(auth.Role.READ)
    assert not reader.has(auth.Role.WRITE)
    with pytest.raises(errors.PermissionDenied) as info:
        auth.require_role(reader, auth.Role.WRITE, "CreateTemplate")
    assert "write" in info.value.message and info.value.metadata["required_role"] == "write"


def test_token_expiry_is_in_the_future_by_ttl():
    import jwt
    token = auth.mint_token(SECRET, "bob", auth.Role.READ, ttl_seconds=60)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert 55 <= claims["exp"] - time.time() <= 61
