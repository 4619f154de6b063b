//! Across NATs, measured in the NAT lab of network namespaces (`foldmesh_e2e::natlab`; needs
//! root): node A behind NAT 1 queries node B behind NAT 2.
//!
//! - time to reservation: from the four nodes being up until A and B both hold a relay
//!   reservation (AutoNAT verdict, then the reservation);
//! - time to the first relayed request: a Query from A to B with no connection between them yet
//!   (DHT lookup, circuit through the relay, the forwarded query), on a NAT with per-destination
//!   port mapping (hole punching cannot succeed there);
//! - time to the direct upgrade: from A dialling B's relayed address until A's peer list shows
//!   the connection to B as direct (DCUtR), on NATs that keep a flow's port (Linux masquerade);
//! - forwarded Query latency over the relayed connection and over the hole-punched one.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fold_proto::v1::{DialRequest, MutationType, QueryRequest};
use foldmesh_e2e::client::{field, fold, load_req, mutate_req, network, query_req, schema};
use foldmesh_e2e::mesh::Host;
use foldmesh_e2e::natlab::{Lab, NatKind, peer, reserved};
use serde_json::json;

#[derive(serde::Serialize, Debug, Default)]
pub struct NatResults {
    pub rounds: usize,
    pub reservation_ms: Vec<f64>,
    pub first_relayed_request_ms: Vec<f64>,
    pub direct_upgrade_ms: Vec<f64>,
    pub direct_transport: Vec<String>,
    /// Whether A already had a connection to B when the first request was sent (the DHT's own
    /// lookups can connect them first); the first-request time includes the lookup and the
    /// circuit only when this is false.
    pub connected_before_first_request: Vec<bool>,
    /// Forwarded Query latency per path and transport ("relayed/tcp", "direct/quic", ...), `n`
    /// sequential queries per round.
    pub latency: Vec<crate::Lat>,
}

async fn prepare_b(b: &Host) -> anyhow::Result<()> {
    let notes = schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    );
    fold(&b.grpc()).load_schema(load_req(&notes, true)).await?;
    fold(&b.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "x".repeat(1024)}),
        ))
        .await?;
    Ok(())
}

fn to_b(b: &Host) -> QueryRequest {
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = b.node_id.clone();
    q
}

async fn reservations(lab: &Lab) -> anyhow::Result<f64> {
    let t = Instant::now();
    reserved(&lab.a, &lab.relay, "bootstrap").await?;
    reserved(&lab.b, &lab.relay, "bootstrap").await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

async fn latency(a: &Host, b: &Host, n: usize) -> anyhow::Result<Vec<Duration>> {
    let c = fold(&a.grpc());
    crate::sequential(n, || {
        let mut c = c.clone();
        let q = to_b(b);
        async move {
            let r = c.query(q).await?.into_inner();
            if r.records.len() != 1 {
                bail!("expected one record from B, got {}", r.records.len());
            }
            Ok(())
        }
    })
    .await
}

/// `rounds` labs of each kind, `n` sequential queries in each.
pub async fn measure(rounds: usize, n: usize) -> anyhow::Result<NatResults> {
    let mut r = NatResults {
        rounds,
        ..Default::default()
    };
    let mut samples: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    for round in 0..rounds {
        eprintln!(
            "  round {}/{rounds}: per-destination NAT (relayed)",
            round + 1
        );
        let lab = Lab::start(NatKind::PerDestination)
            .await
            .context("NAT lab (needs root, iproute2, nftables)")?;
        r.reservation_ms.push(reservations(&lab).await?);
        prepare_b(&lab.b).await?;
        r.connected_before_first_request
            .push(peer(&lab.a, &lab.b.node_id).await.is_some());
        let t = Instant::now();
        let mut req = tonic::Request::new(to_b(&lab.b));
        req.set_timeout(Duration::from_secs(30));
        fold(&lab.a.grpc()).query(req).await?;
        r.first_relayed_request_ms
            .push(t.elapsed().as_secs_f64() * 1e3);
        let p = peer(&lab.a, &lab.b.node_id).await;
        let Some(p) = p.filter(|p| p.connection == "relayed") else {
            bail!("expected a relayed connection from A to B");
        };
        samples
            .entry(format!("relayed/{}", p.transport))
            .or_default()
            .extend(latency(&lab.a, &lab.b, n).await?);
        drop(lab);

        eprintln!(
            "  round {}/{rounds}: endpoint-independent NAT (DCUtR)",
            round + 1
        );
        let lab = Lab::start(NatKind::EndpointIndependent).await?;
        reservations(&lab).await?;
        let circuit = reserved(&lab.b, &lab.relay, "bootstrap").await?;
        prepare_b(&lab.b).await?;
        let t = Instant::now();
        network(&lab.a.grpc())
            .dial(DialRequest { address: circuit })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let p = loop {
            if let Some(p) = peer(&lab.a, &lab.b.node_id)
                .await
                .filter(|p| p.connection == "direct")
            {
                break p;
            }
            if Instant::now() > deadline {
                bail!("the connection from A to B did not become direct within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        r.direct_upgrade_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let lat = latency(&lab.a, &lab.b, n).await?;
        match peer(&lab.a, &lab.b.node_id).await {
            Some(q) if q.connection == "direct" && q.transport == p.transport => {}
            other => bail!("the direct connection changed while measuring: {other:?}"),
        }
        samples
            .entry(format!("direct/{}", p.transport))
            .or_default()
            .extend(lat);
        r.direct_transport.push(p.transport);
    }
    eprintln!(
        "  reservation ms {:?}; first relayed request ms {:?}; direct upgrade ms {:?} over {:?}",
        r.reservation_ms, r.first_relayed_request_ms, r.direct_upgrade_ms, r.direct_transport
    );
    eprintln!(
        "  connected before the first request: {:?}",
        r.connected_before_first_request
    );
    for (path, v) in samples {
        r.latency
            .push(crate::lat(&format!("forwarded Query A→B, {path}"), v));
    }
    Ok(r)
}
