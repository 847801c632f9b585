//! The helpers git and ssh run to get a secret: `sluice git-credential`
//! (git's credential helper protocol) and ssh's passphrase prompt. Both
//! read the secret from a file whose path they are given, so it never
//! travels in an argument or an environment variable, and the credential
//! helper answers only for the repository's own origin: after a redirect
//! to another host, git asks for that host's credentials and gets none.

use std::io::{BufRead, Write};
use std::path::Path;

use crate::transport::origin;

/// Set in ssh's environment when it should ask this binary for a key's
/// passphrase: the path of the file that holds it.
pub const ASKPASS_FILE: &str = "SLUICE_ASKPASS_FILE";

/// Answers one request of git's credential protocol (`get`, `store`,
/// `erase`) read from `input`: for `get` on `origin`, the user git names
/// (or `x-access-token`) and the token in `token_file`; for anything else,
/// nothing.
pub fn answer(
    origin_allowed: &str,
    token_file: &Path,
    action: &str,
    input: impl BufRead,
    mut out: impl Write,
) -> std::io::Result<()> {
    if action != "get" {
        return Ok(());
    }
    let mut protocol = String::new();
    let mut host = String::new();
    let mut user = None;
    for line in input.lines() {
        let line = line?;
        if line.is_empty() {
            break;
        }
        match line.split_once('=') {
            Some(("protocol", v)) => protocol = v.to_string(),
            Some(("host", v)) => host = v.to_string(),
            Some(("username", v)) => user = Some(v.to_string()),
            _ => {}
        }
    }
    let asked = origin(&format!("{protocol}://{host}/"));
    if asked.as_deref() != Some(origin_allowed) {
        // Not the repository's origin: git gets nothing and fails.
        return Ok(());
    }
    let token = std::fs::read_to_string(token_file)?;
    let token = token.trim();
    if token.is_empty() || token.contains('\n') {
        return Ok(());
    }
    writeln!(
        out,
        "username={}",
        user.unwrap_or_else(|| "x-access-token".into())
    )?;
    writeln!(out, "password={token}")?;
    Ok(())
}

/// ssh's passphrase prompt: prints the passphrase from the file named in
/// [`ASKPASS_FILE`]. Returns false when that variable is not set (this
/// process is not a prompt).
pub fn askpass(mut out: impl Write) -> bool {
    let Some(file) = std::env::var_os(ASKPASS_FILE) else {
        return false;
    };
    match std::fs::read_to_string(&file) {
        Ok(p) => {
            let _ = writeln!(out, "{}", p.trim_end_matches(['\n', '\r']));
        }
        Err(e) => eprintln!("sluice: reading the key's passphrase: {e}"),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_only_to_its_origin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "s3cr3t\n").unwrap();
        let ask = |input: &str| {
            let mut out = Vec::new();
            answer(
                "https://git.example.com:8443",
                &file,
                "get",
                input.as_bytes(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            ask("protocol=https\nhost=git.example.com:8443\n\n"),
            "username=x-access-token\npassword=s3cr3t\n"
        );
        assert_eq!(
            ask("protocol=https\nhost=GIT.example.com:8443\nusername=bot\n\n"),
            "username=bot\npassword=s3cr3t\n"
        );
        for other in [
            "protocol=https\nhost=git.example.com\n\n",
            "protocol=https\nhost=evil.example.com:8443\n\n",
            "protocol=http\nhost=git.example.com:8443\n\n",
        ] {
            assert_eq!(ask(other), "", "{other}");
        }
    }
}
