//! The systemd units in `deploy/systemd`: systemd itself accepts them (`systemd-analyze verify`),
//! their sandboxing scores what we claim (`systemd-analyze security --offline`), and the
//! command line each one runs is one this binary accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd")
}

/// The unit with `/usr/local/bin/keyless` replaced by the binary under test.
fn unit_for_test(name: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(units_dir().join(name)).unwrap();
    assert!(
        text.contains("ExecStart=/usr/local/bin/keyless "),
        "{name}: ExecStart runs /usr/local/bin/keyless"
    );
    let out = dir.join(name);
    std::fs::write(
        &out,
        text.replace("/usr/local/bin/keyless", env!("CARGO_BIN_EXE_keyless")),
    )
    .unwrap();
    out
}

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("systemd-analyze (Debian package systemd; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `systemd-analyze security --offline=true` prints "Overall exposure level for X: 1.2 OK".
fn exposure(unit: &Path) -> f64 {
    let (_, text) = analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let after = line.rsplit(':').next().unwrap().trim();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// ExecStart's arguments after `keyless`, with `${STATE_DIRECTORY}` filled in.
fn exec_start_args(unit: &Path, state: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    line.replace("${STATE_DIRECTORY}", state.to_str().unwrap())
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn units_verify_score_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    // (unit, highest exposure we accept: the server runs with no privileges at all; the node
    // keeps root with a few network capabilities)
    for (name, max_exposure) in [
        ("keyless-server.service", 2.0),
        ("keyless-node.service", 4.0),
    ] {
        let unit = unit_for_test(name, dir.path());
        let (ok, text) = analyze(&["verify", unit.to_str().unwrap()]);
        assert!(ok && text.trim().is_empty(), "{name}: verify says:\n{text}");

        let level = exposure(&unit);
        assert!(
            level <= max_exposure,
            "{name}: exposure {level} > {max_exposure}"
        );

        let body = std::fs::read_to_string(&unit).unwrap();
        for must in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "LimitNOFILE=",
            "CapabilityBoundingSet=",
            "UMask=0077",
        ] {
            assert!(body.contains(must), "{name}: {must}");
        }

        // the arguments are ones `keyless` accepts (clap stops at an unknown flag before --help)
        let mut args = exec_start_args(&unit, dir.path());
        args.push("--help".into());
        let out = Command::new(env!("CARGO_BIN_EXE_keyless"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: keyless {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The checks above can fail: a unit systemd rejects, and a flag `keyless` does not know.
#[test]
fn a_broken_unit_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test("keyless-server.service", dir.path());
    let body = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, body.replace("Type=exec", "Type=exce")).unwrap();
    let (ok, text) = analyze(&["verify", unit.to_str().unwrap()]);
    assert!(!ok || !text.trim().is_empty(), "a bad Type= passed verify");

    let out = Command::new(env!("CARGO_BIN_EXE_keyless"))
        .args(["server", "--no-such-flag", "--help"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
