//! `moat redirect`: install, print or remove the transparent-mode nftables rules.

use super::args::RedirectArgs;
use super::{Failure, config_err};

pub(crate) fn run_redirect(args: RedirectArgs) -> Result<(), Failure> {
    use moat_proxy::redirect::{self, InboundPorts, OwnPorts, RedirectError, Ruleset};
    let apply_err = |e: RedirectError| match e {
        RedirectError::Invalid(_) => config_err(e),
        other => Failure::Other(other.into()),
    };
    if args.cleanup {
        if args.dry_run {
            print!("{}", redirect::cleanup_nft());
            return Ok(());
        }
        if redirect::cleanup().map_err(apply_err)? {
            tracing::info!(table = "inet moat", "redirect rules removed");
        } else {
            tracing::info!(table = "inet moat", "no table inet moat to remove");
        }
        return Ok(());
    }
    let (mut config, mut own) = match &args.config {
        Some(path) => redirect::load(path).map_err(config_err)?,
        None => (
            Default::default(),
            OwnPorts {
                admin: Some(moat_proxy::config::DEFAULT_ADMIN_PORT),
                inbound: Vec::new(),
            },
        ),
    };
    if let Some(p) = args.inbound_listener_port {
        config.inbound_listener_port = p;
    }
    if let Some(p) = args.outbound_listener_port {
        config.outbound_listener_port = p;
    }
    if let Some(p) = args.inbound_ports {
        config.inbound_ports = p;
    }
    if let Some(p) = args.skip_inbound_ports {
        config.skip_inbound_ports = p;
    }
    if args.no_outbound {
        config.outbound = false;
    }
    if let Some(p) = args.skip_outbound_ports {
        config.skip_outbound_ports = p;
    }
    if let Some(c) = args.skip_outbound_cidrs {
        config.skip_outbound_cidrs = c;
    }
    if let Some(u) = args.proxy_uid {
        config.proxy_uid = u;
    }
    if let Some(g) = args.proxy_gid {
        config.proxy_gid = Some(g);
    }
    if let Some(p) = args.admin_port {
        own.admin = Some(p);
    }
    let rules = Ruleset::new(&config, &own).map_err(apply_err)?;
    if args.dry_run {
        print!("{}", rules.to_nft());
        return Ok(());
    }
    rules.apply().map_err(apply_err)?;
    let inbound = match &config.inbound_ports {
        InboundPorts::All => "all".to_owned(),
        InboundPorts::Listed(p) => format!("{p:?}"),
    };
    tracing::info!(
        table = "inet moat",
        inbound_ports = %inbound,
        inbound_listener_port = config.inbound_listener_port,
        outbound = config.outbound,
        outbound_listener_port = config.outbound_listener_port,
        "redirect rules installed"
    );
    Ok(())
}
