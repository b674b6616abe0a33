//! Running the system tools (`ip`, `tc`, `nft`) that build and change a lab.
//!
//! Every change to the network goes through one of these tools, started with
//! [`std::process::Command`], so that a failure can be reproduced by hand: the
//! error carries the exact command line, the script fed on standard input (for
//! the batched `ip -batch -`, `tc -batch -` and `nft -f -` forms) and the tool's
//! standard error.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The external programs netlab drives, with the Debian package that ships each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `ip` from iproute2: namespaces, links, addresses, routes.
    Ip,
    /// `tc` from iproute2: the token-bucket rate limit.
    Tc,
    /// `nft` from nftables: random loss and cutting a host off.
    Nft,
}

impl Tool {
    /// The program's file name.
    pub fn program(self) -> &'static str {
        match self {
            Tool::Ip => "ip",
            Tool::Tc => "tc",
            Tool::Nft => "nft",
        }
    }

    /// The Debian package that installs the program.
    pub fn package(self) -> &'static str {
        match self {
            Tool::Ip | Tool::Tc => "iproute2",
            Tool::Nft => "nftables",
        }
    }

    /// Absolute path of the program, searched in `PATH` and then in the sbin
    /// directories (which a non-root `PATH` often lacks).
    pub fn locate(self) -> Result<PathBuf, CmdError> {
        find_program(self.program()).ok_or(CmdError::NotFound { program: self.program(), package: self.package() })
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// Errors from running a system tool.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program is not installed.
    #[error("`{program}` was not found in PATH, /usr/sbin or /sbin: install it with `apt-get install -y {package}`")]
    NotFound {
        /// Program name, e.g. `nft`.
        program: &'static str,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// The program could not be started.
    #[error("could not start `{cmdline}`: {error}")]
    Spawn {
        /// The command line.
        cmdline: String,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The program ran and reported failure.
    #[error("`{}` failed ({}): {}{}", .0.cmdline, .0.status, .0.stderr, script_suffix(&.0.script))]
    Failed(Box<Failure>),
}

/// Details of a tool that ran and failed.
#[derive(Debug)]
pub struct Failure {
    /// The command line.
    pub cmdline: String,
    /// Exit status as text.
    pub status: String,
    /// The program's standard error, trimmed.
    pub stderr: String,
    /// The script given on standard input, if any (truncated).
    pub script: Option<String>,
}

fn script_suffix(script: &Option<String>) -> String {
    match script {
        Some(s) => format!("\n--- script on stdin ---\n{s}"),
        None => String::new(),
    }
}

/// Searches `PATH` plus the usual sbin directories for an executable file.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path_var)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Renders a command line for error messages, quoting arguments with spaces.
fn render(program: &str, args: &[&str]) -> String {
    let mut out = String::from(program);
    for a in args {
        out.push(' ');
        if a.is_empty() || a.contains(char::is_whitespace) || a.contains('"') {
            out.push('\'');
            out.push_str(a);
            out.push('\'');
        } else {
            out.push_str(a);
        }
    }
    out
}

const SCRIPT_EXCERPT: usize = 4000;

/// Runs `tool args...`, optionally feeding `stdin`, and returns its standard output.
///
/// Fails with the command line, the script and the tool's standard error when the
/// tool exits with a non-zero status.
pub fn run(tool: Tool, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
    let path = tool.locate()?;
    let cmdline = render(tool.program(), args);
    tracing::debug!(%cmdline, "running");
    let mut command = Command::new(&path);
    command
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|error| CmdError::Spawn { cmdline: cmdline.clone(), error })?;
    if let Some(script) = stdin {
        if let Some(mut pipe) = child.stdin.take() {
            // A tool that dies early closes the pipe; its exit status and stderr
            // explain why, so a write error here is not the interesting one.
            let _ = pipe.write_all(script.as_bytes());
        }
    }
    let output = child.wait_with_output().map_err(|error| CmdError::Spawn { cmdline: cmdline.clone(), error })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from("(no output on stderr)");
    }
    Err(CmdError::Failed(Box::new(Failure {
        cmdline,
        status: output.status.to_string(),
        stderr,
        script: stdin.map(|s| {
            if s.len() > SCRIPT_EXCERPT {
                let mut cut = SCRIPT_EXCERPT;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}\n... ({} bytes in all)", &s[..cut], s.len())
            } else {
                s.trim_end().to_owned()
            }
        }),
    })))
}

impl CmdError {
    /// The tool's standard error, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            CmdError::Failed(f) => Some(&f.stderr),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_quotes_spaces() {
        assert_eq!(render("ip", &["link", "set", "br0", "alias", "a b"]), "ip link set br0 alias 'a b'");
    }

    #[test]
    fn missing_program_says_how_to_install() {
        let e = CmdError::NotFound { program: "nft", package: "nftables" };
        assert!(e.to_string().contains("apt-get install -y nftables"));
    }
}
