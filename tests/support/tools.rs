//! External tools some tests need (Graphviz, systemd-analyze): present, or skipped loudly,
//! or, under CI, a failure.

use std::io::Write;
use std::process::{Command, Stdio};

/// Whether `program arg` runs here. When it does not: under CI (the variable `CI` set) the
/// test fails, since `.ci/run` installs the Debian package `package`; elsewhere a banner
/// says the test is skipped and why.
pub fn installed(program: &str, arg: &str, what: &str, package: &str) -> bool {
    let runs = Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{program} not found on PATH, but CI is set: .ci/run should have installed it \
         (apt-get install {package})"
    );
    // Written to the stderr handle, not with eprintln!, which the test harness captures.
    let _ = writeln!(
        std::io::stderr(),
        "\n********************************************************************\n\
         skipped: {what} not installed (apt-get install {package})\n\
         ********************************************************************"
    );
    false
}
