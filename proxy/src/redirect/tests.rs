use super::*;

fn own() -> OwnPorts {
    OwnPorts {
        admin: Some(9901),
        inbound: vec![15443],
    }
}

fn parse(text: &str) -> Result<RedirectConfig, String> {
    #[derive(Deserialize)]
    struct File {
        redirect: RedirectConfig,
    }
    toml::from_str::<File>(text)
        .map(|f| f.redirect)
        .map_err(|e| e.to_string())
}

#[test]
fn defaults_redirect_every_inbound_port_but_moats_own_and_all_outbound() {
    let rules = Ruleset::new(&RedirectConfig::default(), &own()).unwrap();
    assert_eq!(
        rules.table_nft(),
        "table inet moat {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"lo\" return
\t\ttcp dport 9901 return
\t\ttcp dport 15443 return
\t\tmeta l4proto tcp redirect to :15006
\t}

\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\toifname \"lo\" return
\t\tmeta skuid 65532 return
\t\tmeta l4proto tcp redirect to :15001
\t}
}
"
    );
}

#[test]
fn listed_ports_and_every_skip_are_rules_in_order() {
    let c = parse(
        r#"[redirect]
inbound_ports = [8080, 9090, 8080]
inbound_listener_port = 16006
outbound_listener_port = 16001
skip_outbound_ports = [53, 443]
skip_outbound_cidrs = ["10.96.0.1", "10.96.0.0/12", "fd00::/8", "2001:db8::1"]
proxy_uid = 1337
proxy_gid = 1338
"#,
    )
    .unwrap();
    let text = Ruleset::new(&c, &own()).unwrap().table_nft();
    let rules: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("\t\t") && !l.contains("type nat"))
        .map(str::trim)
        .collect();
    assert_eq!(
        rules,
        [
            "iifname \"lo\" return",
            "tcp dport 8080 redirect to :16006",
            "tcp dport 9090 redirect to :16006",
            "oifname \"lo\" return",
            "meta skuid 1337 return",
            "meta skgid 1338 return",
            "ip daddr 10.96.0.1 return",
            "ip daddr 10.96.0.0/12 return",
            "ip6 daddr fd00::/8 return",
            "ip6 daddr 2001:db8::1 return",
            "tcp dport 53 return",
            "tcp dport 443 return",
            "meta l4proto tcp redirect to :16001",
        ]
    );
}

#[test]
fn inbound_only_or_outbound_only() {
    let c = parse("[redirect]\ninbound_ports = [8080]\noutbound = false\n").unwrap();
    let text = Ruleset::new(&c, &own()).unwrap().table_nft();
    assert!(text.contains("chain prerouting") && !text.contains("chain output"));
    let c = parse("[redirect]\ninbound_ports = []\n").unwrap();
    let text = Ruleset::new(&c, &own()).unwrap().table_nft();
    assert!(!text.contains("chain prerouting") && text.contains("chain output"));
    let c = parse("[redirect]\ninbound_ports = []\noutbound = false\n").unwrap();
    let err = Ruleset::new(&c, &own()).unwrap_err().to_string();
    assert!(err.contains("nothing to redirect"), "{err}");
}

#[test]
fn dry_run_text_replaces_the_table_in_one_file() {
    let rules = Ruleset::new(&RedirectConfig::default(), &own()).unwrap();
    let text = rules.to_nft();
    assert!(
        text.contains("table inet moat\ndelete table inet moat\ntable inet moat {\n"),
        "{text}"
    );
    assert!(text.ends_with(&rules.table_nft()));
    assert_eq!(cleanup_nft(), "table inet moat\ndelete table inet moat\n");
}

#[test]
fn moats_own_ports_cannot_be_listed_as_app_ports() {
    for (port, why) in [
        (9901, "admin"),
        (15443, "[[inbound]]"),
        (15006, "transparent"),
        (15001, "transparent"),
    ] {
        let c = parse(&format!("[redirect]\ninbound_ports = [8080, {port}]\n")).unwrap();
        let err = Ruleset::new(&c, &own()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("lists {port}")) && err.contains(why),
            "{err}"
        );
    }
}

#[test]
fn unusable_values_are_refused_naming_the_field() {
    for (text, want) in [
        ("inbound_listener_port = 0", "must not be 0"),
        ("outbound_listener_port = 15006", "both 15006"),
        (
            "skip_outbound_ports = [0]",
            "skip_outbound_ports lists port 0",
        ),
        (
            "inbound_ports = [8080]\nskip_inbound_ports = [22]",
            "skip_inbound_ports applies",
        ),
        ("proxy_uid = 0", "proxy_uid = 0"),
        ("proxy_gid = 0", "proxy_gid = 0"),
    ] {
        let c = parse(&format!("[redirect]\n{text}\n")).unwrap();
        let err = c.validate(&own()).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
    for (text, want) in [
        ("inbound_ports = \"some\"", "use \"all\" or a list"),
        ("inbound_ports = 8080", "\"all\" or a list of ports"),
        (
            "skip_outbound_cidrs = [\"10.96.0.1/12\"]",
            "host bits set (the network is 10.96.0.0/12)",
        ),
        ("skip_outbound_cidrs = [\"10.96.0.0/33\"]", "0 to 32"),
        (
            "skip_outbound_cidrs = [\"kubernetes\"]",
            "not an IP address",
        ),
        ("inbound_port = 1", "unknown field"),
    ] {
        let err = parse(&format!("[redirect]\n{text}\n")).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn inbound_ports_flag_reads_all_or_a_list() {
    assert_eq!("all".parse(), Ok(InboundPorts::All));
    assert_eq!(
        "8080, 9090".parse(),
        Ok(InboundPorts::Listed(vec![8080, 9090]))
    );
    assert_eq!("".parse(), Ok(InboundPorts::Listed(vec![])));
    assert!("80,http".parse::<InboundPorts>().is_err());
}

#[test]
fn user_and_group_names_are_read_from_the_files_without_nss() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let group = dir.path().join("group");
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\nmoat:x:998:997::/var/lib/moat:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(&group, "root:x:0:\nmoat:x:997:\n").unwrap();
    let c = parse("[redirect]\nproxy_uid = \"moat\"\nproxy_gid = \"moat\"\n").unwrap();
    let text = Ruleset::with_files(&c, &own(), &passwd, &group)
        .unwrap()
        .table_nft();
    assert!(text.contains("meta skuid 998 return"), "{text}");
    assert!(text.contains("meta skgid 997 return"), "{text}");
    let c = parse("[redirect]\nproxy_uid = \"nobody-here\"\n").unwrap();
    let err = Ruleset::with_files(&c, &own(), &passwd, &group)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy_uid = \"nobody-here\": no such name"),
        "{err}"
    );
}

#[test]
fn cidr_masks_cover_the_prefix() {
    let c: Cidr = "10.96.0.0/12".parse().unwrap();
    assert_eq!(
        c.bytes_and_mask(),
        (vec![10, 96, 0, 0], vec![255, 240, 0, 0])
    );
    let c: Cidr = "::/0".parse().unwrap();
    assert_eq!(c.bytes_and_mask().1, vec![0; 16]);
    assert_eq!(c.to_string(), "::/0");
    let c: Cidr = "192.0.2.7".parse().unwrap();
    assert_eq!((c.prefix(), c.to_string().as_str()), (32, "192.0.2.7"));
}

/// The batch, read back: each message's type, flags and attributes parse
/// and fill it exactly, and a rule's expressions are the ones
/// `nft --debug=netlink` shows for it.
#[test]
fn netlink_batch_frames_every_message_and_encodes_rules_like_nft() {
    let c = parse("[redirect]\ninbound_ports = [8080]\nskip_outbound_ports = [53]\n").unwrap();
    let rules = Ruleset::new(&c, &own()).unwrap();
    let built = netlink::build_replace(&rules);
    let mut msgs = Vec::new();
    let mut rest = &built.bytes[..];
    while !rest.is_empty() {
        let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(len >= 20 && len.is_multiple_of(4) && len <= rest.len());
        let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        msgs.push((ty, seq, attrs(&rest[20..len])));
        rest = &rest[len..];
    }
    let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
    // begin, newtable, deltable, newtable, 2 chains with 2 + 4 rules, end
    let nft = |t: u16| (10 << 8) | t;
    let mut want = vec![0x10, nft(0), nft(2), nft(0), nft(3), nft(6), nft(6), nft(3)];
    want.extend([nft(6); 4]);
    want.push(0x11);
    assert_eq!(types, want);
    assert_eq!(
        built.messages.len(),
        want.len() - 2,
        "every change is acknowledged"
    );
    // The prerouting redirect: tcp dport 8080 redirect to :15006.
    let rule = &msgs[6].2;
    assert_eq!(rule[0], (1, Attr::Bytes(b"moat\0".to_vec())));
    assert_eq!(rule[1], (2, Attr::Bytes(b"prerouting\0".to_vec())));
    let (4, Attr::Nested(exprs)) = &rule[2] else {
        panic!("expressions: {rule:?}")
    };
    let names: Vec<String> = exprs
        .iter()
        .map(|(_, e)| match e {
            Attr::Nested(e) => match &e[0].1 {
                Attr::Bytes(b) => String::from_utf8_lossy(&b[..b.len() - 1]).into_owned(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        ["meta", "cmp", "payload", "cmp", "immediate", "redir"]
    );
    let data = |i: usize| match &exprs[i].1 {
        Attr::Nested(e) => match &e[1].1 {
            Attr::Nested(d) => d.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    // cmp eq reg 1 0x901f (8080, network order)
    assert_eq!(
        data(3)[2],
        (3, Attr::Nested(vec![(1, Attr::Bytes(vec![0x1f, 0x90]))]))
    );
    // immediate reg 1 0x3a9e (15006), redir proto_min reg 1 flags 0x2
    assert_eq!(
        data(4)[1],
        (2, Attr::Nested(vec![(1, Attr::Bytes(vec![0x3a, 0x9e]))]))
    );
    assert_eq!(
        data(5),
        vec![
            (1, Attr::Bytes(1u32.to_be_bytes().to_vec())),
            (3, Attr::Bytes(2u32.to_be_bytes().to_vec()))
        ]
    );
}

#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Bytes(Vec<u8>),
    Nested(Vec<(u16, Attr)>),
}

/// Netlink attributes; each nested one is read as attributes too, and must
/// fill its length exactly.
fn attrs(mut buf: &[u8]) -> Vec<(u16, Attr)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = u16::from_ne_bytes(buf[..2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[2..4].try_into().unwrap());
        assert!(len >= 4 && len <= buf.len(), "attribute length {len}");
        let body = &buf[4..len];
        let attr = if ty & 0x8000 != 0 {
            Attr::Nested(attrs(body))
        } else {
            Attr::Bytes(body.to_vec())
        };
        out.push((ty & 0x7fff, attr));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

const PROXY: &str = r#"
[identity]
cert = "tls.crt"
key = "tls.key"
bundle = "bundle.pem"

[admin]
listen = "0.0.0.0:9901"

[[inbound]]
name = "app"
listen = "0.0.0.0:15443"
forward = "127.0.0.1:8080"
"#;

fn proxy(text: &str) -> Result<crate::config::Config, String> {
    crate::config::Config::parse(Path::new("/etc/moat/proxy.toml"), text).map_err(|e| e.to_string())
}

#[test]
fn the_proxy_reads_redirect_and_checks_it_against_its_own_ports() {
    let c = proxy(&format!("{PROXY}\n[redirect]\ninbound_ports = [8080]\n")).unwrap();
    assert_eq!(
        c.redirect.unwrap().inbound_ports,
        InboundPorts::Listed(vec![8080])
    );
    let err = proxy(&format!("{PROXY}\n[redirect]\ninbound_ports = [15443]\n")).unwrap_err();
    assert!(
        err.contains("[redirect] inbound_ports lists 15443"),
        "{err}"
    );
    let err = proxy(&format!("{PROXY}\n[redirect]\ninbund_ports = [8080]\n")).unwrap_err();
    assert!(
        err.starts_with("/etc/moat/proxy.toml:16:1:") && err.contains("inbund_ports"),
        "{err}"
    );
}

#[test]
fn a_redirected_port_must_have_one_inbound_listener() {
    let twice = format!(
        "{PROXY}\n[[inbound]]\nname = \"again\"\nlisten = \"0.0.0.0:15444\"\nforward = \"127.0.0.1:8080\"\n"
    );
    assert!(
        proxy(&twice).is_ok(),
        "without [redirect], explicit listeners may share a target"
    );
    let err = proxy(&format!("{twice}\n[redirect]\n")).unwrap_err();
    assert!(err.contains("both forward to port 8080"), "{err}");
    let reserved = PROXY.replace("name = \"app\"", "name = \"transparent-inbound\"");
    let err = proxy(&format!("{reserved}\n[redirect]\n")).unwrap_err();
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn redirect_reads_only_its_section_and_moats_ports_from_the_proxy_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    // Identity files and policies need not exist for the init step.
    std::fs::write(
        &path,
        format!("{PROXY}policy = \"/nowhere/policy.toml\"\n\n[redirect]\noutbound = false\n"),
    )
    .unwrap();
    let (config, own) = load(&path).unwrap();
    assert!(!config.outbound);
    assert_eq!((own.admin, own.inbound), (Some(9901), vec![15443]));
    std::fs::write(&path, "[redirect]\n").unwrap();
    let (config, own) = load(&path).unwrap();
    assert_eq!(config, RedirectConfig::default());
    assert_eq!(own.admin, Some(crate::config::DEFAULT_ADMIN_PORT));
    std::fs::write(&path, PROXY).unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("no [redirect] section"), "{err}");
    std::fs::write(&path, "[redirect]\nproxy_uid = -1\n").unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("proxy.toml:2:13"), "{err}");
}

#[test]
fn transparent_listener_ports_must_be_free_in_the_proxy_file() {
    let explicit = format!(
        "{PROXY}\n[[outbound]]\nname = \"billing\"\nlisten = \"127.0.0.1:15001\"\nupstream = \"billing:8443\"\npeer = \"spiffe://example.org/b\"\n"
    );
    let err = proxy(&format!("{explicit}\n[redirect]\n")).unwrap_err();
    assert!(
        err.contains("listener \"billing\" listens on port 15001"),
        "{err}"
    );
    assert!(proxy(&format!("{explicit}\n[redirect]\noutbound = false\n")).is_ok());
}
