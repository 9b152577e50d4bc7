//! `moat policy check|explain|test`.

use super::Failure;
use super::args::PolicyCommand;
use super::{config_err, config_msg};

pub(crate) fn run_policy(command: PolicyCommand) -> Result<(), Failure> {
    use moat_proxy::policy::cli;
    match command {
        PolicyCommand::Check { files } => {
            let report = cli::check(&files);
            for (file, hash, routes) in &report.valid {
                let s = if *routes == 1 { "" } else { "s" };
                println!("{}: ok ({routes} route{s}, hash {hash})", file.display());
            }
            for d in &report.diagnostics {
                eprintln!("{d}");
            }
            match report.diagnostics.len() {
                0 => Ok(()),
                n => Err(config_msg(format!("{n} problem(s) found"))),
            }
        }
        PolicyCommand::Explain {
            file,
            peer,
            method,
            path,
            host,
            jwt,
            claims,
        } => {
            let req = cli::ExplainRequest {
                peer,
                method,
                path,
                host,
                jwt,
                claims,
            };
            print!("{}", cli::explain(&file, &req).map_err(config_err)?);
            Ok(())
        }
        PolicyCommand::Test { file, cases } => {
            let report = cli::test(&file, &cases).map_err(config_err)?;
            for f in &report.failed {
                println!(
                    "FAIL {} ({}:{}): {}",
                    f.name,
                    cases.display(),
                    f.line,
                    f.message
                );
            }
            println!("{} passed, {} failed", report.passed, report.failed.len());
            if report.failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::Other(anyhow::anyhow!(
                    "{} policy test(s) failed",
                    report.failed.len()
                )))
            }
        }
    }
}
