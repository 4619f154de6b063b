//! fold-client over a Unix domain socket (the transport of the node's owner socket): a real tonic
//! server with grpc.health.v1 on a socket file, reached by `unix:/path` and by a bare path; the
//! gRPC code of a refused call is kept; a missing socket is a connection error.

use std::time::Duration;

use fold_client::{ClientBuilder, Error, Health};
use local_link::{LinkAddr, LinkListener};

#[tokio::test]
async fn unix_socket_addresses_reach_a_grpc_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owner.sock");
    let listener = LinkListener::bind(&LinkAddr::Unix(path.clone()))
        .await
        .unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("fold.v1.Network", tonic_health::ServingStatus::NotServing)
        .await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(listener.into_incoming()),
    );

    for addr in [
        format!("unix:{}", path.display()),
        path.display().to_string(),
    ] {
        let client = ClientBuilder::new(&addr)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        assert_eq!(client.health("").await.unwrap(), Health::Serving, "{addr}");
        assert_eq!(
            client.health("fold.v1.Network").await.unwrap(),
            Health::NotServing
        );
        // This server has no FoldNode service: the status code survives as sent.
        let err = client.list_schemas(None).await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::Unimplemented), "{err}");
    }

    let missing = ClientBuilder::new(format!("unix:{}", dir.path().join("nope.sock").display()))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::Connect { .. }), "{missing}");
    assert!(missing.is_unavailable());
    let tls_on_unix = ClientBuilder::new(format!("unix:{}", path.display()))
        .tls_ca_pem("x")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(tls_on_unix, Error::Config(_)), "{tls_on_unix}");
    server.abort();
}
