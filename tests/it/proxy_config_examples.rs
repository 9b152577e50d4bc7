//! Every proxy example in `config/` parses: the shipped examples stay valid.

use std::path::Path;

#[test]
fn every_proxy_example_in_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("proxy") && name.ends_with(".toml")) {
            continue;
        }
        let config = moat_proxy::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !config.inbound.is_empty() || !config.outbound.is_empty(),
            "{name}"
        );
        loaded.push(name);
    }
    assert!(
        loaded.len() >= 2,
        "expected the proxy examples, found {loaded:?}"
    );
}
