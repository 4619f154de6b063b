//! Every foldctl command except `check` and `topology`'s rendering: call the node through
//! fold-client, and shape the answer as JSON (the client's serde types, unchanged) and a table.

use std::collections::BTreeMap;
use std::io::Read;

use fold_client::{
    At, Client, Consistency, Filter, GroupRead, Mutation, MutationKind, NodeAnswer, Peer, Query,
    SchemaInfo, SchemaState, StateChange, Subscription, SubscriptionEvent, Trust, TrustEntry,
};
use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::cli::{
    Command, ConsistencyArg, Global, HistoryArgs, MutateArgs, QueryArgs, SchemaCmd, SubscribeArgs,
    TrustCmd,
};
use crate::metrics::{get_metrics, parse};
use crate::table::{Table, cell, kv, peer_trust, rtt_text};
use crate::{Failure, Out, topology};

fn to_json<T: Serialize>(v: &T) -> Result<Json, Failure> {
    serde_json::to_value(v).map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))
}

pub async fn run(c: &Client, g: &Global, cmd: Command) -> Result<Out, Failure> {
    match cmd {
        Command::Schema(s) => schema(c, s).await,
        Command::Query(q) => query(c, q).await,
        Command::Mutate(m) => mutate(c, m).await,
        Command::History(h) => history(c, h).await,
        Command::Subscribe(a) => subscribe(c, g, a).await,
        Command::Status => status(c).await,
        Command::Peers { all, metrics_addr } => peers(c, all, metrics_addr).await,
        Command::Providers { schema } => providers(c, schema).await,
        Command::Trust(t) => trust(c, t).await,
        Command::Group(cmd) => crate::group::run(c, cmd).await,
        Command::Dial { address } => {
            let d = c.dial(&address).await?;
            Ok(Out {
                json: to_json(&d)?,
                text: format!("connected to {} at {}\n", d.node_id, d.address),
            })
        }
        Command::CheckSchemas { node, names } => {
            let r = c.check_schemas(&node, &names).await?;
            let mut t = Table::new(["SCHEMA", "APPROVED_ON_NODE"]);
            for n in &names {
                t.row([n.clone(), yes_no(r.approved.contains(n)).into()]);
            }
            Ok(Out {
                json: to_json(&r)?,
                text: format!("node {}\n{}", r.node_id, t.render()),
            })
        }
        Command::Topology {
            format,
            all,
            also,
            hops,
        } => topology::run(c, g, format, all, &also, hops).await,
        Command::Check { .. }
        | Command::Top { .. }
        | Command::Dashboard(_)
        | Command::Completions { .. } => Err(Failure::Local("not a node command".into())),
    }
}

/// `peers`: the node's peers, with each one's breaker state when `--metrics-addr` is given.
async fn peers(c: &Client, all: bool, metrics_addr: Option<String>) -> Result<Out, Failure> {
    let peers = c.peers(all).await?;
    let Some(addr) = metrics_addr else {
        return Ok(Out {
            json: to_json(&peers)?,
            text: peers_table(&peers, None),
        });
    };
    let breakers = breaker_states(&addr).await?;
    let mut json = to_json(&peers)?;
    if let Json::Array(list) = &mut json {
        for (p, j) in peers.iter().zip(list.iter_mut()) {
            if let Json::Object(o) = j {
                let state = breakers.get(&p.node_id).cloned();
                o.insert(
                    "breaker".into(),
                    state.map(Json::String).unwrap_or(Json::Null),
                );
            }
        }
    }
    Ok(Out {
        json,
        text: peers_table(&peers, Some(&breakers)),
    })
}

/// `providers`: the nodes that announce `schema`.
async fn providers(c: &Client, schema: String) -> Result<Out, Failure> {
    let ids = c.providers(&schema).await?;
    let mut t = Table::new(["NODE_ID"]).keep(0);
    for id in &ids {
        t.row([id.as_str()]);
    }
    let text = if ids.is_empty() {
        format!("no node announces schema {schema}\n")
    } else {
        t.render()
    };
    Ok(Out {
        json: json!({"schema": schema, "node_ids": ids}),
        text,
    })
}

/// `status`: this node in the mesh, as key/value lines.
async fn status(c: &Client) -> Result<Out, Failure> {
    let s = c.status().await?;
    let text = kv(&[
        ("node id", s.node_id.clone()),
        ("listen", s.listen_addrs.join(", ")),
        ("external", or_dash(s.external_addrs.join(", "))),
        ("connected peers", s.connected_peers.to_string()),
        ("known peers", s.known_peers.to_string()),
        ("mdns", on_off(s.mdns_enabled).into()),
        ("provided schemas", or_dash(s.provided_schemas.join(", "))),
        (
            "bootstrap",
            joined(&s.bootstrap, |b| match &b.last_error {
                Some(e) if b.state == "failed" => format!("{} failed: {e}", b.address),
                _ => format!("{} {}", b.address, b.state),
            }),
        ),
        ("reachability", s.reachability.clone()),
        (
            "admin",
            format!(
                "node {}, sidecar {}",
                s.node_admin_addr.as_deref().unwrap_or("-"),
                s.sidecar_admin_addr.as_deref().unwrap_or("-")
            ),
        ),
        ("relays", joined(&s.relays, relay_text)),
        (
            "relay server",
            match &s.relay_server {
                Some(r) if r.enabled => format!(
                    "on ({} reservations, {} circuits)",
                    r.reservations, r.circuits
                ),
                _ => "off".into(),
            },
        ),
        ("replicas", joined(&s.replicas, replica_text)),
        ("groups", joined(&s.groups, group_text)),
    ]);
    // Each group's members and their lag, as `group list` shows them.
    let text = if s.groups.is_empty() {
        text
    } else {
        format!("{text}\n{}", crate::group::groups_table(&s.groups))
    };
    Ok(Out {
        json: to_json(&s)?,
        text,
    })
}

fn relay_text(r: &fold_client::RelayReservation) -> String {
    match (&r.circuit_addr, &r.last_error) {
        (Some(c), _) => format!("{} {} ({c})", r.relay_node_id, r.state),
        (None, Some(e)) => format!("{} {}: {e}", r.relay_node_id, r.state),
        _ => format!("{} {}", r.relay_node_id, r.state),
    }
}

fn replica_text(r: &fold_client::Replica) -> String {
    let mut t = format!(
        "{} from {} at {} (lag {})",
        r.schema, r.source_node_id, r.applied_sequence, r.lag
    );
    if let Some(e) = &r.last_error {
        t.push_str(&format!(": {e}"));
    }
    t
}

/// One group in a line: this node's role, the leader, term, commit and applied index, quorum.
fn group_text(g: &fold_client::GroupStatus) -> String {
    format!(
        "{} {} (leader {}, term {}, commit {}, applied {}{})",
        g.schema,
        g.role,
        g.leader_node_id.as_deref().unwrap_or("none known"),
        g.term,
        g.commit_index,
        g.applied_index,
        if g.has_quorum { "" } else { ", NO QUORUM" }
    )
}

/// Each item as text, joined by "; " ("-" when there are none).
fn joined<T>(items: &[T], text: impl Fn(&T) -> String) -> String {
    or_dash(items.iter().map(text).collect::<Vec<_>>().join("; "))
}

async fn schema(c: &Client, cmd: SchemaCmd) -> Result<Out, Failure> {
    match cmd {
        SchemaCmd::Load { file, approve } => {
            let text = read_input(&file.to_string_lossy())?;
            let r = c.load_schema(&text, approve).await?;
            let verb = if r.created {
                "loaded"
            } else {
                "already loaded (identical)"
            };
            Ok(Out {
                json: to_json(&r)?,
                text: format!(
                    "schema {} {verb}: state {}, hash {}\n",
                    r.name, r.state, r.hash
                ),
            })
        }
        SchemaCmd::List { state } => {
            let state = match state {
                Some(s) => Some(s.parse::<SchemaState>()?),
                None => None,
            };
            let list = c.list_schemas(state).await?;
            Ok(Out {
                json: to_json(&list)?,
                text: schemas_table(&list),
            })
        }
        SchemaCmd::Get { name } => {
            let d = c.get_schema(&name).await?;
            let mut text = schemas_table(std::slice::from_ref(&d.info));
            text.push('\n');
            text.push_str(&serde_json::to_string_pretty(&d.definition).unwrap_or_default());
            text.push('\n');
            Ok(Out {
                json: to_json(&d)?,
                text,
            })
        }
        SchemaCmd::Approve { name } => state_change(c, &name, SchemaState::Approved).await,
        SchemaCmd::Block { name } => state_change(c, &name, SchemaState::Blocked).await,
        SchemaCmd::Unload { name } => state_change(c, &name, SchemaState::Available).await,
    }
}

async fn state_change(c: &Client, name: &str, state: SchemaState) -> Result<Out, Failure> {
    let r: StateChange = c.set_schema_state(name, state).await?;
    Ok(Out {
        json: to_json(&r)?,
        text: format!("schema {}: {} -> {}\n", r.name, r.previous_state, r.state),
    })
}

fn schemas_table(list: &[SchemaInfo]) -> String {
    let mut t = Table::new(["NAME", "STATE", "TYPE", "RANGE_KEY", "FIELDS", "HASH"]);
    for s in list {
        t.row([
            s.name.clone(),
            s.state.to_string(),
            s.schema_type.clone(),
            s.range_key.clone().unwrap_or_else(|| "-".into()),
            s.fields.join(","),
            if crate::table::wide() {
                s.hash.clone()
            } else {
                s.hash.chars().take(12).collect()
            },
        ]);
    }
    t.render()
}

async fn query(c: &Client, a: QueryArgs) -> Result<Out, Failure> {
    let filter = query_filter(&a)?;
    let fields = query_fields(c, &a).await?;
    let mut q = Query::new(a.schema, fields.clone());
    q.filter = filter;
    q.node = a.node;
    q.any = a.any;
    q.consistency = match a.consistency {
        None => Consistency::Default,
        Some(ConsistencyArg::Linearizable) => Consistency::Linearizable,
        Some(ConsistencyArg::Local) => Consistency::Local,
    };
    if a.all {
        return query_all(c, q, &fields).await;
    }
    let r = query_with_progress(c, q).await?;
    let mut t = Table::new(std::iter::once("KEY".to_string()).chain(fields.iter().cloned()));
    for rec in &r.records {
        t.row(record_row(Vec::new(), rec, &fields));
    }
    let text = format!(
        "{}{} record(s) from {}{}\n",
        t.render(),
        r.records.len(),
        node_name(&r.node_id),
        group_read_text(r.group.as_ref())
    );
    Ok(Out {
        json: to_json(&r)?,
        text,
    })
}

/// How a group schema was read, for the query's last line ("" for other schemas).
fn group_read_text(g: Option<&GroupRead>) -> String {
    match g {
        Some(g) if g.linearizable => format!(
            " (group: linearizable, as of sequence {})",
            g.as_of_sequence
        ),
        Some(g) => format!(
            " (group: this member's local copy as of sequence {}; may miss the latest writes)",
            g.as_of_sequence
        ),
        None => String::new(),
    }
}

/// The one filter `--key`, `--prefix`, `--range`, `--keys` or `--pattern` asks for.
fn query_filter(a: &QueryArgs) -> Result<Option<Filter>, Failure> {
    Ok(if let Some(k) = &a.key {
        Some(Filter::Key(k.clone()))
    } else if let Some(p) = &a.prefix {
        Some(Filter::Prefix(p.clone()))
    } else if let Some(r) = &a.range {
        match r.as_slice() {
            [start, end] => Some(Filter::Range {
                start: start.clone(),
                end: end.clone(),
            }),
            _ => return Err(Failure::Local("--range takes START END".into())),
        }
    } else if let Some(k) = &a.keys {
        Some(Filter::Keys(k.clone()))
    } else {
        a.pattern.clone().map(Filter::Pattern)
    })
}

/// The fields named, or every field of the schema as the connected node knows it.
async fn query_fields(c: &Client, a: &QueryArgs) -> Result<Vec<String>, Failure> {
    if !a.fields.is_empty() {
        return Ok(a.fields.clone());
    }
    match c.get_schema(&a.schema).await {
        Ok(s) => Ok(s.info.fields),
        Err(e) if a.node.is_some() || a.any || a.all => Err(Failure::Local(format!(
            "name the fields to read: the connected node cannot list the fields of schema '{}' ({})",
            a.schema,
            match &e {
                fold_client::Error::Status { message, .. } => message.clone(),
                other => other.to_string(),
            }
        ))),
        Err(e) => Err(e.into()),
    }
}

/// `row` followed by the record's key and its `fields` ("-" where absent).
fn record_row(mut row: Vec<String>, rec: &fold_client::Record, fields: &[String]) -> Vec<String> {
    row.push(rec.key.clone().unwrap_or_else(|| "-".into()));
    for f in fields {
        row.push(rec.fields.get(f).map(cell).unwrap_or_else(|| "-".into()));
    }
    row
}

/// `--all`: every provider's answer, one table with a NODE column.
async fn query_all(c: &Client, q: Query, fields: &[String]) -> Result<Out, Failure> {
    let answers = c.query_all(q).await?;
    let mut t = Table::new(
        ["NODE".to_string(), "KEY".to_string()]
            .into_iter()
            .chain(fields.iter().cloned()),
    );
    let mut n = 0;
    for ans in &answers {
        for rec in &ans.records {
            t.row(record_row(vec![ans.node_id.clone()], rec, fields));
            n += 1;
        }
    }
    let text = format!(
        "{}{n} record(s) from {}\n",
        t.render(),
        answered_summary(&answers)?
    );
    Ok(Out {
        json: to_json(&answers)?,
        text,
    })
}

/// Every page of `q`, counting records read on a terminal's stderr past the first thousand.
async fn query_with_progress(c: &Client, q: Query) -> Result<fold_client::QueryResult, Failure> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let r = c
        .query_with_progress(q, |n| {
            if tty && n >= 1000 {
                eprint!("\r{n} records read");
                let _ = std::io::stderr().flush();
            }
        })
        .await?;
    if tty && r.records.len() >= 1000 {
        eprintln!();
    }
    Ok(r)
}

async fn mutate(c: &Client, a: MutateArgs) -> Result<Out, Failure> {
    let kind: MutationKind = a.kind.parse()?;
    if let Some(batch) = &a.batch {
        return mutate_batch(
            c,
            &a.schema,
            kind,
            &batch.to_string_lossy(),
            a.node.as_deref(),
        )
        .await;
    }
    let data = a.data.unwrap_or_default();
    let raw = match data.strip_prefix('@') {
        Some(path) => read_input(path)?,
        None => data,
    };
    let data: Json = serde_json::from_str(&raw)
        .map_err(|e| Failure::Local(format!("--data is not valid JSON: {e}")))?;
    let mut m = Mutation::new(a.schema, kind, data)?;
    m.node = a.node;
    m.idempotency_key = a.idempotency_key;
    let r = c.mutate(m).await?;
    let mut t = Table::new(["FIELD", "VERSION_ID"]);
    for (f, v) in r.fields.iter().zip(r.version_ids.iter()) {
        t.row([f.as_str(), v.as_str()]);
    }
    let key = r
        .key
        .as_deref()
        .map(|k| format!(" key {k}"))
        .unwrap_or_default();
    let verb = match kind {
        MutationKind::Create => "created",
        MutationKind::Update => "updated",
        MutationKind::Delete => "deleted",
    };
    Ok(Out {
        json: to_json(&r)?,
        text: format!(
            "{verb}{key} on {}{}\n{}",
            node_name(&r.node_id),
            if r.replayed {
                " (replayed: this idempotency key was applied before; nothing new written)"
            } else {
                ""
            },
            t.render()
        ),
    })
}

/// Mutations per BatchMutate call of `mutate --batch`.
const BATCH_CHUNK: usize = 1000;

/// One mutation per JSONL line, in order, sent as BatchMutate calls of up to [`BATCH_CHUNK`]
/// lines, each applied atomically; stops at the first refused chunk, naming its line.
async fn mutate_batch(
    c: &Client,
    schema: &str,
    kind: MutationKind,
    path: &str,
    node: Option<&str>,
) -> Result<Out, Failure> {
    use std::io::{IsTerminal, Write};
    let text = read_input(path)?;
    let mut lines: Vec<(usize, serde_json::Map<String, Json>)> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let data: Json = serde_json::from_str(l).map_err(|e| {
            Failure::Local(format!(
                "{path} line {}: not valid JSON: {e} (nothing applied)",
                i + 1
            ))
        })?;
        let Json::Object(data) = data else {
            return Err(Failure::Local(format!(
                "{path} line {}: not a JSON object of field -> value (nothing applied)",
                i + 1
            )));
        };
        lines.push((i + 1, data));
    }
    let total = lines.len();
    let progress = std::io::stderr().is_terminal();
    let mut applied = 0usize;
    for chunk in lines.chunks(BATCH_CHUNK) {
        let mutations = chunk.iter().map(|(_, d)| (kind, d.clone())).collect();
        if let Err(e) = c.batch_mutate(schema, mutations, node).await {
            if progress {
                eprintln!();
            }
            let line = match &e {
                fold_client::Error::Status { message, .. } => fold_client::failed_record(message)
                    .and_then(|r| chunk.get(r))
                    .map(|(n, _)| format!("line {n}")),
                _ => None,
            };
            eprintln!(
                "foldctl: {path}: the batch of lines {}–{} was refused{}; {applied} of {total} mutation(s) applied before it",
                chunk.first().map_or(0, |(n, _)| *n),
                chunk.last().map_or(0, |(n, _)| *n),
                line.map(|l| format!(" at {l}")).unwrap_or_default()
            );
            return Err(Failure::Client(e));
        }
        applied += chunk.len();
        if progress {
            eprint!("\r{applied}/{total} mutations applied");
            let _ = std::io::stderr().flush();
        }
    }
    if progress {
        eprintln!();
    }
    Ok(Out {
        json: json!({"applied": applied}),
        text: format!("{applied} mutation(s) applied\n"),
    })
}

/// "2 of 3 nodes" — and each node that failed, on stderr. Every node failing is an error.
fn answered_summary(answers: &[NodeAnswer]) -> Result<String, Failure> {
    let failed: Vec<&NodeAnswer> = answers.iter().filter(|a| a.error.is_some()).collect();
    for a in &failed {
        if let Some(e) = &a.error {
            eprintln!("node {}: {} {}", a.node_id, e.code, e.message);
        }
    }
    if !answers.is_empty() && failed.len() == answers.len() {
        return Err(Failure::Local(format!(
            "none of the {} nodes serving the schema answered (see above)",
            answers.len()
        )));
    }
    Ok(format!(
        "{} of {} node(s) serving the schema",
        answers.len() - failed.len(),
        answers.len()
    ))
}

/// Print each event as it arrives (a stream has no final table); nothing is left to print
/// after.
async fn subscribe(c: &Client, g: &Global, a: SubscribeArgs) -> Result<Out, Failure> {
    use std::io::Write;
    let json = matches!(g.output, crate::cli::Output::Json);
    let mut s = Subscription::new(a.schema);
    s.fields = a.fields;
    s.from_sequence = a.from;
    s.node = a.node;
    s.any = a.any;
    s.filter = a.key.map(Filter::Key).or(a.prefix.map(Filter::Prefix));
    let mut stream = c.subscribe(s).await?;
    let mut changes = 0u64;
    let mut last = a.from;
    while a.limit == 0 || changes < a.limit {
        let Some(event) = stream.next().await else {
            break;
        };
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                eprintln!(
                    "foldctl: the subscription ended after sequence {last}; resume with --from {last}"
                );
                return Err(e.into());
            }
        };
        match &event {
            SubscriptionEvent::Change { sequence, .. } => {
                changes += 1;
                last = *sequence;
            }
            SubscriptionEvent::Progress { sequence, .. } => last = last.max(*sequence),
        }
        let Some(line) = event_line(&event, json, a.progress)? else {
            continue;
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            // The reader went away (e.g. `| head`): done.
            break;
        }
    }
    Ok(Out {
        json: Json::Null,
        text: String::new(),
    })
}

/// One subscription event as a line of output: JSON, or text (progress only with `--progress`).
fn event_line(
    event: &SubscriptionEvent,
    json: bool,
    progress: bool,
) -> Result<Option<String>, Failure> {
    if json {
        return serde_json::to_string(event)
            .map(Some)
            .map_err(|e| Failure::Local(format!("cannot render JSON: {e}")));
    }
    Ok(match event {
        SubscriptionEvent::Change {
            sequence,
            key,
            mutation,
            writer,
            fields,
            ..
        } => {
            let values: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", cell(v)))
                .collect();
            Some(format!(
                "{sequence} {} {} {} {}",
                key.as_deref().unwrap_or("-"),
                mutation
                    .map(|m| format!("{m:?}").to_lowercase())
                    .unwrap_or_else(|| "-".into()),
                values.join(" "),
                writer
            ))
        }
        SubscriptionEvent::Progress {
            sequence,
            head,
            node_id,
            ..
        } => progress.then(|| {
            format!(
                "# progress: through {sequence}, head {head}, on {}",
                node_name(node_id)
            )
        }),
    })
}

async fn history(c: &Client, a: HistoryArgs) -> Result<Out, Failure> {
    if a.all {
        let answers = c
            .history_all(&a.schema, &a.field, a.key.as_deref(), a.limit)
            .await?;
        let mut t = Table::new([
            "NODE",
            "WRITTEN_AT",
            "MUTATION",
            "VALUE",
            "WRITER",
            "VERSION_ID",
        ]);
        for ans in &answers {
            for v in &ans.versions {
                t.row([
                    ans.node_id.clone(),
                    v.written_at.clone().unwrap_or_else(|| "-".into()),
                    v.mutation
                        .map(|m| format!("{m:?}").to_lowercase())
                        .unwrap_or_else(|| "-".into()),
                    if v.deleted {
                        "(deleted)".into()
                    } else {
                        cell(&v.value)
                    },
                    v.writer.clone(),
                    v.version_id.clone(),
                ]);
            }
        }
        let text = format!("{}from {}\n", t.render(), answered_summary(&answers)?);
        return Ok(Out {
            json: to_json(&answers)?,
            text,
        });
    }
    let at = if a.any {
        At::Any
    } else if let Some(n) = a.node {
        At::Node(n)
    } else {
        At::Here
    };
    let (_, versions) = c
        .history_at(&a.schema, &a.field, a.key.as_deref(), a.limit, at)
        .await?;
    let mut t = Table::new(["WRITTEN_AT", "MUTATION", "VALUE", "WRITER", "VERSION_ID"]);
    for v in &versions {
        t.row([
            v.written_at.clone().unwrap_or_else(|| "-".into()),
            v.mutation
                .map(|m| format!("{m:?}").to_lowercase())
                .unwrap_or_else(|| "-".into()),
            if v.deleted {
                "(deleted)".into()
            } else {
                cell(&v.value)
            },
            v.writer.clone(),
            v.version_id.clone(),
        ]);
    }
    Ok(Out {
        json: to_json(&versions)?,
        text: t.render(),
    })
}

async fn trust(c: &Client, cmd: TrustCmd) -> Result<Out, Failure> {
    match cmd {
        TrustCmd::Get { node } => {
            let table = c.get_trust(node.as_deref()).await?;
            let mut t = Table::new(["NODE_ID", "TRUST"]).keep(0);
            for e in &table.entries {
                t.row([e.node_id.clone(), trust_text(e)]);
            }
            if let Some(d) = &table.default {
                t.row(["(default)".to_string(), trust_text(d)]);
            }
            Ok(Out {
                json: to_json(&table)?,
                text: t.render(),
            })
        }
        TrustCmd::Set { node, trust } => {
            let trust: Trust = trust.parse()?;
            let e = c.set_trust(&node, trust).await?;
            Ok(Out {
                json: to_json(&e)?,
                text: format!("{}: trust {}\n", e.node_id, trust_text(&e)),
            })
        }
        TrustCmd::Remove { node } => {
            let e = c.remove_trust(&node).await?;
            Ok(Out {
                json: to_json(&e)?,
                text: format!("{node}: entry removed (the default applies)\n"),
            })
        }
    }
}

fn trust_text(e: &TrustEntry) -> String {
    if e.denied {
        "deny".into()
    } else {
        e.distance.to_string()
    }
}

/// Circuit breaker state per remote node id, from the node's `fold_circuit_breaker_state`
/// gauge (0 closed, 1 open, 2 half-open). A node never forwarded to has no breaker yet.
async fn breaker_states(addr: &str) -> Result<BTreeMap<String, String>, Failure> {
    let body = match get_metrics(addr).await {
        Ok((200, body)) => body,
        Ok((code, _)) => {
            return Err(Failure::Local(format!(
                "http://{addr}/metrics answered HTTP {code}"
            )));
        }
        Err(detail) => {
            return Err(Failure::Client(fold_client::Error::Connect {
                addr: format!("http://{addr}/metrics"),
                detail,
            }));
        }
    };
    Ok(parse(&body)
        .into_iter()
        .filter(|s| s.name == "fold_circuit_breaker_state")
        .filter_map(|s| {
            let state = match s.value as i64 {
                0 => "closed",
                1 => "open",
                2 => "half-open",
                _ => return None,
            };
            Some((s.labels.get("target")?.clone(), state.to_string()))
        })
        .collect())
}

pub fn peers_table(peers: &[Peer], breakers: Option<&BTreeMap<String, String>>) -> String {
    if peers.is_empty() {
        return "no peers\n".into();
    }
    let mut headers = vec!["NODE_ID", "CONNECTED", "VIA", "RTT", "TRUST", "ROUTE_EWMA"];
    if breakers.is_some() {
        headers.push("BREAKER");
    }
    headers.extend(["SOURCE", "AGENT", "ADDRESSES"]);
    // -o wide: the routing counters and the protocols too.
    let wide = crate::table::wide();
    if wide {
        headers.extend(["IN_FLIGHT", "ROUTED", "ROUTE_FAILURES", "PROTOCOLS"]);
    }
    let mut t = Table::new(headers).keep(0);
    for p in peers {
        let mut row = vec![
            p.node_id.clone(),
            yes_no(p.connected).into(),
            match (&p.connection, &p.transport) {
                (Some(c), Some(t)) => format!("{c}/{t}"),
                (Some(c), None) => c.clone(),
                _ => "-".into(),
            },
            rtt_text(p),
            peer_trust(p),
            p.route_latency_micros
                .map(|us| format!("{:.1}ms", us as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
        ];
        if let Some(b) = breakers {
            row.push(
                b.get(&p.node_id)
                    .cloned()
                    .or_else(|| p.breaker.clone())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        row.extend([
            or_dash(p.source.clone()),
            or_dash(p.agent.clone()),
            or_dash(p.addrs.join(",")),
        ]);
        if wide {
            row.extend([
                p.route_in_flight.to_string(),
                p.route_requests.to_string(),
                p.route_failures.to_string(),
                or_dash(p.protocols.join(",")),
            ]);
        }
        t.row(row);
    }
    t.render()
}

/// Read a file, or stdin for `-`.
fn read_input(path: &str) -> Result<String, Failure> {
    if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Local(format!("cannot read stdin: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| Failure::Local(format!("cannot read {path}: {e}")))
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `node ID`, or `this node` when the node does not know its id yet (sidecar never reached).
fn node_name(id: &str) -> String {
    if id.is_empty() {
        "this node".into()
    } else {
        format!("node {id}")
    }
}
