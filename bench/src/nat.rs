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
    pub relayed: Option<crate::Lat>,
    pub direct: Option<crate::Lat>,
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

/// `rounds` labs of each kind; the latency samples (`n` sequential queries) come from the first.
pub async fn measure(rounds: usize, n: usize) -> anyhow::Result<NatResults> {
    let mut r = NatResults {
        rounds,
        ..Default::default()
    };
    let mut relayed = Vec::new();
    let mut direct = Vec::new();
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
        let t = Instant::now();
        let mut req = tonic::Request::new(to_b(&lab.b));
        req.set_timeout(Duration::from_secs(30));
        fold(&lab.a.grpc()).query(req).await?;
        r.first_relayed_request_ms
            .push(t.elapsed().as_secs_f64() * 1e3);
        let p = peer(&lab.a, &lab.b.node_id).await;
        if p.as_ref().map(|p| p.connection.as_str()) != Some("relayed") {
            bail!("expected a relayed connection from A to B, got {p:?}");
        }
        if round == 0 {
            relayed = latency(&lab.a, &lab.b, n).await?;
        }
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
        r.direct_transport.push(p.transport);
        if round == 0 {
            direct = latency(&lab.a, &lab.b, n).await?;
        }
    }
    eprintln!(
        "  reservation ms {:?}; first relayed request ms {:?}; direct upgrade ms {:?} over {:?}",
        r.reservation_ms, r.first_relayed_request_ms, r.direct_upgrade_ms, r.direct_transport
    );
    r.relayed = Some(crate::lat(
        "forwarded Query A→B, relayed (circuit relay v2)",
        relayed,
    ));
    r.direct = Some(crate::lat(
        "forwarded Query A→B, direct (after DCUtR)",
        direct,
    ));
    Ok(r)
}
