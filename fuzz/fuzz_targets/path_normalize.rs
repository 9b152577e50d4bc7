//! Path normalization never panics, and whatever it accepts is in normal
//! form: absolute, no empty or dot segments, no encoded slash or backslash,
//! and normalizing it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_proxy::policy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(n) = normalize(raw) else { return };
    let p: &str = &n.path;
    assert!(p.starts_with('/'), "{raw:?} -> {p:?}");
    assert!(!p.contains("//"), "{raw:?} -> {p:?}");
    assert!(!p.contains('\\') && !p.contains(';') && !p.contains('?'), "{raw:?} -> {p:?}");
    let lower = p.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"), "{raw:?} -> {p:?}");
    assert!(p.split('/').all(|s| s != "." && s != ".."), "{raw:?} -> {p:?}");
    let again = normalize(p).expect("a normalized path is accepted");
    assert_eq!(again.path, p, "normalization is idempotent for {raw:?}");
});
