//! Provider lookups tell "none found" from "the lookup failed": a node with no one to ask gets
//! an error, not an empty list; a lookup that asked the mesh and found nobody is an empty answer.

use std::time::Duration;

use fold_proto::v1::FindProvidersRequest;
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::start;
use foldmesh_e2e::mesh::eventually;
use serde_json::json;
use tonic::Code;

fn find(schema: &str) -> FindProvidersRequest {
    FindProvidersRequest {
        schema: schema.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_providers_tells_none_found_from_lookup_failed() {
    let a = start(&[]);
    // Alone: nobody to ask is a failure, said as such.
    let e = eventually("the sidecar link", Duration::from_secs(10), || async {
        match network(&a.node.grpc).find_providers(find("Notes")).await {
            Err(e) if e.code() == Code::Unavailable && e.message().contains("no other node") => {
                Some(e)
            }
            _ => None,
        }
    })
    .await
    .unwrap();
    assert!(e.message().contains("dial one"), "{e:?}");

    let b = start(&[]);
    let notes = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement"))}),
    );
    fold(&b.node.grpc)
        .load_schema(load_req(&notes, true))
        .await
        .unwrap();
    a.dial(&b).await;
    // Asked the mesh, nobody serves it: an empty answer, not an error.
    let r = network(&a.node.grpc)
        .find_providers(find("Nobody"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_ids.is_empty(), "{:?}", r.node_ids);
    // And B is found for the schema it serves.
    eventually(
        "A to find B as a provider",
        Duration::from_secs(20),
        || async {
            let r = network(&a.node.grpc)
                .find_providers(find("Notes"))
                .await
                .ok()?
                .into_inner();
            r.node_ids.contains(&b.id).then_some(())
        },
    )
    .await
    .unwrap();
}
