//! NMI's redirect: pod traffic for `169.254.169.254:80` to the agent, with the `iptables`
//! binary (nat table), in the agent's own network namespace.
//!
//! The shape is aad-pod-identity's: a chain `aad-metadata` jumped to from position 1 of
//! `PREROUTING` (so only packets arriving from pod interfaces are redirected; the host's own
//! processes go through `OUTPUT` and reach the node's IMDS), holding
//!
//! ```text
//! -A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination <nmi ip>:<nmi port>
//! -A aad-metadata -j RETURN
//! ```
//!
//! [`Redirect::ensure`] runs at start and every reconcile interval: a drifted chain (a rule
//! changed, added or missing) is replaced in one `iptables-restore --noflush` transaction (the
//! chain declaration flushes it and the rules refill it atomically, so no packet sees it
//! empty); a missing or misplaced jump is inserted at position 1 before extra jumps are
//! deleted. [`Redirect::remove`] runs on shutdown, after the node's IMDS listener stopped.
//! The redirect is a convenience, not the boundary: the node's IMDS answers a pod that
//! bypasses it as NMI would ([`crate::imds`]).

use std::net::SocketAddr;
use std::process::Command;

/// The custom chain's name (upstream's).
pub const CHAIN: &str = "aad-metadata";
/// The address pods ask for.
pub const METADATA_IP: &str = "169.254.169.254";
pub const METADATA_PORT: u16 = 80;

/// The redirect to one NMI listener.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Where redirected connections go (a non-loopback address of this network namespace).
    pub target: SocketAddr,
}

pub(crate) fn iptables(args: &[&str]) -> Result<String, String> {
    // -w: wait for the xtables lock other writers (kube-proxy, CNI) hold
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "iptables -t nat {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Apply `input` with `iptables-restore --noflush` (one transaction; also the IMDS proxy
/// sidecar's, [`crate::wi_proxy`]).
pub(crate) fn restore(input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "5", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("iptables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables-restore --noflush: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Redirect {
    /// The chain's rules as `iptables -S aad-metadata` prints them when it is right.
    pub fn expected(&self) -> Vec<String> {
        vec![
            format!("-N {CHAIN}"),
            format!(
                "-A {CHAIN} ! -s 127.0.0.1/32 -d {METADATA_IP}/32 -p tcp -m tcp --dport {METADATA_PORT} -j DNAT --to-destination {}",
                self.target
            ),
            format!("-A {CHAIN} -j RETURN"),
        ]
    }

    /// Whether a listing of the chain (`-S aad-metadata`) is exactly the expected one.
    pub fn chain_ok(&self, listing: &str) -> bool {
        let got: Vec<&str> = listing
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        got == self.expected()
    }

    /// Whether a listing of `PREROUTING` (`-S PREROUTING`) jumps to the chain first, once.
    pub fn prerouting_ok(listing: &str) -> bool {
        let jump = format!("-A PREROUTING -j {CHAIN}");
        let rules: Vec<&str> = listing
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("-A "))
            .collect();
        rules.first() == Some(&jump.as_str())
            && rules.iter().filter(|r| r.contains(CHAIN)).count() == 1
    }

    /// Create or repair the chain and the jump. Returns whether anything had to change.
    pub fn ensure(&self) -> Result<bool, String> {
        let mut changed = false;
        match iptables(&["-S", CHAIN]) {
            Ok(listing) if self.chain_ok(&listing) => {}
            other => {
                if other.is_ok() {
                    tracing::warn!("iptables chain {CHAIN} drifted: replacing it atomically");
                }
                restore(&self.restore_input())?;
                changed = true;
            }
        }
        let pre = iptables(&["-S", "PREROUTING"])?;
        if !Self::prerouting_ok(&pre) {
            if Self::jump_positions(&pre).first() != Some(&1) {
                iptables(&["-I", "PREROUTING", "1", "-j", CHAIN])?;
            }
            let pre = iptables(&["-S", "PREROUTING"])?;
            for n in Self::jump_positions(&pre).iter().skip(1).rev() {
                iptables(&["-D", "PREROUTING", &n.to_string()])?;
            }
            changed = true;
        }
        Ok(changed)
    }

    /// The `iptables-restore --noflush` input that creates or replaces the chain in one
    /// transaction (declaring a chain flushes it; other chains are untouched).
    pub fn restore_input(&self) -> String {
        let rules: Vec<String> = self.expected()[1..].to_vec();
        format!("*nat\n:{CHAIN} - [0:0]\n{}\nCOMMIT\n", rules.join("\n"))
    }

    /// The rule numbers (1-based) of the jumps to the chain in a `-S PREROUTING` listing.
    pub fn jump_positions(listing: &str) -> Vec<usize> {
        listing
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("-A "))
            .enumerate()
            .filter(|(_, r)| r.split_whitespace().any(|w| w == CHAIN))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// Remove the jump and the chain (nothing to do when they are gone).
    pub fn remove() -> Result<(), String> {
        while iptables(&["-D", "PREROUTING", "-j", CHAIN]).is_ok() {}
        if iptables(&["-S", CHAIN]).is_ok() {
            iptables(&["-F", CHAIN])?;
            iptables(&["-X", CHAIN])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_are_checked_exactly() {
        let r = Redirect {
            target: "10.1.2.3:2579".parse().unwrap(),
        };
        let good = "-N aad-metadata\n-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.2.3:2579\n-A aad-metadata -j RETURN\n";
        assert!(r.chain_ok(good));
        assert!(!r.chain_ok(&good.replace("10.1.2.3", "10.1.2.4")));
        assert!(!r.chain_ok(&format!("{good}-A aad-metadata -j ACCEPT\n")));
        assert!(!r.chain_ok("-N aad-metadata\n"));
        assert!(Redirect::prerouting_ok(
            "-P PREROUTING ACCEPT\n-A PREROUTING -j aad-metadata\n-A PREROUTING -j KUBE-SERVICES\n"
        ));
        assert!(!Redirect::prerouting_ok(
            "-P PREROUTING ACCEPT\n-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j aad-metadata\n"
        ));
        assert!(!Redirect::prerouting_ok(
            "-P PREROUTING ACCEPT\n-A PREROUTING -j aad-metadata\n-A PREROUTING -j aad-metadata\n"
        ));
        assert!(!Redirect::prerouting_ok("-P PREROUTING ACCEPT\n"));
        assert_eq!(
            Redirect::jump_positions(
                "-P PREROUTING ACCEPT\n-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j aad-metadata\n-A PREROUTING -j aad-metadata\n"
            ),
            [2, 3]
        );
        assert_eq!(
            r.restore_input(),
            "*nat\n:aad-metadata - [0:0]\n-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.2.3:2579\n-A aad-metadata -j RETURN\nCOMMIT\n"
        );
    }
}
