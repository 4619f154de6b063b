"""fold_client: a small Python client for a fold-node (fold.v1.FoldNode and fold.v1.Network),
built on stubs that gen_stubs.sh generates from proto/ into ./gen. Records and values come back
as plain Python dicts and values; failures raise FoldError with the gRPC code and the node's
message."""

import json
import os
import sys

import grpc
from google.protobuf import json_format, struct_pb2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))
try:
    from fold.v1 import fold_node_pb2 as pb  # noqa: E402
    from fold.v1 import fold_node_pb2_grpc as pb_grpc  # noqa: E402
    from fold.v1 import network_pb2 as npb  # noqa: E402
    from fold.v1 import network_pb2_grpc as npb_grpc  # noqa: E402
except ImportError as e:  # pragma: no cover - a setup problem, explained
    raise SystemExit(f"the gRPC stubs are missing ({e}): run examples/python/gen_stubs.sh first")

STATES = {
    "available": pb.SCHEMA_STATE_AVAILABLE,
    "approved": pb.SCHEMA_STATE_APPROVED,
    "blocked": pb.SCHEMA_STATE_BLOCKED,
}
CONSISTENCY = {
    None: pb.CONSISTENCY_DEFAULT,
    "default": pb.CONSISTENCY_DEFAULT,
    "linearizable": pb.CONSISTENCY_LINEARIZABLE,
    "local": pb.CONSISTENCY_LOCAL,
}
MUTATIONS = {
    "create": pb.MUTATION_TYPE_CREATE,
    "update": pb.MUTATION_TYPE_UPDATE,
    "delete": pb.MUTATION_TYPE_DELETE,
}


class FoldError(Exception):
    """A gRPC status from the node: `code` (e.g. 'NOT_FOUND') and the node's `message`."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _call(fn, request, timeout):
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as e:
        raise FoldError(e.code().name, e.details()) from None


def _plain(value):
    """A protobuf Value/Struct as plain Python (whole numbers as int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class FoldClient:
    """A connection to one fold-node.

    addr: "host:port" (plaintext), "unix:/path" (the node's Unix socket), or with `ca` (PEM file)
    TLS, plus `cert`/`key` (PEM files) for mutual TLS. `timeout` is each call's deadline in seconds.
    """

    def __init__(self, addr="127.0.0.1:50051", ca=None, cert=None, key=None, timeout=10.0,
                 server_name=None):
        addr = addr.removeprefix("http://")
        if ca or addr.startswith("https://"):
            addr = addr.removeprefix("https://")
            read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(addr, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(addr)
        self.fold = pb_grpc.FoldNodeStub(self.channel)
        self.network = npb_grpc.NetworkStub(self.channel)
        self.timeout = timeout

    def close(self):
        self.channel.close()

    # ---- schemas ----
    def load_schema(self, schema_json, approve=False):
        """Load a schema given as fold_db JSON text (or a dict)."""
        if not isinstance(schema_json, str):
            schema_json = json.dumps(schema_json)
        r = _call(self.fold.LoadSchema,
                  pb.LoadSchemaRequest(schema_json=schema_json, approve=approve), self.timeout)
        return {"name": r.name, "state": pb.SchemaState.Name(r.state), "created": r.created,
                "hash": r.hash}

    def list_schemas(self, state=None):
        r = _call(self.fold.ListSchemas,
                  pb.ListSchemasRequest(state=STATES.get(state, 0)), self.timeout)
        return [{"name": s.name, "state": pb.SchemaState.Name(s.state),
                 "schema_type": s.schema_type, "range_key": s.range_key or None,
                 "fields": list(s.fields)} for s in r.schemas]

    def set_schema_state(self, name, state):
        r = _call(self.fold.SetSchemaState,
                  pb.SetSchemaStateRequest(name=name, state=STATES[state]), self.timeout)
        return {"name": r.name, "state": pb.SchemaState.Name(r.state)}

    # ---- data ----
    def mutate(self, schema, kind, data, node=None):
        """kind: 'create' | 'update' | 'delete'; data: dict of field -> value."""
        s = struct_pb2.Struct()
        s.update(data)
        r = _call(self.fold.Mutate,
                  pb.MutateRequest(schema=schema, mutation_type=MUTATIONS[kind], data=s,
                                   target_node_id=node or ""), self.timeout)
        return {"node_id": r.node_id, "key": r.range_key or None, "fields": list(r.fields),
                "version_ids": list(r.version_ids)}

    def query(self, schema, fields, key=None, prefix=None, range=None, keys=None, pattern=None,
              node=None, consistency=None, with_group=False):
        """Records as [{"key": ..., "fields": {...}}]; at most one filter (Range schemas).

        consistency (group schemas, docs/GROUPS.md): None/"linearizable" (confirmed with the
        leader; UNAVAILABLE without a quorum) or "local" (this member's copy, answered without a
        quorum). with_group=True returns (records, group) where group is
        {"linearizable": bool, "as_of_sequence": int} for a group schema, else None."""
        if consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of linearizable, local (not {consistency!r})")
        f = None
        if key is not None:
            f = pb.RangeFilter(key=key)
        elif prefix is not None:
            f = pb.RangeFilter(key_prefix=prefix)
        elif range is not None:
            f = pb.RangeFilter(key_range=pb.KeyRange(start=range[0], end=range[1]))
        elif keys is not None:
            f = pb.RangeFilter(keys=pb.KeyList(keys=list(keys)))
        elif pattern is not None:
            f = pb.RangeFilter(key_pattern=pattern)
        r = _call(self.fold.Query,
                  pb.QueryRequest(schema=schema, fields=list(fields), filter=f,
                                  target_node_id=node or "",
                                  consistency=CONSISTENCY[consistency]), self.timeout)
        records = [{"key": rec.range_key or None,
                    "fields": _plain(json_format.MessageToDict(rec.fields))} for rec in r.records]
        if not with_group:
            return records
        group = None
        if r.HasField("group"):
            group = {"linearizable": r.group.linearizable,
                     "as_of_sequence": r.group.as_of_sequence}
        return records, group

    def query_pages(self, schema, fields, page_size=1000, **filters):
        """Yield pages (lists of records) of a large result, following next_page_token; values
        come as exact JSON (json_values), so big integers are not rounded to doubles."""
        f = None
        if filters.get("prefix") is not None:
            f = pb.RangeFilter(key_prefix=filters["prefix"])
        token = ""
        while True:
            r = _call(self.fold.Query,
                      pb.QueryRequest(schema=schema, fields=list(fields), filter=f,
                                      page_size=page_size, page_token=token, json_values=True),
                      self.timeout)
            yield [{"key": rec.range_key or None, "fields": json.loads(rec.fields_json)}
                   for rec in r.records]
            token = r.next_page_token
            if not token:
                return

    def history(self, schema, field, key=None, limit=0):
        """Versions of a field, newest first."""
        r = _call(self.fold.History,
                  pb.HistoryRequest(schema=schema, field=field, range_key=key or "", limit=limit),
                  self.timeout)
        out = []
        for v in r.versions:
            out.append({
                "version_id": v.version_id,
                "value": _plain(json_format.MessageToDict(v.value)) if v.HasField("value") else None,
                "deleted": v.deleted,
                "written_at": v.written_at.ToJsonString() if v.HasField("written_at") else None,
                "writer": v.writer,
                "mutation": pb.MutationType.Name(v.mutation_type),
            })
        return out

    # ---- network ----
    def status(self):
        r = _call(self.network.Status, npb.NetworkStatusRequest(), self.timeout)
        return {"node_id": r.node_id, "listen_addrs": list(r.listen_addrs),
                "connected_peers": r.connected_peers}

    def peers(self, include_disconnected=False):
        r = _call(self.network.ListPeers,
                  npb.ListPeersRequest(include_disconnected=include_disconnected), self.timeout)
        return [{"node_id": p.node_id, "connected": p.connected, "rtt_micros": p.rtt_micros,
                 "agent": p.agent_version} for p in r.peers]

    # ---- schema groups (docs/GROUPS.md) ----
    def create_group(self, schema, members):
        """Make `schema` a group of `members` (node ids; this node is added when missing)."""
        r = _call(self.network.CreateGroup,
                  npb.CreateGroupRequest(schema=schema, members=list(members)), self.timeout)
        return _group(r.group)

    def change_group_members(self, schema, add=(), remove=()):
        """Add and/or remove members (both: a replacement). Run it on the group's leader: on
        another member it raises FoldError('FAILED_PRECONDITION', '... leader <node id> ...')."""
        if not add and not remove:
            raise ValueError("name at least one member to add or remove")
        r = _call(self.network.ChangeGroupMembers,
                  npb.ChangeGroupMembersRequest(schema=schema, add=list(add), remove=list(remove)),
                  self.timeout)
        return _group(r.group)

    def list_groups(self):
        """The groups this node is a member of, as it sees them."""
        r = _call(self.network.ListGroups, npb.ListGroupsRequest(), self.timeout)
        return [_group(g) for g in r.groups]


def _group(g):
    """A GroupStatus as a dict (a member's lag None when unknown)."""
    return {
        "schema": g.schema, "role": g.role, "leader_node_id": g.leader_node_id or None,
        "term": g.term, "last_log_index": g.last_log_index, "commit_index": g.commit_index,
        "applied_index": g.applied_index, "snapshot_index": g.snapshot_index,
        "purged_index": g.purged_index, "has_quorum": g.has_quorum,
        "refused_messages": g.refused_messages, "head_sequence": g.head_sequence,
        "members": [{"node_id": m.node_id, "voter": m.voter, "leader": m.leader,
                     "lag": m.lag if m.lag >= 0 else None} for m in g.members],
    }
