//! Checks that this process can build labs: privileges and tools.

use crate::cmd::Tool;

/// `CAP_NET_ADMIN`: create links, addresses, qdiscs, nftables tables.
const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SYS_ADMIN`: create and enter network namespaces (`setns`, `ip netns add`).
const CAP_SYS_ADMIN: u32 = 21;

/// What is missing to run a lab.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    /// Not privileged enough.
    #[error("netlab needs CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces and links; this process lacks {missing}: run it as root (e.g. `sudo`)")]
    NotPrivileged {
        /// Names of the missing capabilities.
        missing: String,
    },
    /// A tool is not installed.
    #[error("`{program}` is missing: install it with `apt-get install -y {package}` (netlab needs: apt-get install -y iproute2 nftables)")]
    MissingTool {
        /// Program name.
        program: &'static str,
        /// Debian package.
        package: &'static str,
    },
    /// The process status could not be read.
    #[error("cannot read /proc/self/status to check privileges: {0}")]
    Proc(String),
}

/// Checks privileges and that `ip` and `tc` are installed. `nft` is checked
/// separately by [`check_nft`], since a lab without loss or cut does not need it.
pub fn check() -> Result<(), PreflightError> {
    check_privileges()?;
    for tool in [Tool::Ip, Tool::Tc] {
        check_tool(tool)?;
    }
    Ok(())
}

/// Checks that `nft` (nftables) is installed.
pub fn check_nft() -> Result<(), PreflightError> {
    check_tool(Tool::Nft)
}

fn check_tool(tool: Tool) -> Result<(), PreflightError> {
    tool.locate()
        .map(|_| ())
        .map_err(|_| PreflightError::MissingTool { program: tool.program(), package: tool.package() })
}

/// Checks the effective capabilities in `/proc/self/status`.
pub fn check_privileges() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| PreflightError::Proc(e.to_string()))?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| PreflightError::Proc("no CapEff line".into()))?;
    let missing: Vec<&str> = [(CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| caps & (1u64 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged { missing: missing.join(" and ") })
    }
}
