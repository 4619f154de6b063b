//! Paged queries: paging through 50,000 records while writes continue returns each record that
//! exists throughout exactly once, in key order; forged and foreign tokens are refused; unpaged
//! queries keep the 10,000-record refusal.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fold_proto::v1::{BatchMutateRequest, BatchMutation, MutationType, RangeFilter, range_filter};
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::json;
use tonic::Code;

const N: usize = 50_000;

/// Load and approve a Range schema `name` with an open `id` key and an `n` field.
async fn open_schema(
    c: &mut fold_proto::v1::fold_node_client::FoldNodeClient<tonic::transport::Channel>,
    name: &str,
) {
    let s = schema(
        name,
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "n": field(json!("NoRequirement"), json!("NoRequirement"))}),
    );
    c.load_schema(load_req(&s, true)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_returns_every_record_once_while_writes_continue() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--max-message-bytes", "16777216"]).unwrap();
    let mut c = fold(&node.grpc);
    open_schema(&mut c, "Items").await;
    for chunk in 0..N / 5000 {
        let mutations = (chunk * 5000..(chunk + 1) * 5000)
            .map(|i| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: Some(fold_proto::json::map_to_struct(
                    json!({"id": format!("k{i:06}"), "n": i})
                        .as_object()
                        .unwrap(),
                )),
                data_json: String::new(),
            })
            .collect();
        c.batch_mutate(BatchMutateRequest {
            schema: "Items".into(),
            mutations,
            target_node_id: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    // Unpaged, 50,000 records are refused, and the refusal says how to page.
    let e = c.query(query_req("Items", &["n"], None)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("page_size"), "{e:?}");

    // A writer inserts new keys between existing ones and updates existing records meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut w = fold(&node.grpc);
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                let _ = w
                    .mutate(mutate_req(
                        "Items",
                        MutationType::Create,
                        json!({"id": format!("k{:06}x", (i * 7919) % N), "n": -1}),
                    ))
                    .await;
                let _ = w
                    .mutate(mutate_req(
                        "Items",
                        MutationType::Update,
                        json!({"id": format!("k{:06}", (i * 104729) % N), "n": -2}),
                    ))
                    .await;
                i += 1;
            }
        })
    };
    let mut seen = HashSet::new();
    let mut last = String::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let mut q = query_req("Items", &["n"], None);
        q.page_size = 1000;
        q.page_token = token.clone();
        let r = c.query(q).await.unwrap().into_inner();
        pages += 1;
        assert!(r.records.len() <= 1000);
        for rec in &r.records {
            assert!(
                rec.range_key > last,
                "key order: {} after {last}",
                rec.range_key
            );
            assert!(
                seen.insert(rec.range_key.clone()),
                "{} twice",
                rec.range_key
            );
            last = rec.range_key.clone();
        }
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
        assert!(pages < 200, "paging does not end");
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for i in 0..N {
        assert!(seen.contains(&format!("k{i:06}")), "k{i:06} missing");
    }

    // Tokens: forged, or from another query, are refused.
    let mut q = query_req("Items", &["n"], None);
    q.page_size = 10;
    let first = c.query(q.clone()).await.unwrap().into_inner();
    let first_last = first.records.last().unwrap().range_key.clone();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let mut forged = q.clone();
    forged.page_token = format!("{}.{}", "6b303030303939", token.split_once('.').unwrap().1);
    let e = c.query(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut other = q.clone();
    other.filter = Some(RangeFilter {
        filter: Some(range_filter::Filter::KeyPrefix("k01".into())),
    });
    other.page_token = token.clone();
    let e = c.query(other).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The genuine token continues right after the first page's last key.
    let mut next = q.clone();
    next.page_token = token;
    let r = c.query(next).await.unwrap().into_inner();
    assert!(r.records[0].range_key > first_last);
    let mut all = c
        .query({
            let mut q = query_req("Items", &["n"], None);
            q.page_size = 11;
            q
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(
        all.pop().unwrap().range_key,
        r.records[0].range_key,
        "no key skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_return_every_version_once_while_writes_continue() {
    use fold_proto::v1::HistoryRequest;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    open_schema(&mut c, "Counter").await;
    c.mutate(mutate_req(
        "Counter",
        MutationType::Create,
        json!({"id": "a", "n": 0}),
    ))
    .await
    .unwrap();
    for n in 1..25 {
        c.mutate(mutate_req(
            "Counter",
            MutationType::Update,
            json!({"id": "a", "n": n}),
        ))
        .await
        .unwrap();
    }
    let req = |token: String| HistoryRequest {
        target_node_id: String::new(),
        route: 0,
        schema: "Counter".into(),
        field: "n".into(),
        range_key: "a".into(),
        limit: 0,
        json_values: false,
        page_size: 10,
        page_token: token,
        definition_hash: Default::default(),
    };
    let first = c.history(req(String::new())).await.unwrap().into_inner();
    assert_eq!(first.versions.len(), 10);
    // New versions arrive between pages: they are before the cursor.
    for n in 100..105 {
        c.mutate(mutate_req(
            "Counter",
            MutationType::Update,
            json!({"id": "a", "n": n}),
        ))
        .await
        .unwrap();
    }
    let mut ids: Vec<String> = first
        .versions
        .iter()
        .map(|v| v.version_id.clone())
        .collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = c.history(req(token)).await.unwrap().into_inner();
        ids.extend(page.versions.iter().map(|v| v.version_id.clone()));
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 25, "the 25 versions that existed, each once");
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 25);
    // A token of another key's history is refused.
    let other = HistoryRequest {
        range_key: "b".into(),
        ..req(c
            .history(req(String::new()))
            .await
            .unwrap()
            .into_inner()
            .next_page_token)
    };
    let e = c.history(other).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_streams_every_record_in_key_order() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    open_schema(&mut c, "Export").await;
    const M: usize = 12_500;
    for chunk in 0..M / 2500 {
        let mutations = (chunk * 2500..(chunk + 1) * 2500)
            .map(|i| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: None,
                data_json: format!(r#"{{"id": "e{i:06}", "n": {i}}}"#),
            })
            .collect();
        c.batch_mutate(BatchMutateRequest {
            schema: "Export".into(),
            mutations,
            target_node_id: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    // More than the unpaged limit, streamed whole, in order, with exact values.
    let mut q = query_req("Export", &["n"], None);
    q.json_values = true;
    q.page_size = 1000;
    let mut stream = c.scan(q.clone()).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(rec) = stream.next().await {
        let rec = rec.unwrap();
        assert_eq!(rec.range_key, format!("e{n:06}"));
        assert_eq!(rec.fields_json, format!(r#"{{"n":{n}}}"#));
        n += 1;
    }
    assert_eq!(n, M);
    // Bad requests fail the call itself.
    let e = c.scan(query_req("Nope", &["n"], None)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut remote = q.clone();
    remote.target_node_id = "12D3KooWGzBjzYtuhmFRXbBqsCP5Xv6TUgaWbeoGTHYEdRW6HNm3".into();
    assert_eq!(
        c.scan(remote).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}
