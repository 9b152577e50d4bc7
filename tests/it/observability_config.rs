//! The operator-facing observability files stay honest: the Grafana
//! dashboard (`config/grafana/moat-dashboard.json`), the Prometheus alert
//! rules (`config/prometheus/moat-alerts.yml`) and the metrics reference
//! (`docs/metrics.md`) are checked for structure, and every metric and label
//! they reference is checked against what a real CA and a real sidecar pair
//! export on `/metrics`. With `promtool` on the PATH (or in `$PROMTOOL`),
//! the rules also go through `promtool check rules` and a few
//! `promtool test rules` cases.

use crate::support;
use crate::support::proxy as proxy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proxy_support::*;
use serde_json::{Value, json};
use support::{TestCa, echo_service, path_str, tool};

const DASHBOARD: &str = "config/grafana/moat-dashboard.json";
const ALERTS: &str = "config/prometheus/moat-alerts.yml";
const DOCS: &str = "docs/metrics.md";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The alert rules file as JSON values, read by a YAML parser (duplicate
/// keys are an error).
fn alerts_file() -> Value {
    serde_saphyr::from_str(&read(ALERTS)).unwrap_or_else(|e| panic!("{ALERTS}: {e}"))
}

fn alert_rules() -> Vec<Value> {
    alerts_file()["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("{ALERTS}: no groups"))
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel (rows' nested panels included) that is not a row.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            out.push(p);
        }
    }
    out
}

/// Every PromQL expression in the dashboard and the alerts, with where it is.
fn expressions() -> Vec<(String, String)> {
    let dash = dashboard();
    let mut out = Vec::new();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!(
                    "{DASHBOARD} panel {:?} {}",
                    p["title"].as_str().unwrap_or_default(),
                    t["refId"].as_str().unwrap_or_default()
                ),
                t["expr"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    for r in alert_rules() {
        out.push((
            format!("{ALERTS} alert {}", r["alert"].as_str().unwrap_or_default()),
            r["expr"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    out
}

/// `label_values(SELECTOR, LABEL)` of each query variable.
fn variable_queries(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        assert_eq!(
            v["definition"].as_str(),
            Some(q),
            "variable {}: definition and query differ",
            v["name"]
        );
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        out.push((
            format!("{DASHBOARD} variable {}", v["name"]),
            selector.trim().to_owned(),
            label.trim().to_owned(),
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// Structure.

#[test]
fn alert_rules_have_the_fields_operators_need() {
    let doc = alerts_file();
    let groups = doc["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let mut names = BTreeSet::new();
    for g in groups {
        assert!(g["name"].as_str().is_some_and(|n| !n.is_empty()), "{g}");
        let rules = g["rules"].as_array().expect("rules");
        assert!(!rules.is_empty(), "group {} has no rules", g["name"]);
        for r in rules {
            let name = r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("a rule without `alert`: {r}"));
            assert!(names.insert(name.to_owned()), "alert {name} twice");
            assert!(
                name.starts_with("Moat") && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}: alert names are MoatCamelCase"
            );
            let expr = r["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{name}: no expr");
            let for_ = r["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no for"));
            assert!(is_duration(for_), "{name}: for = {for_:?}");
            let severity = r["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            let summary = r["annotations"]["summary"].as_str().unwrap_or_default();
            assert!(!summary.is_empty(), "{name}: no summary");
            let description = r["annotations"]["description"].as_str().unwrap_or_default();
            assert!(
                description.contains("Runbook"),
                "{name}: the description has no runbook hint"
            );
            let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            let allowed = BTreeSet::from(["alert", "expr", "for", "labels", "annotations"]);
            assert!(keys.is_subset(&allowed), "{name}: unexpected keys {keys:?}");
        }
    }
    for wanted in [
        "MoatCertificateExpiringSoon",
        "MoatCertificateRenewalsFailing",
        "MoatPolicyReloadFailed",
        "MoatDenySpike",
        "MoatTlsHandshakeFailures",
        "MoatSpansDropped",
        "MoatCaRootExpiring",
        "MoatCaTokenReplay",
    ] {
        assert!(names.contains(wanted), "no {wanted} alert");
    }
}

/// docs/metrics.md's alert table lists every rule of the rules file, with
/// its severity, and no rule the file does not have.
#[test]
fn the_alert_table_lists_every_rule_with_its_severity() {
    let docs = read(DOCS);
    let section = docs
        .split("## The alerts")
        .nth(1)
        .unwrap_or_else(|| panic!("{DOCS}: no \"## The alerts\" section"));
    let table: BTreeMap<String, String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `Moat"))
        .map(|l| {
            let (name, rest) = l.split_once("` | ").expect("| `Name` | severity |");
            let severity = rest.split(" |").next().unwrap_or_default();
            (format!("Moat{name}"), severity.trim().to_owned())
        })
        .collect();
    let rules: BTreeMap<String, String> = alert_rules()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap_or_default().to_owned(),
                r["labels"]["severity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        table, rules,
        "{DOCS}'s alert table (left) and {ALERTS} (right) differ"
    );
}

fn is_duration(s: &str) -> bool {
    // Prometheus durations: 0, 30s, 5m, 1h30m, ...
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return rest.is_empty() && s == "0",
        }
    }
    true
}

#[test]
fn dashboard_is_an_importable_grafana_dashboard() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance", "listener", "ca_job"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "{name}");
    }
    let defined: BTreeSet<String> = vars
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();

    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {}: gridPos.{k}", p["title"]);
        }
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24);
    }
    let all = panels(&dash);
    assert!(all.len() >= 13, "{} panels", all.len());
    for p in all {
        let title = p["title"].as_str().expect("title");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no target");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title}: a target without expr"
            );
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}");
            for v in grafana_variables(expr) {
                assert!(
                    defined.contains(&v) || v.starts_with("__"),
                    "panel {title}: ${v} is not a dashboard variable"
                );
            }
        }
    }
}

/// `$name` and `${name}` in an expression.
fn grafana_variables(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = rest.trim_start_matches('{');
        let n = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        out.push(body[..n].to_owned());
        rest = &body[n + usize::from(braced && body[n..].starts_with('}'))..];
    }
    out
}

// ---------------------------------------------------------------------------
// PromQL references: metric names, label matchers, grouping labels.

#[derive(Debug, Default, PartialEq)]
struct References {
    /// Metric name → label names used in its matchers.
    metrics: BTreeMap<String, BTreeSet<String>>,
    /// Labels in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`,
    /// `group_left (...)`, `group_right (...)`.
    grouping: BTreeSet<String>,
}

/// Reads the metric names and label names of a PromQL expression with a
/// PromQL parser. Grafana's interval variables stand where PromQL wants a
/// duration, so they become one first; its other variables stand only in
/// label values, which PromQL reads as strings.
fn promql_references(expr: &str) -> Result<References, String> {
    let expr = ["$__rate_interval", "$__interval", "$__range"]
        .into_iter()
        .fold(expr.to_owned(), |e, v| e.replace(v, "5m"));
    let ast = promql_parser::parser::parse(&expr).map_err(|e| format!("{expr:?}: {e}"))?;
    let mut refs = References::default();
    refs.collect(&ast)?;
    Ok(refs)
}

impl References {
    fn collect(&mut self, expr: &promql_parser::parser::Expr) -> Result<(), String> {
        use promql_parser::parser::Expr;
        match expr {
            Expr::Aggregate(a) => {
                self.grouping_labels(a.modifier.as_ref());
                if let Some(param) = &a.param {
                    self.collect(param)?;
                }
                self.collect(&a.expr)
            }
            Expr::Binary(b) => {
                if let Some(m) = &b.modifier {
                    self.grouping_labels(m.matching.as_ref());
                    let group = m.card.labels().into_iter().flat_map(|l| &l.labels);
                    self.grouping.extend(group.cloned());
                }
                self.collect(&b.lhs)?;
                self.collect(&b.rhs)
            }
            Expr::Unary(u) => self.collect(&u.expr),
            Expr::Paren(p) => self.collect(&p.expr),
            Expr::Subquery(s) => self.collect(&s.expr),
            Expr::Call(c) => c.args.args.iter().try_for_each(|a| self.collect(a)),
            Expr::VectorSelector(v) => self.selector(v),
            Expr::MatrixSelector(m) => self.selector(&m.vs),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Ok(()),
            Expr::Extension(_) => Err("a parser extension in the expression".into()),
        }
    }

    /// `by`/`without` of an aggregation, `on`/`ignoring` of a binary operator.
    fn grouping_labels(&mut self, modifier: Option<&promql_parser::parser::LabelModifier>) {
        let labels = modifier.into_iter().flat_map(|m| &m.labels().labels);
        self.grouping.extend(labels.cloned());
    }

    fn selector(&mut self, v: &promql_parser::parser::VectorSelector) -> Result<(), String> {
        let name = v
            .name
            .as_ref()
            .ok_or_else(|| format!("a selector without a metric name: {v}"))?;
        let matchers = v.matchers.matchers.iter();
        let labels = matchers
            .chain(v.matchers.or_matchers.iter().flatten())
            .map(|m| m.name.clone())
            .filter(|l| l != "__name__");
        self.metrics.entry(name.clone()).or_default().extend(labels);
        Ok(())
    }
}

#[test]
fn the_promql_reader_finds_metrics_matchers_and_grouping_labels() {
    let r = promql_references(
        r#"sum by (job, listener) (rate(moat_a_total{x="1", y=~"$v"}[5m] offset 1h)) > 3 * moat_b unless on (job) count(moat_c{z!="}"}) < time() - 30 * 86400"#,
    )
    .unwrap();
    let names: Vec<&str> = r.metrics.keys().map(String::as_str).collect();
    assert_eq!(names, ["moat_a_total", "moat_b", "moat_c"]);
    assert_eq!(
        r.metrics["moat_a_total"],
        BTreeSet::from(["x".to_owned(), "y".to_owned()])
    );
    assert_eq!(r.metrics["moat_c"], BTreeSet::from(["z".to_owned()]));
    assert_eq!(
        r.grouping,
        BTreeSet::from(["job".to_owned(), "listener".to_owned()])
    );
    assert!(promql_references(r#"{__name__="x"}"#).is_err());
}

// ---------------------------------------------------------------------------
// What the binaries export.

/// One `/metrics` scrape: families (`# TYPE`) and the label names seen on
/// each series name.
#[derive(Debug, Default)]
struct Exported {
    /// Family name → type.
    families: BTreeMap<String, String>,
    /// Series name (`name_total`, `name_bucket`, ...) → its family.
    series: BTreeMap<String, String>,
    /// Series name → label names seen on its samples.
    labels: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn add(&mut self, text: &str) {
        // A Prometheus text-format parser must accept it.
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("valid Prometheus text");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                self.families.insert(name.to_owned(), kind.to_owned());
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["", "_sum", "_count"],
                    _ => &[""],
                };
                for s in suffixes {
                    self.series.insert(format!("{name}{s}"), name.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).expect("sample line");
                let name = &line[..end];
                let seen = self.labels.entry(name.to_owned()).or_default();
                if line[end..].starts_with('{') {
                    let close = line.rfind('}').expect("closing brace");
                    let mut body = &line[end + 1..close];
                    while let Some(eq) = body.find('=') {
                        seen.insert(body[..eq].trim().trim_start_matches(',').to_owned());
                        // Skip the quoted value.
                        let v = &body[eq + 2..];
                        let mut j = 0;
                        let vb = v.as_bytes();
                        while j < vb.len() && vb[j] != b'"' {
                            j += if vb[j] == b'\\' { 2 } else { 1 };
                        }
                        body = v.get(j + 1..).unwrap_or("");
                    }
                }
            }
        }
    }

    /// Problems with one expression's references.
    fn check(&self, refs: &References, legend: &[String]) -> Vec<String> {
        // Target labels Prometheus adds to every series.
        let target = ["job", "instance"];
        let mut problems = Vec::new();
        let mut known: BTreeSet<String> = target
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        for (metric, matchers) in &refs.metrics {
            if !self.series.contains_key(metric) {
                problems.push(format!("{metric} is not exported"));
                continue;
            }
            let Some(seen) = self.labels.get(metric) else {
                problems.push(format!(
                    "{metric} has no samples in the test's scrape, its labels cannot be checked"
                ));
                continue;
            };
            known.extend(seen.iter().cloned());
            for m in matchers {
                if !seen.contains(m) && !target.contains(&m.as_str()) {
                    problems.push(format!("{metric} has no label {m:?} (it has {seen:?})"));
                }
            }
        }
        let grouping: BTreeSet<&String> = refs.grouping.iter().chain(legend).collect();
        for l in grouping {
            if !known.contains(l) {
                problems.push(format!("label {l:?} is on none of the metrics used"));
            }
        }
        problems
    }
}

/// What Prometheus asks for (2.x; 3.x sends the same types with other
/// weights), so what the dashboard and the rules see: OpenMetrics.
const PROMETHEUS_ACCEPT: &str = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `/metrics` as Prometheus scrapes it.
fn scrape(addr: SocketAddr) -> String {
    let out = tool(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-H",
            PROMETHEUS_ACCEPT,
            &format!("http://{addr}/metrics"),
        ],
    );
    assert!(out.status.success(), "scrape {addr}");
    String::from_utf8(out.stdout).unwrap()
}

const CLIENT: &str = "spiffe://example.org/ns/shop/sa/frontend";
const SERVER: &str = "spiffe://example.org/ns/shop/sa/billing";

/// A CA, and client → outbound sidecar → inbound sidecar (route policy
/// with a JWT issuer) → echo service, both sidecars on 4-second
/// certificates so that they renew; traffic that is allowed, denied and
/// refused in the handshake. Returns everything the three export.
fn run_and_scrape() -> Exported {
    let mut ca = TestCa::start();
    let ca_admin = ca.admin_addr();
    let service = echo_service();
    let dir = ca.dir.path().to_owned();
    let jwks = repo_file("config/policy-jwks.json");
    let policy = write(
        &dir,
        "policy.toml",
        &format!(
            r#"
[[issuer]]
name       = "corp"
issuer     = "https://auth.example.org"
audiences  = ["billing"]
jwks_file  = {:?}
algorithms = ["ES256"]

[[route]]
name    = "invoices"
path    = "/invoices/*"
methods = ["GET"]
peers   = ["{CLIENT}"]

[[route]]
name  = "reports"
path  = "/reports/*"
peers = ["{CLIENT}"]
jwt   = {{ issuer = "corp" }}
"#,
            path_str(&jwks)
        ),
    );
    let server_cfg = write(
        &dir,
        "server.toml",
        &format!(
            "{}{ADMIN}[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:0\"\nforward = \"{service}\"\npolicy = {:?}\n",
            ca_identity(&ca, SERVER, "server", "ttl = \"4s\""),
            path_str(&policy)
        ),
    );
    let (_server, addrs) = start_proxy(&server_cfg, &["in", "admin"]);
    let (inbound, server_admin) = (addrs[0], addrs[1]);
    let client_cfg = write(
        &dir,
        "client.toml",
        &format!(
            "{}{ADMIN}[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{inbound}\"\npeer = \"{SERVER}\"\n",
            ca_identity(&ca, CLIENT, "client", "ttl = \"4s\""),
        ),
    );
    let (_client, addrs) = start_proxy(&client_cfg, &["out", "admin"]);
    let (outbound, client_admin) = (addrs[0], addrs[1]);
    for admin in [server_admin, client_admin] {
        eventually(Duration::from_secs(20), "sidecar ready", || {
            curl_http(admin, "/ready", &[]).0 == 200
        });
    }
    assert_eq!(curl_http(outbound, "/invoices/1", &[]).0, 200);
    assert_eq!(curl_http(outbound, "/invoices/1", &["-X", "POST"]).0, 403);
    assert_eq!(curl_http(outbound, "/reports/1", &[]).0, 401);
    // No client certificate: refused in the handshake.
    assert_eq!(curl(inbound, "/invoices/1", None, &[]).0, 0);
    // Both sidecars renew their 4-second certificates.
    for admin in [server_admin, client_admin] {
        eventually(Duration::from_secs(30), "a renewal", || {
            scrape(admin).contains("moat_certificate_renewals_total{result=\"ok\"}")
        });
    }
    // The pooled connection between them is closed when the first of the
    // two 4-second certificates it was made with expires: by the server
    // (the client's expired) or by the client (the server's); which one
    // wins is a race (moat_connections_closed_total).
    eventually(
        Duration::from_secs(30),
        "a connection closed at expiry",
        || {
            [server_admin, client_admin].iter().any(|a| {
                scrape(*a).contains("moat_connections_closed_total{reason=\"peer_cert_expired\"}")
            })
        },
    );
    let mut exported = Exported::default();
    for admin in [server_admin, client_admin, ca_admin] {
        exported.add(&scrape(admin));
    }
    exported
}

#[test]
fn every_metric_and_label_in_the_dashboard_and_alerts_is_exported() {
    let exported = run_and_scrape();
    // The reader is not vacuous: a bogus metric, a bogus label and a
    // bogus grouping label are all caught against this very scrape.
    for bogus in [
        "rate(moat_bogus_total[5m])",
        r#"rate(moat_requests_total{code="200"}[5m])"#,
        "sum by (status_code) (rate(moat_requests_total[5m]))",
        "moat_requests",
    ] {
        let refs = promql_references(bogus).unwrap();
        assert!(!exported.check(&refs, &[]).is_empty(), "{bogus} passed");
    }

    let dash = dashboard();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut legends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in panels(&dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            let labels = legend
                .split("{{")
                .skip(1)
                .filter_map(|s| s.split_once("}}"))
                .map(|(l, _)| l.trim().to_owned())
                .collect();
            legends.insert(t["expr"].as_str().unwrap_or_default().to_owned(), labels);
        }
    }
    let mut all = expressions();
    for (place, selector, label) in variable_queries(&dash) {
        legends.insert(selector.clone(), vec![label]);
        all.push((place, selector));
    }
    for (place, expr) in &all {
        match promql_references(expr) {
            Ok(refs) => {
                if refs.metrics.is_empty() {
                    problems.push(format!("{place}: no metric in {expr:?}"));
                }
                let legend = legends.get(expr).cloned().unwrap_or_default();
                for p in exported.check(&refs, &legend) {
                    problems.push(format!("{place}: {p}"));
                }
                if place.starts_with(&format!("{DASHBOARD} panel")) {
                    used.extend(
                        refs.metrics
                            .keys()
                            .filter_map(|m| exported.series.get(m).cloned()),
                    );
                }
            }
            Err(e) => problems.push(format!("{place}: {e}")),
        }
    }
    println!(
        "{} expressions checked against {} exported families",
        all.len(),
        exported.families.len()
    );
    assert!(
        problems.is_empty(),
        "the dashboard or the alerts reference what moat does not export:\n{}",
        problems.join("\n")
    );
    // And the other way round: every family moat exports is on the
    // dashboard and in the reference.
    let docs = read(DOCS);
    let readme = read("README.md");
    let readme_metrics = readme
        .split("**Metrics.**")
        .nth(1)
        .and_then(|s| s.split("\n\n").find(|p| p.starts_with("| metric |")))
        .expect("README.md: the metrics table under **Metrics.**");
    let families: BTreeSet<&String> = exported.families.keys().collect();
    assert!(families.len() >= 16, "{families:?}");
    for family in families {
        assert!(used.contains(family), "{family} is on no dashboard panel");
        let names: Vec<&String> = exported
            .series
            .iter()
            .filter(|(_, f)| *f == family)
            .map(|(s, _)| s)
            .collect();
        let shown = names.iter().any(|s| docs.contains(&format!("| `{s}` |")))
            || docs.contains(&format!("| `{family}` |"));
        assert!(shown, "{family} is not in {DOCS}");
        // The README's table too (the process_* families share one row).
        let in_readme = names
            .iter()
            .any(|s| readme_metrics.contains(&format!("`{s}`")))
            || readme_metrics.contains(&format!("`{family}`"));
        assert!(in_readme, "{family} is not in README.md's metrics table");
    }
}

// ---------------------------------------------------------------------------
// promtool ($PROMTOOL, or the one on the PATH).

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = match std::env::var_os("PROMTOOL") {
        Some(p) => PathBuf::from(p),
        None if support::require("promtool") => PathBuf::from("promtool"),
        None => return,
    };
    let rules = repo_file(ALERTS);
    let promtool = path_str(&promtool);
    let out = tool(promtool, &["check", "rules", path_str(&rules)]);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The alert expressions, evaluated by Prometheus itself on made-up series.
    let expr: BTreeMap<String, String> = alert_rules()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let case = |alert: &str, at: &str, samples: Value| json!({"expr": expr[alert], "eval_time": at, "exp_samples": samples});
    let p = r#"job="proxy", instance="a""#;
    let c = r#"job="ca", instance="c""#;
    let tests = json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                // A 1-hour certificate that is never renewed.
                "interval": "1m",
                "input_series": [{
                    "series": format!("moat_certificate_expiry_timestamp_seconds{{{p}}}"),
                    "values": "3600x120",
                }],
                "promql_expr_test": [
                    case("MoatCertificateRenewalOverdue", "35m", json!([])),
                    case("MoatCertificateRenewalOverdue", "45m",
                        json!([{"labels": format!("{{{p}}}"), "value": 900}])),
                    case("MoatCertificateExpiringSoon", "40m", json!([])),
                    case("MoatCertificateExpiringSoon", "50m",
                        json!([{"labels": format!("{{{p}}}"), "value": 600}])),
                ],
            },
            {
                // 1-hour certificates renewed at half their lifetime.
                "interval": "1m",
                "input_series": [{
                    "series": format!("moat_certificate_expiry_timestamp_seconds{{{p}}}"),
                    "values": "3600x29 5400x30 7200x30",
                }],
                "promql_expr_test": [
                    case("MoatCertificateRenewalOverdue", "80m", json!([])),
                    case("MoatCertificateExpiringSoon", "80m", json!([])),
                ],
            },
            {
                // 0.1 denials/s for an hour, then 2/s.
                "interval": "1m",
                "input_series": [
                    {
                        "series": format!("moat_authz_decisions_total{{{p}, listener=\"in\", route=\"r\", decision=\"deny\", reason=\"no_route\"}}"),
                        "values": "0+6x65 390+120x20",
                    },
                    {
                        "series": format!("moat_authz_decisions_total{{{p}, listener=\"in\", route=\"r\", decision=\"allow\", reason=\"allowed\"}}"),
                        "values": "0+600x85",
                    },
                    {
                        "series": format!("moat_tls_handshake_failures_total{{{p}, listener=\"in\", reason=\"no_client_cert\"}}"),
                        "values": "0+30x85",
                    },
                ],
                "promql_expr_test": [
                    case("MoatDenySpike", "60m", json!([])),
                    case("MoatDenySpike", "80m",
                        json!([{"labels": format!("{{{p}, listener=\"in\"}}"), "value": 2}])),
                    case("MoatTlsHandshakeFailures", "80m",
                        json!([{"labels": format!("{{{p}, listener=\"in\", reason=\"no_client_cert\"}}"), "value": 0.5}])),
                ],
            },
            {
                // A deny-list confirmed every poll, then the CA gone for 20 minutes.
                "interval": "1m",
                "input_series": [{
                    "series": format!("moat_revocation_list_age_seconds{{{p}}}"),
                    "values": "0x10 60+60x20",
                }],
                "promql_expr_test": [
                    case("MoatRevocationListStale", "10m", json!([])),
                    case("MoatRevocationListStale", "25m",
                        json!([{"labels": format!("{{{p}}}"), "value": 900}])),
                ],
            },
            {
                // A policy edit refused at 10m, fixed at 20m.
                "interval": "1m",
                "input_series": [{
                    "series": format!("moat_policy_reload_failed{{{p}, listener=\"in\"}}"),
                    "values": "0x9 1x10 0x10",
                }],
                "promql_expr_test": [
                    case("MoatPolicyReloadFailed", "9m", json!([])),
                    case("MoatPolicyReloadFailed", "15m",
                        json!([{"labels": format!("{{{p}, listener=\"in\"}}"), "value": 1}])),
                    case("MoatPolicyReloadFailed", "25m", json!([])),
                ],
            },
            {
                // A retiring root about to expire, an active one with 20 days left.
                "interval": "1m",
                "input_series": [
                    {
                        "series": format!("moat_ca_root_expiry_timestamp_seconds{{{c}, root=\"1\", state=\"retiring\"}}"),
                        "values": "86400x20",
                    },
                    {
                        "series": format!("moat_ca_root_expiry_timestamp_seconds{{{c}, root=\"2\", state=\"active\"}}"),
                        "values": "1728000x20",
                    },
                    {
                        "series": format!("moat_ca_root_expiry_timestamp_seconds{{{c}, root=\"3\", state=\"prepared\"}}"),
                        "values": "31536000x20",
                    },
                ],
                "promql_expr_test": [
                    case("MoatCaRootExpiring", "10m",
                        json!([{"labels": format!("{{{c}, root=\"2\", state=\"active\"}}"), "value": 1727400}])),
                    case("MoatCaRootExpiringCritical", "10m", json!([])),
                ],
            },
            {
                // `rotate --prepare` at 0: the CA serves two roots, sidecar a
                // never fetches them; `--retire` at 20m: the CA serves one,
                // the sidecars keep two until their next fetch.
                "interval": "1m",
                "input_series": [
                    {"series": format!("moat_trust_bundle_roots{{{p}}}"), "values": "1x30"},
                    {"series": r#"moat_trust_bundle_roots{job="proxy", instance="b"}"#, "values": "2x30"},
                    {"series": format!("moat_ca_bundle_roots{{{c}}}"), "values": "2x19 1x10"},
                ],
                "promql_expr_test": [
                    case("MoatTrustBundleBehindCa", "10m",
                        json!([{"labels": format!("{{{p}}}"), "value": 1}])),
                    case("MoatTrustBundleBehindCa", "25m", json!([])),
                ],
            },
        ],
    });
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML.
    let file = write(dir.path(), "moat-alerts.test.yml", &tests.to_string());
    let out = tool(promtool, &["test", "rules", path_str(&file)]);
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool` from `$PROMTOOL` or the PATH; `None` (after a `SKIPPED:`
/// line, or a failure under `MOAT_TEST_REQUIRE_ALL=1`) without one.
fn promtool() -> Option<PathBuf> {
    match std::env::var_os("PROMTOOL") {
        Some(p) => Some(PathBuf::from(p)),
        None if support::require("promtool") => Some(PathBuf::from("promtool")),
        None => None,
    }
}

/// `promtool check metrics` on `text` (its standard input): exit status
/// and output.
fn promtool_check_metrics(promtool: &Path, text: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool check metrics");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A scrape with curl's own headers, or with `accept`: the content type and the body.
fn scrape_as(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let url = format!("http://{addr}/metrics");
    let mut args = vec!["-sS", "--max-time", "10", "-w", "\n%{content_type}"];
    if let Some(a) = accept {
        args.extend(["-H", a]);
    }
    args.push(&url);
    let out = tool("curl", &args);
    assert!(out.status.success(), "scrape {addr}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, ctype) = text.rsplit_once('\n').unwrap();
    // `-w` puts a newline of its own before the content type.
    (ctype.to_owned(), body.to_owned())
}

/// Every `/metrics` endpoint (a sidecar's admin listener, the CA's) answers
/// a plain scrape (`curl`, `promtool`) in the Prometheus text format 0.0.4,
/// which `promtool check metrics` passes, and Prometheus's own scrape in
/// OpenMetrics, as the Prometheus client libraries negotiate.
#[test]
fn a_plain_scrape_gets_prometheus_text_that_promtool_passes() {
    let Some(promtool) = promtool() else {
        return;
    };
    let mut ca = TestCa::start();
    let ca_admin = ca.admin_addr();
    let (proxy, api, admin) = ca_inbound(&ca, SERVER, "");
    let client = issue(&ca, CLIENT, "1h", "client");
    assert_eq!(curl(api, "/", Some(&client), &[]).0, 200);
    // A refused handshake: a counter family with a label (counted as the
    // sidecar ends the handshake, which may be after curl gives up).
    assert_eq!(curl(api, "/", None, &[]).0, 0);
    eventually(
        Duration::from_secs(5),
        "the failed handshake counted",
        || {
            scrape_as(admin, None)
                .1
                .contains("moat_tls_handshake_failures_total{listener=\"api\"")
        },
    );
    for (what, addr) in [("sidecar", admin), ("CA", ca_admin)] {
        for accept in [
            None,
            Some("Accept: text/plain;version=0.0.4"),
            Some("Accept: */*"),
        ] {
            let (ctype, body) = scrape_as(addr, accept);
            assert_eq!(
                ctype, "text/plain; version=0.0.4; charset=utf-8",
                "{what} {accept:?}"
            );
            let (ok, said) = promtool_check_metrics(&promtool, &body);
            assert!(
                ok,
                "{what} {accept:?}: promtool check metrics:\n{said}\n{body}"
            );
            assert!(
                !body.contains("# EOF") && !body.contains("# UNIT"),
                "{body}"
            );
        }
        let (ctype, body) = scrape_as(addr, Some(PROMETHEUS_ACCEPT));
        assert_eq!(
            ctype, "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{what}"
        );
        assert!(body.ends_with("# EOF\n"), "{what}: {body}");
    }
    // The same series in both, counters with their `_total` everywhere.
    let (_, plain) = scrape_as(admin, None);
    assert!(
        plain.contains("# TYPE moat_tls_handshake_failures_total counter\n"),
        "{plain}"
    );
    assert!(
        plain.contains("moat_tls_handshake_failures_total{listener=\"api\""),
        "{plain}"
    );
    let (_, open) = scrape_as(admin, Some(PROMETHEUS_ACCEPT));
    assert!(
        open.contains("# TYPE moat_tls_handshake_failures counter\n"),
        "{open}"
    );
    drop(proxy);
}
