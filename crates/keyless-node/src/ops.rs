//! What the agent tells its operator: its readiness checks (the request metrics are recorded
//! at the listeners, the cache counters in [`crate::Agent::token`]).

use crate::RunningNode;
use keyless_ops::health::Health;

/// The agent's readiness checks: the host credential has not expired, the first sync with the
/// server succeeded (the host view names a VM), and with NMI the watches have listed and the
/// iptables redirect is in place.
pub fn register_checks(node: &RunningNode, health: &Health) {
    let agent = node.agent.clone();
    health.register("host credential", move || {
        let (now, not_after) = (agent.clock.now(), agent.cred.not_after());
        if now < not_after {
            Ok(())
        } else {
            Err(format!(
                "the host credential expired {} s ago",
                now - not_after
            ))
        }
    });
    let agent = node.agent.clone();
    health.register("first sync", move || match agent.view() {
        Some(v) if !v.vm.is_null() => Ok(()),
        Some(_) => Err("the server refused this host (credential revoked or VM deleted)".into()),
        None => Err("the first sync with the server has not completed".into()),
    });
    if let Some(n) = &node.nmi {
        let index = n.index.clone();
        health.register("nmi watches", move || {
            if index.is_synced() {
                Ok(())
            } else {
                Err("NMI's watches have not listed yet (pods get 503)".into())
            }
        });
        // read-only: the jump from PREROUTING to the chain is in place and the chain holds
        // exactly the DNAT to NMI (the reconcile loop repairs either; this reports the moments
        // one is missing, so a probe fails while pods would reach the node's IMDS unredirected)
        let redirect = n.redirect.clone();
        health.register("nmi iptables redirect", move || {
            let listing = crate::iptables::iptables(&["-S", "PREROUTING"])?;
            if !crate::iptables::Redirect::prerouting_ok(&listing) {
                return Err(format!(
                    "PREROUTING does not jump to {} first",
                    crate::iptables::CHAIN
                ));
            }
            let chain = crate::iptables::iptables(&["-S", crate::iptables::CHAIN])?;
            if redirect.chain_ok(&chain) {
                Ok(())
            } else {
                Err(format!(
                    "chain {} does not hold the DNAT to {}",
                    crate::iptables::CHAIN,
                    redirect.target
                ))
            }
        });
    }
}
