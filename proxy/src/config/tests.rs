use super::*;

const MINIMAL: &str = r#"
[identity]
cert = "tls.crt"
key = "tls.key"
bundle = "/etc/moat/bundle.pem"

[[inbound]]
name = "api"
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
allow_peers = ["spiffe://example.org/ns/prod/*", "spiffe://example.org/ns/dev/sa/web"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/moat/proxy.toml"), text)
}

#[test]
fn minimal_file_config_parses_with_defaults() {
    let c = parse(MINIMAL).unwrap();
    let Identity::Files(f) = &c.identity else {
        panic!("files")
    };
    assert_eq!(
        f.cert,
        Path::new("/etc/moat/tls.crt"),
        "relative to the config file"
    );
    assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(c.inbound[0].protocol, Protocol::Http);
    assert_eq!(c.limits.max_header_bytes, 16 * 1024);
    assert!(c.warnings().iter().any(|w| w.contains("no route policy")));
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let text = MINIMAL.replace("forward = ", "forwrad = ");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.starts_with("/etc/moat/proxy.toml:10:1:"), "{err}");
    assert!(err.contains("forwrad"), "{err}");
}

#[test]
fn bad_address_names_the_line() {
    let text = MINIMAL.replace("0.0.0.0:8443", "nowhere");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("proxy.toml:9:"), "{err}");
    assert!(err.contains("listen"), "{err}");
}

#[test]
fn bad_spiffe_id_in_allow_peers_is_refused() {
    let text = MINIMAL.replace(
        "spiffe://example.org/ns/dev/sa/web",
        "https://example.org/x",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("allow_peers"), "{err}");
}

#[test]
fn forward_off_loopback_needs_unsafe_forward() {
    let text = MINIMAL.replace("127.0.0.1:8080", "10.0.0.5:8080");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("unsafe_forward"), "{err}");
    let text = format!("{text}unsafe_forward = true\n");
    let c = parse(&text).unwrap();
    assert!(c.warnings().iter().any(|w| w.contains("unsafe_forward")));
}

#[test]
fn mixed_identity_sources_are_refused() {
    let text = MINIMAL.replace("[identity]", "[identity]\nca_url = \"https://ca:8443\"");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("either ca_url"), "{err}");
}

#[test]
fn duplicate_listener_names_are_refused() {
    let text = format!(
        "{MINIMAL}\n[[inbound]]\nname = \"api\"\nlisten = \"0.0.0.0:1\"\nforward = \"127.0.0.1:2\"\n"
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("used twice"), "{err}");
}

#[test]
fn peer_patterns_match_exact_or_prefix() {
    let id = |s| SpiffeId::parse(s).unwrap();
    let p = PeerPattern::parse("spiffe://example.org/ns/prod/*").unwrap();
    assert!(p.matches(&id("spiffe://example.org/ns/prod/sa/web")));
    assert!(!p.matches(&id("spiffe://example.org/ns/production/sa/web")));
    assert!(!p.matches(&id("spiffe://other.org/ns/prod/sa/web")));
    let all = PeerPattern::parse("spiffe://example.org/*").unwrap();
    assert!(all.matches(&id("spiffe://example.org/a")));
    assert!(!all.matches(&id("spiffe://example.org.evil/a")));
    let exact = PeerPattern::parse("spiffe://example.org/a").unwrap();
    assert!(exact.matches(&id("spiffe://example.org/a")));
    assert!(!exact.matches(&id("spiffe://example.org/a/b")));
    assert!(PeerPattern::parse("spiffe://example.org/a*").is_err());
}

#[test]
fn upstream_parses_host_port() {
    let u = Upstream::parse("billing.prod.svc:8443").unwrap();
    assert_eq!((u.host.as_str(), u.port), ("billing.prod.svc", 8443));
    assert_eq!(Upstream::parse("[::1]:9").unwrap().to_string(), "[::1]:9");
    assert!(Upstream::parse("billing").is_err());
    assert!(Upstream::parse("billing:0").is_err());
}

#[test]
fn durations_are_humane() {
    let text = format!("{MINIMAL}\n[limits]\nhandshake_timeout = \"250ms\"\n");
    let c = parse(&text).unwrap();
    assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
    let text = format!("{MINIMAL}\n[limits]\nhandshake_timeout = \"soon\"\n");
    assert!(parse(&text).is_err());
}

#[test]
fn the_service_is_spoken_to_in_http1_unless_the_listener_says_otherwise() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.inbound[0].app_protocol(), AppProtocol::Http1);
    for (value, want) in [
        ("http1", AppProtocol::Http1),
        ("http2", AppProtocol::Http2),
        ("grpc", AppProtocol::Grpc),
        ("auto", AppProtocol::Auto),
    ] {
        let text = format!("{MINIMAL}app_protocol = \"{value}\"\n");
        assert_eq!(parse(&text).unwrap().inbound[0].app_protocol(), want);
    }
    let err = parse(&format!("{MINIMAL}app_protocol = \"h3\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy.toml:12:") && err.contains("app_protocol"),
        "{err}"
    );
}

#[test]
fn forward_http_is_read_as_app_protocol_with_a_warning() {
    let c = parse(&format!("{MINIMAL}forward_http = \"http2\"\n")).unwrap();
    assert_eq!(c.inbound[0].app_protocol(), AppProtocol::Http2);
    let warnings = c.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("forward_http is deprecated") && w.contains("app_protocol")),
        "{warnings:?}"
    );
    let auto = parse(&format!("{MINIMAL}forward_http = \"auto\"\n")).unwrap();
    assert_eq!(auto.inbound[0].app_protocol(), AppProtocol::Auto);
    assert!(auto.warnings().iter().any(|w| w.contains("now probes")));
    let both = format!("{MINIMAL}forward_http = \"http2\"\napp_protocol = \"http1\"\n");
    let err = parse(&both).unwrap_err().to_string();
    assert!(err.contains("set app_protocol only"), "{err}");
}

#[test]
fn websocket_upgrades_pass_by_default_and_h2c_never() {
    let c = parse(MINIMAL).unwrap();
    let protocols: Vec<&str> = c.inbound[0]
        .upgrade_protocols
        .iter()
        .map(UpgradeProtocol::as_str)
        .collect();
    assert_eq!(protocols, ["websocket"]);
    let c = parse(&format!(
        "{MINIMAL}upgrade_protocols = [\"WebSocket\", \"mqtt/5\"]\n"
    ))
    .unwrap();
    assert_eq!(c.inbound[0].upgrade_protocols[1].as_str(), "mqtt/5");
    assert_eq!(c.inbound[0].upgrade_protocols[0].as_str(), "websocket");
    let err = parse(&format!("{MINIMAL}upgrade_protocols = [\"h2c\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("h2c") && err.contains("route policy"), "{err}");
    let err = parse(&format!("{MINIMAL}upgrade_protocols = [\"web socket\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a protocol token"), "{err}");
}

#[test]
fn header_count_limit_has_a_generous_default_and_bounds() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.limits.max_header_count, 256);
    let text = format!("[limits]\nmax_header_count = 8\n{MINIMAL}");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("max_header_count"), "{err}");
}
