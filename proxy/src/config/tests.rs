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
