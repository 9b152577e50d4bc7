//! `moat inject`: add the sidecar to Kubernetes manifests.

use super::args::InjectArgs;
use super::{Failure, config_err, config_msg};
use crate::inject;

pub(crate) fn run_inject(args: InjectArgs) -> Result<(), Failure> {
    use std::io::{Read, Write};
    let input = match args.file.as_deref() {
        None => None,
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| config_msg(format!("{}: {e}", p.display())))?,
        ),
    };
    let input = match input {
        Some(text) => text,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| config_msg(format!("standard input: {e}")))?;
            text
        }
    };
    let options = inject::Options {
        image: args.image,
        inbound_port: args.inbound_port,
        admin_port: args.admin_port,
        audience: args.audience,
        bundle_config_map: args.bundle_config_map,
        upgrade: args.upgrade,
        transparent: !args.explicit,
    };
    let injected = inject::inject(&input, &options).map_err(config_err)?;
    // What was done goes to stderr, so stdout can be piped to kubectl.
    let mut stderr = std::io::stderr().lock();
    for line in injected.report.lines() {
        if line.warning || !args.quiet {
            writeln!(stderr, "moat inject: {line}")?;
        }
    }
    std::io::stdout().write_all(injected.output.as_bytes())?;
    Ok(())
}
