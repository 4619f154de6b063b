//! Test certificates: a CA, a server certificate for `localhost`, and client certificates (for
//! mutual TLS) with the given subject CNs, all made fresh with rcgen.

/// (CA PEM, (server cert PEM, server key PEM), [(client CN, cert PEM, key PEM)])
pub type TlsMaterial = (String, (String, String), Vec<(String, String, String)>);

/// A fresh CA with a `localhost` server certificate and one client certificate per CN.
pub fn material(client_cns: &[&str]) -> TlsMaterial {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "foldmesh test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let server_key = KeyPair::generate().expect("server key");
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    let server = sp
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    let clients = client_cns
        .iter()
        .map(|cn| {
            let k = KeyPair::generate().expect("client key");
            let mut p =
                CertificateParams::new(vec![format!("{cn}.example")]).expect("client params");
            p.distinguished_name.push(DnType::CommonName, *cn);
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let c = p.signed_by(&k, &ca, &ca_key).expect("client certificate");
            (cn.to_string(), c.pem(), k.serialize_pem())
        })
        .collect();
    (
        ca.pem(),
        (server.pem(), server_key.serialize_pem()),
        clients,
    )
}

/// A FoldNode client of `addr` over TLS trusting `ca` (the server is `localhost`), presenting the
/// client certificate and key `identity` when given (mutual TLS).
pub async fn fold_client(
    addr: &str,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> fold_proto::v1::fold_node_client::FoldNodeClient<tonic::transport::Channel> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("an https endpoint")
        .tls_config(tls)
        .expect("a TLS configuration")
        .connect()
        .await
        .expect("a TLS connection");
    fold_proto::v1::fold_node_client::FoldNodeClient::new(ch)
}
