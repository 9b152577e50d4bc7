//! The app's kubelet probes in transparent mode, end to end: `moat inject`
//! points a pod's probes at the sidecar's admin port and records the
//! originals in the sidecar's environment; a real `moat proxy`, started
//! with exactly that environment, answers the rewritten paths by probing a
//! real app on loopback, and answers nothing else under `/app-health/`.

use crate::support;
use crate::support::proxy::{curl_http, write};

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Running, moat_bin, path_str};

/// What the app saw of one request: path and query, and the probe headers.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    probe_header: Option<String>,
    user_agent: Option<String>,
}

/// A plain HTTP app on 127.0.0.1 (a thread with its own runtime) that
/// answers every request with `status` and records what it saw.
fn app(status: Arc<AtomicU16>, seen: Arc<Mutex<Vec<Seen>>>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr = moat_testkit::http::serve(move |req| {
                let status = status.clone();
                let seen = seen.clone();
                async move {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    seen.lock().unwrap().push(Seen {
                        uri: req.uri().to_string(),
                        probe_header: header("x-probe"),
                        user_agent: header("user-agent"),
                    });
                    let mut r = hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"app\n"),
                    ));
                    *r.status_mut() =
                        hyper::StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
                    r
                }
            })
            .await
            .unwrap();
            tx.send(addr).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("app bound")
}

/// `moat inject` (transparent mode) of `input`; the output as JSON.
fn inject(input: &str) -> serde_json::Value {
    let mut child = Command::new(moat_bin())
        .args(["inject", "--image", "registry.example/moat:0.1.0", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON in, JSON out")
}

#[test]
fn injected_probes_are_answered_by_the_sidecar_from_the_app() {
    let status = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app_addr = app(status.clone(), seen.clone());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = app_addr.port();
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {"containers": [{
            "name": "app",
            "image": "example/orders:2.0",
            "ports": [{"name": "http", "containerPort": port}],
            "livenessProbe": {"httpGet": {"path": "/healthz?full=1", "port": "http",
                "httpHeaders": [{"name": "X-Probe", "value": "liveness"}]}},
            "readinessProbe": {"tcpSocket": {"port": port}},
            "startupProbe": {"httpGet": {"path": "/started", "port": closed}, "timeoutSeconds": 2},
        }]},
    });
    let out = inject(&pod.to_string());

    // The probes now ask the sidecar's admin port ...
    let app_c = &out["spec"]["containers"][0];
    for (field, path) in [
        ("livenessProbe", "/app-health/app/livez"),
        ("readinessProbe", "/app-health/app/readyz"),
        ("startupProbe", "/app-health/app/startupz"),
    ] {
        assert_eq!(
            app_c[field]["httpGet"],
            serde_json::json!({"path": path, "port": 9901}),
            "{field}"
        );
    }
    assert_eq!(app_c["startupProbe"]["timeoutSeconds"], 2);
    // ... and the sidecar carries the originals.
    let sidecar = &out["spec"]["initContainers"][1];
    assert_eq!(sidecar["name"], "moat-proxy");
    assert_eq!(sidecar["env"][0]["name"], "MOAT_APP_PROBES");
    let probes = sidecar["env"][0]["value"].as_str().unwrap().to_owned();

    // The sidecar, started with that environment.
    let dir = tempfile::tempdir().unwrap();
    let ca = support::ca_init(&dir.path().join("ca"));
    let (cert, key) = (dir.path().join("p.crt"), dir.path().join("p.key"));
    ca.issue("spiffe://example.org/ns/shop/sa/orders", "1h", &cert, &key)
        .unwrap();
    let bundle = write(dir.path(), "bundle.pem", &ca.bundle().unwrap());
    let config = write(
        dir.path(),
        "proxy.toml",
        &format!(
            "[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:{}\"\n",
            path_str(&cert),
            path_str(&key),
            path_str(&bundle),
            port
        ),
    );
    let mut proxy = Running::start_with_env(
        &["proxy", "--config", path_str(&config)],
        &[("MOAT_APP_PROBES", &probes)],
    );
    let admin = proxy.listening_addr("admin");

    // httpGet: the app's status, relayed; the app saw the original request.
    let (code, body) = curl_http(admin, "/app-health/app/livez", &[]);
    assert_eq!((code, body.as_str()), (200, "app answered 200 OK\n"));
    let last = seen
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("the app was asked");
    assert_eq!(last.uri, "/healthz?full=1");
    assert_eq!(last.probe_header.as_deref(), Some("liveness"));
    assert_eq!(last.user_agent.as_deref(), Some("kube-probe/moat"));
    status.store(503, Ordering::SeqCst);
    assert_eq!(curl_http(admin, "/app-health/app/livez", &[]).0, 503);
    // A redirect is success for the kubelet: answered 200, not followed.
    status.store(302, Ordering::SeqCst);
    assert_eq!(curl_http(admin, "/app-health/app/livez", &[]).0, 200);
    status.store(404, Ordering::SeqCst);
    assert_eq!(curl_http(admin, "/app-health/app/livez", &[]).0, 404);

    // tcpSocket: a connection to the app's port.
    let (code, body) = curl_http(admin, "/app-health/app/readyz", &[]);
    assert_eq!((code, body.as_str()), (200, "app accepted a connection\n"));
    // Nothing listens on the startup probe's port: 503, with why.
    let (code, body) = curl_http(admin, "/app-health/app/startupz", &[]);
    assert_eq!(code, 503);
    assert!(body.contains(&format!("127.0.0.1:{closed}")), "{body}");

    // Only registered probes: nothing else under /app-health/ reaches the app.
    let before = seen.lock().unwrap().len();
    for path in [
        "/app-health/app/other",
        "/app-health/other/livez",
        "/app-health/app/livez/../readyz",
    ] {
        assert_eq!(curl_http(admin, path, &["--path-as-is"]).0, 404, "{path}");
    }
    assert_eq!(seen.lock().unwrap().len(), before);
    // moat's own endpoints are unchanged.
    assert_eq!(curl_http(admin, "/live", &[]).0, 200);
}

#[test]
fn a_malformed_probe_environment_stops_the_proxy_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::ca_init(&dir.path().join("ca"));
    let (cert, key) = (dir.path().join("p.crt"), dir.path().join("p.key"));
    ca.issue("spiffe://example.org/ns/shop/sa/orders", "1h", &cert, &key)
        .unwrap();
    let bundle = write(dir.path(), "bundle.pem", &ca.bundle().unwrap());
    let config = write(
        dir.path(),
        "proxy.toml",
        &format!(
            "[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[inbound]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nforward = \"127.0.0.1:{}\"\n",
            path_str(&cert),
            path_str(&key),
            path_str(&bundle),
            1
        ),
    );
    let out = Command::new(moat_bin())
        .args(["proxy", "--config", path_str(&config)])
        .env(
            "MOAT_APP_PROBES",
            r#"{"/app-health/app/livez":{"exec":{}}}"#,
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MOAT_APP_PROBES") && stderr.contains("exec"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "a port was bound: {stderr}");
}
