use std::time::Duration;

use moat_ca::SpiffeId;

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
fn allow_peers_reads_in_logs_as_written() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(
        c.inbound[0].allow_peers_text(),
        "spiffe://example.org/ns/prod/*,spiffe://example.org/ns/dev/sa/web"
    );
    let open = parse(&MINIMAL.replace("allow_peers", "# allow_peers")).unwrap();
    assert_eq!(open.inbound[0].allow_peers_text(), "any-peer");
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

const CA_IDENTITY: &str = r#"
[identity]
ca_url = "https://ca:8443"
bundle = "bundle.pem"
token_file = "/etc/moat/token"

[[inbound]]
name = "api"
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
"#;

#[test]
fn ca_url_is_one_url_or_a_list_and_state_dir_is_resolved() {
    let c = parse(CA_IDENTITY).unwrap();
    let Identity::Ca(ca) = &c.identity else {
        panic!("ca")
    };
    assert_eq!(ca.ca_urls, ["https://ca:8443"]);
    assert!(ca.state_dir.is_none(), "keys stay in memory by default");
    let text = CA_IDENTITY.replace(
        "ca_url = \"https://ca:8443\"",
        "ca_url = [\"https://ca-1:8443\", \"https://ca-2:8443\"]\nstate_dir = \"state\"",
    );
    let c = parse(&text).unwrap();
    let Identity::Ca(ca) = &c.identity else {
        panic!("ca")
    };
    assert_eq!(ca.ca_urls, ["https://ca-1:8443", "https://ca-2:8443"]);
    assert_eq!(ca.state_dir.as_deref(), Some(Path::new("/etc/moat/state")));
}

#[test]
fn bad_ca_url_lists_name_the_field() {
    for (list, want) in [
        ("[]", "at least one"),
        ("[\"https://a:1\", \"http://b:1\"]", "https://"),
        ("[\"https://a:1\", \"https://a:1\"]", "twice"),
        ("42", "URL"),
    ] {
        let text = CA_IDENTITY.replace("\"https://ca:8443\"", list);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("proxy.toml:"), "{err}");
        assert!(err.contains(want), "{list}: {err}");
    }
    let text = MINIMAL.replace("[identity]", "[identity]\nstate_dir = \"/var/lib/moat\"");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("state_dir"), "{err}");
}

/// `file:line:column` of an error, and its message.
fn position(err: &ConfigError) -> (usize, usize, String) {
    match err {
        ConfigError::Parse {
            line,
            column,
            message,
            ..
        } => (*line, *column, message.clone()),
        other => panic!("no position: {other}"),
    }
}

/// Checks made after the fields are read (a URL's scheme, a listener off
/// loopback, a limit out of range, a field that does not fit the identity
/// kind) point at the value they are about, not at its table or nowhere.
#[test]
fn errors_found_after_parsing_point_at_the_value() {
    // (text, the line and column of the value, a word of the message)
    let cases = [
        (
            CA_IDENTITY.replace("https://ca:8443", "http://127.0.0.1:47443"),
            (3, 10),
            "https://",
        ),
        (
            CA_IDENTITY.replace("\"https://ca:8443\"", "[\"https://a:1\", \"http://b:1\"]"),
            // An element's error is placed at its array.
            (3, 10),
            "https://",
        ),
        (
            CA_IDENTITY.replace("token_file", "deny_list = \"deny.json\"\ntoken_file"),
            (5, 13),
            "deny_list",
        ),
        (
            CA_IDENTITY.replace("token_file", "retry_base = \"0s\"\ntoken_file"),
            (5, 14),
            "retry_base",
        ),
        (
            MINIMAL.replace("[identity]", "[identity]\nstate_dir = \"/var/lib/moat\""),
            (3, 13),
            "state_dir",
        ),
        (
            MINIMAL.replace("127.0.0.1:8080", "10.0.0.1:8080"),
            (10, 11),
            "off loopback",
        ),
        (
            format!("{MINIMAL}allow_peers = []\n").replace(
                "allow_peers = [\"spiffe://example.org/ns/prod/*\", \"spiffe://example.org/ns/dev/sa/web\"]\n",
                "",
            ),
            (11, 15),
            "allow_peers",
        ),
        (
            format!("[limits]\nmax_connections = 0\n{MINIMAL}"),
            (2, 19),
            "max_connections",
        ),
        (
            format!("{MINIMAL}\n[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:1\"\nforward = \"127.0.0.1:2\"\n"),
            (14, 8),
            "used twice",
        ),
    ];
    for (text, (line, column), word) in cases {
        let err = parse(&text).unwrap_err();
        let (l, c, message) = position(&err);
        assert_eq!((l, c), (line, column), "{err}\n{text}");
        assert!(message.contains(word), "{err}");
        assert!(err.to_string().contains(" (at `"), "quotes the line: {err}");
    }
}

#[test]
fn destinations_need_outbound_redirection_and_distinct_names() {
    let base = MINIMAL.to_owned()
        + "\n[[destination]]\nip = \"10.0.0.5\"\npeer = \"spiffe://example.org/ns/prod/sa/billing\"\n";
    let err = parse(&base).unwrap_err().to_string();
    assert!(err.contains("[[destination]] needs [redirect]"), "{err}");
    let with_redirect =
        base.clone() + "\n[redirect]\nunmatched = \"deny\"\nmode = \"permissive\"\n";
    let c = parse(&with_redirect).unwrap();
    assert_eq!(c.destination.len(), 1);
    let r = c.redirect.unwrap();
    assert_eq!(r.unmatched, crate::transparent::Unmatched::Deny);
    assert_eq!(r.mode, crate::transparent::InboundMode::Permissive);
    assert_eq!(r.detection_timeout, Duration::from_secs(5));
    let twice = with_redirect.clone()
        + "\n[[destination]]\nip = \"10.0.0.5\"\npeer = \"spiffe://example.org/ns/prod/sa/other\"\n";
    let err = parse(&twice).unwrap_err().to_string();
    assert!(err.contains("named twice"), "{err}");
    let bad_peer = with_redirect.replace("spiffe://example.org/ns/prod/sa/billing", "billing");
    let err = parse(&bad_peer).unwrap_err().to_string();
    assert!(
        err.contains("proxy.toml:") && err.contains("billing"),
        "{err}"
    );
    // A transparent client pod may have no listener of its own.
    let only =
        "[identity]\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n\n[redirect]\ninbound_ports = []\n";
    assert!(parse(only).is_ok());
    let none = only.replace("[redirect]\ninbound_ports = []\n", "");
    assert!(parse(&none).is_err());
}
