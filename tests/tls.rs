//! TLS on presenced's own ports (`service.tls`), with certificates made by openssl and
//! clients that speak TLS for real: reqwest and curl (HTTPS), tokio-tungstenite and wscat
//! (WSS), tonic and grpcurl (gRPC over TLS, mTLS).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use presenced::grpc::pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for 127.0.0.1 (`<name>.pem`, `<name>.key`), as the README
/// makes one.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    (dir.join(cert), dir.join(key))
}

fn tls_env(cert: &Path, key: &Path) -> Vec<(String, String)> {
    vec![
        ("PRESENCE_SERVICE__TLS__CERT_FILE".into(), cert.display().to_string()),
        ("PRESENCE_SERVICE__TLS__KEY_FILE".into(), key.display().to_string()),
        ("PRESENCE_SERVICE__TLS__RELOAD_INTERVAL".into(), "200ms".into()),
    ]
}

async fn start(env: &[(String, String)]) -> TestServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&env).await
}

fn port(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).expect("port")
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("pem")).expect("root");
    }
    roots
}

/// A rustls client trusting `ca` (ALPN `alpn`), with a client certificate if given.
fn connector(ca: &Path, alpn: &[&[u8]], client: Option<(&Path, &Path)>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca));
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).expect("cert").collect::<Result<Vec<_>, _>>().expect("pem");
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).expect("key")).expect("client cert")
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// The certificate the server at `port` presents to a new connection.
async fn served_cert(port: u16, ca: &Path) -> Option<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let tls = connector(ca, &[b"http/1.1"], None).connect(ServerName::try_from("127.0.0.1").ok()?, tcp).await.ok()?;
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec())
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).expect("cert").to_vec()
}

fn https(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("ca");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A gRPC client over TLS (with a client certificate for mTLS).
async fn grpc_client(
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<pb::presence_api_client::PresenceApiClient<tonic::transport::Channel>, tonic::transport::Error> {
    let connector = connector(ca, &[b"h2"], client);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(pb::presence_api_client::PresenceApiClient::new(channel))
}

#[tokio::test]
async fn https_wss_and_grpc_over_tls_and_plain_http_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "server");
    let s = start(&tls_env(&cert, &key)).await;
    let (http_port, grpc_port) = (port(&s.base), port(&s.grpc));
    let base = format!("https://127.0.0.1:{http_port}");

    // HTTPS: a read and a write.
    let client = https(&cert);
    let health = client.get(format!("{base}/health")).send().await.expect("https");
    assert_eq!(health.status(), 200);
    let put = client
        .put(format!("{base}/api/v2/presence/alice"))
        .bearer_auth(s.token("alice"))
        .json(&serde_json::json!({"status": "busy", "message": "over TLS"}))
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200, "{:?}", put.text().await);
    // curl, an outside client.
    // (Outside clients run as tokio processes: the server shares this test's runtime.)
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(format!("{base}/api/v2/presence/alice"))
        .output()
        .await
        .expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(body["data"]["alice"]["message"], "over TLS", "{body}");

    // Plain HTTP on the TLS port: answered 400 in plain text, before any handshake.
    let plain = reqwest::get(format!("http://127.0.0.1:{http_port}/health")).await.expect("plain http answered");
    assert_eq!(plain.status(), 400);
    assert!(plain.text().await.unwrap().contains("TLS only"));
    // And nothing of the API over plain text: no envelope, no data.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    raw.write_all(b"GET /api/v2/presence/alice HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400") && !answer.contains("over TLS"), "{answer}");

    // WSS: a session and its snapshot.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.unwrap();
    let tls = connector(&cert, &[b"http/1.1"], None).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.expect("tls");
    let url = format!("wss://127.0.0.1:{http_port}/ws?token={}&device_id=laptop", s.token("bob"));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.expect("wss upgrade");
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        serde_json::json!({"type": "subscribe", "id": "1", "payload": {"user_ids": ["alice"]}}).to_string(),
    ))
    .await
    .unwrap();
    let mut saw_alice = false;
    for _ in 0..10 {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await else { break };
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            if t.contains("\"over TLS\"") {
                saw_alice = true;
                break;
            }
        }
    }
    assert!(saw_alice, "the WSS subscriber sees alice's status");
    // wscat (npm), an outside client, over WSS: its first line is the greeting.
    let mut wscat = tokio::process::Command::new("wscat")
        .arg("--ca")
        .arg(&cert)
        .args(["-c", &format!("wss://127.0.0.1:{http_port}/ws?token={}&device_id=phone", s.token("carol"))])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wscat");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = wscat.start_kill();
    let out = wscat.wait_with_output().await.expect("wscat output");
    let said = String::from_utf8_lossy(&out.stdout);
    let first: serde_json::Value = serde_json::from_str(said.lines().next().unwrap_or(""))
        .unwrap_or_else(|_| panic!("wscat over WSS: {said} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(first["type"], "connected", "{said}");

    // gRPC over TLS.
    let mut grpc = grpc_client(grpc_port, &cert, None).await.expect("grpc over tls");
    let got = grpc
        .get_presence(s.admin_request(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }))
        .await
        .expect("GetPresence over TLS")
        .into_inner();
    assert_eq!(got.presences.first().map(|p| p.message.as_str()), Some("over TLS"));
    // grpcurl, an outside client.
    let out = tokio::process::Command::new("grpcurl")
        .args(["-max-time", "10", "-cacert"])
        .arg(&cert)
        .args([&format!("127.0.0.1:{grpc_port}"), "list"])
        .output()
        .await
        .expect("grpcurl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("realchat.presence.v1.PresenceApi"), "grpcurl: {out:?}");
    // Plain-text gRPC (h2c) is refused.
    let plain = tonic::transport::Endpoint::from_shared(s.grpc.clone()).unwrap().connect().await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => pb::presence_api_client::PresenceApiClient::new(ch)
            .get_presence(s.admin_request(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }))
            .await
            .is_err(),
    };
    assert!(refused, "h2c on the TLS gRPC port must fail");
    s.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = self_signed(dir.path(), "a");
    let (cert_b, key_b) = self_signed(dir.path(), "b");
    let (cert, key) = (dir.path().join("live.pem"), dir.path().join("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let s = start(&tls_env(&cert, &key)).await;
    let (http_port, grpc_port) = (port(&s.base), port(&s.grpc));
    assert_eq!(served_cert(http_port, &cert_a).await, Some(der(&cert_a)));
    // A connection opened before the rotation keeps working after it.
    let before = https(&cert_a);
    assert_eq!(before.get(format!("https://127.0.0.1:{http_port}/health")).send().await.unwrap().status(), 200);

    // A half-done rotation (new certificate, old key) is refused: the old pair stays.
    std::fs::copy(&cert_b, &cert).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(served_cert(http_port, &cert_a).await, Some(der(&cert_a)), "a mismatched pair must not be used");
    std::fs::copy(&key_b, &key).unwrap();
    eventually("the new certificate is served", Duration::from_secs(10), async || {
        served_cert(http_port, &cert_b).await == Some(der(&cert_b))
    })
    .await;
    assert_eq!(
        before.get(format!("https://127.0.0.1:{http_port}/health")).send().await.unwrap().status(),
        200,
        "an open connection survives"
    );
    // The gRPC port rotates too.
    let mut grpc = grpc_client(grpc_port, &cert_b, None).await.expect("grpc with the new certificate");
    grpc.get_presence(s.admin_request(pb::GetPresenceRequest { user_ids: vec!["x".into()] })).await.expect("call");
    assert!(grpc_client(grpc_port, &cert_a, None).await.is_err(), "the old certificate is no longer served");
    let metrics = https(&cert_b).get(format!("https://127.0.0.1:{http_port}/metrics")).send().await.unwrap().text().await.unwrap();
    let reloads = sample(&metrics, "tls_reloads_total");
    assert!(reloads >= 1.0, "tls_reloads_total {reloads}");
    s.stop().await;
}

#[tokio::test]
async fn grpc_requires_a_client_certificate_with_client_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server_cert, server_key) = certificates(dir.path());
    // A gateway's certificate, signed by the CA.
    openssl(dir.path(), &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "gw.key", "-out", "gw.csr", "-subj", "/CN=gateway-1"]);
    std::fs::write(dir.path().join("gw.cnf"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    openssl(
        dir.path(),
        &[
            "x509",
            "-req",
            "-in",
            "gw.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "gw.pem",
            "-days",
            "2",
            "-extfile",
            "gw.cnf",
        ],
    );
    // A stranger's, self-signed.
    let (stranger_cert, stranger_key) = self_signed(dir.path(), "stranger");
    let mut env = tls_env(&server_cert, &server_key);
    env.push(("PRESENCE_SERVICE__TLS__CLIENT_CA_FILE".into(), ca.display().to_string()));
    let s = start(&env).await;
    let (http_port, grpc_port) = (port(&s.base), port(&s.grpc));
    let (gw_cert, gw_key) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));

    let call = async |client: Option<(&Path, &Path)>| -> bool {
        match grpc_client(grpc_port, &ca, client).await {
            Err(_) => false,
            Ok(mut c) => c.get_presence(s.admin_request(pb::GetPresenceRequest { user_ids: vec!["x".into()] })).await.is_ok(),
        }
    };
    assert!(call(Some((&gw_cert, &gw_key))).await, "the gateway's certificate is accepted");
    assert!(!call(None).await, "no client certificate: refused");
    assert!(!call(Some((&stranger_cert, &stranger_key))).await, "a certificate from another CA: refused");
    // grpcurl with and without the gateway's certificate.
    let grpcurl = async |with_cert: bool| {
        let mut c = tokio::process::Command::new("grpcurl");
        c.args(["-max-time", "10", "-cacert"]).arg(&ca);
        if with_cert {
            c.arg("-cert").arg(&gw_cert).arg("-key").arg(&gw_key);
        }
        c.args([&format!("127.0.0.1:{grpc_port}"), "list"]).output().await.expect("grpcurl")
    };
    let with = grpcurl(true).await;
    assert!(String::from_utf8_lossy(&with.stdout).contains("realchat.presence.v1.PresenceApi"), "{with:?}");
    assert!(!grpcurl(false).await.status.success(), "grpcurl without a client certificate must fail");
    // The HTTP port never asks browsers for a certificate.
    assert_eq!(https(&ca).get(format!("https://127.0.0.1:{http_port}/health")).send().await.unwrap().status(), 200);
    s.stop().await;
}

#[test]
fn an_unusable_certificate_exits_64_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _key) = self_signed(dir.path(), "server");
    let (_, other_key) = self_signed(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (c, k, named) in [
        (&garbage, &other_key, &garbage),
        (&cert, &other_key, &other_key),
        (&cert, &dir.path().join("missing.key"), &dir.path().join("missing.key")),
    ] {
        let out = presenced_cmd(dir.path())
            .arg("serve")
            .env("PRESENCE_SERVICE__TLS__CERT_FILE", c)
            .env("PRESENCE_SERVICE__TLS__KEY_FILE", k)
            .output()
            .expect("run presenced");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains(&named.display().to_string()), "the message names {}: {err}", named.display());
    }
}
