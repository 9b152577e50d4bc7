//! The policy parser never panics on any text, and every error it reports
//! points inside the file (line and column within the text).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moat_proxy::policy::{JwksCache, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let cache = JwksCache::default();
    // A directory that does not exist: jwks_file and jwks_ca reads fail
    // cleanly instead of touching the machine's files.
    match Policy::parse(Path::new("/nonexistent/moat-fuzz/policy.toml"), text, &cache) {
        Ok(policy) => {
            assert_eq!(policy.hash().len(), 16);
        }
        Err(e) => {
            let lines = text.split('\n').count();
            for d in e.diagnostics() {
                assert!(d.line >= 1 && d.line <= lines, "line {} of {lines}: {d}", d.line);
                assert!(d.column >= 1, "{d}");
            }
        }
    }
});
