"""The Terraform provider of the test cloud (tests/testcloud/cloud.py),
written with `tf` (PyPI: a small framework whose only dependencies, grpcio,
protobuf, msgpack and cryptography, are the platform's own; it speaks
plugin protocol 6, which Terraform 1.0+ and OpenTofu run).

Address: infrakitchen.test/ik/testcloud. Resources: testcloud_network,
testcloud_bucket, testcloud_database. Settings (provider block, or the
environment an integration gives the job): `endpoint` / TESTCLOUD_ENDPOINT,
`token` / TESTCLOUD_TOKEN, `token_file` / TESTCLOUD_TOKEN_FILE (read at each
call: a short-lived token file may be renewed).

A 503 or 429 from the cloud fails the call with the cloud's words and its
Retry-After, as real providers do once their own retries are spent (this one
has none), so the platform's retry policy is what retries it.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "site")]  # its packages travel with it (see build.py)

from testcloud_client import Client, CloudCallFailed  # noqa: E402
from tf import runner, schema, types  # noqa: E402
from tf.iface import (Config, CreateContext, DeleteContext, Provider, ReadContext, Resource, State,  # noqa: E402
                      UpdateContext)
from tf.utils import Diagnostics  # noqa: E402

ADDRESS = "infrakitchen.test/ik/testcloud"


class _CloudResource(Resource):
    kind = ""  # the cloud's collection
    fields: tuple[str, ...] = ()  # attributes read back from the cloud
    changeable: tuple[str, ...] = ("tags",)

    def __init__(self, provider: "TestCloud"):
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return cls.kind[:-1]

    def _state(self, obj: dict, base: State) -> State:
        state = dict(base)
        for name in self.fields:
            state[name] = obj.get(name)
        if state.get("tags") == {} and not base.get("tags"):
            state["tags"] = base.get("tags")  # null in the configuration stays null
        return state

    def _guard(self, diags: Diagnostics, call):
        try:
            return call()
        except CloudCallFailed as exc:
            diags.add_error(str(exc))
            return None

    def create(self, ctx: CreateContext, planned: State) -> State | None:
        body = {k: planned[k] for k in self.inputs() if planned.get(k) is not None}
        obj = self._guard(ctx.diagnostics, lambda: self.provider.client.call("POST", f"/v1/{self.kind}", body))
        return self._state(obj, planned) if obj else None

    def read(self, ctx: ReadContext, current: State) -> State | None:
        obj = self._guard(ctx.diagnostics,
                          lambda: self.provider.client.call("GET", f"/v1/{self.kind}/{current['id']}"))
        if ctx.diagnostics.has_errors():
            return current
        return self._state(obj, current) if obj else None  # gone outside terraform: planned again

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State | None:
        body = {k: planned[k] for k in self.changeable if planned.get(k) != current.get(k)}
        if "tags" in body and body["tags"] is None:
            body["tags"] = {}
        obj = self._guard(ctx.diagnostics,
                          lambda: self.provider.client.call("PATCH", f"/v1/{self.kind}/{current['id']}", body))
        return self._state(obj, planned) if obj else current

    def delete(self, ctx: DeleteContext, current: State):
        self._guard(ctx.diagnostics, lambda: self.provider.client.call("DELETE", f"/v1/{self.kind}/{current['id']}"))

    @classmethod
    def inputs(cls) -> list[str]:
        return [a.name for a in cls.get_schema().attributes if a.required or a.optional]


def _common() -> list[schema.Attribute]:
    return [schema.Attribute("name", types.String(), required=True, requires_replace=True),
            schema.Attribute("tags", types.Map(types.String()), optional=True),
            schema.Attribute("id", types.String(), computed=True),
            schema.Attribute("arn", types.String(), computed=True),
            schema.Attribute("created_at", types.String(), computed=True)]


class Network(_CloudResource):
    kind = "networks"
    fields = ("id", "arn", "created_at", "name", "cidr", "gateway", "tags")

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(version=1, attributes=[
            *_common(),
            schema.Attribute("cidr", types.String(), required=True, requires_replace=True),
            schema.Attribute("gateway", types.String(), computed=True)])


class Bucket(_CloudResource):
    kind = "buckets"
    fields = ("id", "arn", "created_at", "name", "network_id", "url", "tags")

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(version=1, attributes=[
            *_common(),
            schema.Attribute("network_id", types.String(), optional=True, requires_replace=True),
            schema.Attribute("url", types.String(), computed=True)])


class Database(_CloudResource):
    kind = "databases"
    fields = ("id", "arn", "created_at", "name", "network_id", "engine", "size", "endpoint", "password", "tags")
    changeable = ("tags", "size")

    @classmethod
    def get_schema(cls) -> schema.Schema:
        return schema.Schema(version=1, attributes=[
            *_common(),
            schema.Attribute("network_id", types.String(), required=True, requires_replace=True),
            schema.Attribute("engine", types.String(), required=True, requires_replace=True),
            schema.Attribute("size", types.Number(), required=True),
            schema.Attribute("endpoint", types.String(), computed=True),
            schema.Attribute("password", types.String(), computed=True, sensitive=True)])


class TestCloud(Provider):
    client: Client

    def get_model_prefix(self) -> str:
        return "testcloud_"

    def full_name(self) -> str:
        return ADDRESS

    def get_provider_schema(self, diags: Diagnostics) -> schema.Schema:
        return schema.Schema(attributes=[
            schema.Attribute("endpoint", types.String(), optional=True),
            schema.Attribute("token", types.String(), optional=True, sensitive=True),
            schema.Attribute("token_file", types.String(), optional=True)])

    def validate_config(self, diags: Diagnostics, config: Config):
        pass

    def configure_provider(self, diags: Diagnostics, config: Config):
        endpoint = config.get("endpoint") or os.environ.get("TESTCLOUD_ENDPOINT", "")
        token = config.get("token") or os.environ.get("TESTCLOUD_TOKEN", "")
        token_file = config.get("token_file") or os.environ.get("TESTCLOUD_TOKEN_FILE", "")
        if not endpoint:
            diags.add_error("testcloud: no endpoint", "set the provider's endpoint or TESTCLOUD_ENDPOINT")
        self.client = Client(endpoint, token, token_file)

    def get_data_sources(self):
        return []

    def get_resources(self):
        return [Network, Bucket, Database]

    def new_resource(self, klass):
        return klass(self)


if __name__ == "__main__":
    runner.run_provider(TestCloud(), sys.argv)
