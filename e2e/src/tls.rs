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
