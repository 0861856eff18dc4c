"""NATS identities: each service logs in to NATS as itself and may do only
what it does.

An identity is an nkey (Ed25519): the service holds its seed
(`<data>/nats-identities/<service>.nk`, mode 600, or `IK_NATS_NKEY_SEED_FILE`),
the server only the public keys, in the `authorization` block this module
writes (`python -m services.common.nats_identities`). No password is shared
and the server's configuration holds no secret. With that block the server
refuses anonymous connections.

What each identity may do (PERMISSIONS, for one event prefix):
- publish its own context's events (`ik.<service>.>`), dead letters
  (`ik.deadletter.>`) and, for the executor, its job dispatch messages;
  never another service's subjects;
- the JetStream API: look at the platform's streams and create those that
  are missing (services start in any order), change only its own (so none
  can shrink, seal or purge another's); create, read, pull from and ack only
  its own durable consumers (DURABLES; the resource service also follows the
  blueprint stream with an ordered consumer). No identity may delete or
  purge a stream, delete messages or delete a consumer;
- subscribe only to its own reply inbox (`_INBOX_<service>.>`), where
  JetStream answers it and delivers the messages it pulls.
An `admin` identity (everything) is for operators' tools and tests; no
service uses it.

Events carry signatures as well (services.common.signing): an identity that
leaks still cannot make a consumer apply an event of another service."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nkeys

from services.common.bus import Names
from services.common.config import SERVICES, load_or_create_secret

ADMIN = "admin"
# The durable consumers of each service, on whose streams (a context, or the
# executor's "dispatch" work queue): an identity may create, read, pull from
# and ack only these, never another service's, and delete none.
DURABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "blueprint": (),
    "workflow": (("approval", "workflow-approval-events"), ("executor", "workflow-job-events"),
                 ("resource", "workflow-resource-events")),
    "resource": (("executor", "resource-job-events"), ("approval", "resource-approval-events")),
    "executor": (("dispatch", "executor-workers"),),
    "approval": (("resource", "approval-resource-events"),),
}
# Streams a service follows from the start with an ordered (ephemeral,
# server-named, unacknowledged) consumer: the resource service's catalog copy.
FOLLOWS: dict[str, tuple[str, ...]] = {"resource": ("blueprint",)}
DEFAULT_DIRECTORY = "nats-identities"


def inbox_prefix(service: str) -> str:
    """The reply subjects of one service's connection (its only subscriptions)."""
    return f"_INBOX_{service}"


def seed_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.nk"


def ensure(directory: Path) -> dict[str, str]:
    """Creates the seeds that do not exist yet (mode 600, atomically, so
    processes starting together agree); returns each identity's public key."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    publics = {}
    for name in (*SERVICES, ADMIN):
        seed = load_or_create_secret(directory, seed_file(directory, name).name,
                                     lambda: nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())
        publics[name] = nkeys.from_seed(seed.encode()).public_key.decode()
    return publics


def streams(prefix: str) -> dict[str, str]:
    """Every stream of the platform, by what it holds."""
    names = Names(prefix)
    named = {context: names.context_stream(context) for context in SERVICES}
    named["deadletter"] = names.deadletter_stream
    named["dispatch"] = names.stream("IK_EXECUTOR_JOBS")
    return named


def permissions(service: str, prefix: str = "") -> dict[str, dict[str, list[str]]]:
    every, names = streams(prefix), Names(prefix)
    own = [every[service]] + ([every["dispatch"]] if service == "executor" else [])
    publish = [names.context_subjects(service), names.subject("ik.deadletter.>"), "$JS.API.INFO"]
    if service == "executor":
        publish.append(names.subject("ik.dispatch.>"))
    for stream in every.values():  # any may create a missing stream (services start in any order) ...
        publish += [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}"]
    publish += [f"$JS.API.STREAM.UPDATE.{stream}" for stream in own]  # ... only its own it may change
    for key, durable in DURABLES[service]:
        stream = every[key]
        publish += [f"$JS.API.CONSUMER.CREATE.{stream}.{durable}", f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
                    f"$JS.API.CONSUMER.INFO.{stream}.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
                    f"$JS.ACK.{stream}.{durable}.>"]
    for key in FOLLOWS.get(service, ()):
        stream = every[key]
        publish += [f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.FC.{stream}.>"]
    return {"publish": {"allow": publish, "deny": ["$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
                                                   "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.CONSUMER.DELETE.>"]},
            "subscribe": {"allow": [f"{inbox_prefix(service)}.>"]}}


def _list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def authorization(publics: dict[str, str], prefix: str = "") -> str:
    """The nats-server `authorization` block: every identity with its permissions."""
    users = []
    for name in SERVICES:
        p = permissions(name, prefix)
        users.append(
            f'    # {name}\n'
            f'    {{ nkey: "{publics[name]}", permissions: {{\n'
            f'      publish: {{ allow: {_list(p["publish"]["allow"])}, deny: {_list(p["publish"]["deny"])} }}\n'
            f'      subscribe: {{ allow: {_list(p["subscribe"]["allow"])} }}\n'
            f'    }} }}')
    users.append(f'    # {ADMIN}: operators\' tools and tests, never a service\n    {{ nkey: "{publics[ADMIN]}" }}')
    return "authorization {\n  users = [\n" + ",\n".join(users) + "\n  ]\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Creates the services' NATS identities (nkey seeds, mode 600) "
                                                 "and prints or writes the nats-server authorization block.")
    parser.add_argument("--directory", type=Path, required=True, help="where the seeds are (created)")
    parser.add_argument("--prefix", default="", help="the event prefix (IK_EVENT_PREFIX)")
    parser.add_argument("--out", type=Path, help="write the block here (mode 600) instead of printing it")
    args = parser.parse_args(argv)
    block = authorization(ensure(args.directory), args.prefix)
    if args.out is None:
        sys.stdout.write(block)
        return
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(block)


if __name__ == "__main__":
    main()
