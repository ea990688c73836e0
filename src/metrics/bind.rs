//! Where the endpoint listens: the configured address resolved as the Python agent
//! resolves it, and a failed bind explained, naming the processes that hold the port.

use super::MetricsError;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// The socket address for `address` and `port`.
pub(crate) fn resolve(address: Option<&str>, port: u16) -> Result<SocketAddr, MetricsError> {
    let host = address.map(str::trim).unwrap_or("");
    if host.is_empty() {
        return Ok(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let failed = |reason: String| MetricsError::Resolve {
        address: host.to_string(),
        port,
        reason,
    };
    let mut found = (bare, port).to_socket_addrs().map_err(|err| {
        failed(format!(
            "not an IP address, and the name does not resolve: {err}"
        ))
    })?;
    found
        .next()
        .ok_or_else(|| failed("the name resolves to no address".to_string()))
}

pub(super) fn bind_error(addr: SocketAddr, err: &io::Error) -> MetricsError {
    let reason = match err.kind() {
        io::ErrorKind::AddrInUse => {
            let holders = port_holders(addr.port());
            let by = if holders.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = holders
                    .iter()
                    .map(|(pid, comm)| match comm {
                        Some(comm) => format!("pid {pid} ({comm})"),
                        None => format!("pid {pid}"),
                    })
                    .collect();
                format!(" by {}", list.join(", "))
            };
            format!(
                "address already in use{by}; stop that process or choose another port \
                 (command line -p/--metrics_port, config key metrics_endpoint_port)"
            )
        }
        io::ErrorKind::PermissionDenied => format!(
            "{err}; ports below 1024 need root or CAP_NET_BIND_SERVICE \
             (command line -p/--metrics_port, config key metrics_endpoint_port)"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("{err}; the address is not one of this machine's (config key metrics_endpoint_address)")
        }
        _ => err.to_string(),
    };
    MetricsError::Bind {
        address: addr.to_string(),
        reason,
    }
}

/// Processes holding a listening TCP socket on `port`, as far as `/proc` shows them (at most
/// five, by pid, with their command names when readable).
pub(crate) fn port_holders(port: u16) -> Vec<(u32, Option<String>)> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let links: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok).any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| links.iter().any(|l| target.as_os_str() == l.as_str()))
                })
            })
        })
        .collect();
    pids.sort_unstable();
    pids.truncate(5);
    pids.into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_string());
            (pid, comm)
        })
        .collect()
}

/// Inodes of the sockets in LISTEN state on `port` in a `/proc/net/tcp{,6}` table.
pub(crate) fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let local_port = u16::from_str_radix(hex_port, 16).ok()?;
            if local_port != port || *fields.get(3)? != LISTEN {
                return None;
            }
            fields.get(9)?.parse().ok().filter(|inode| *inode != 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_resolve_like_the_python_agent() {
        let at = |a| resolve(a, 8001).expect("resolves");
        assert_eq!(at(None), "0.0.0.0:8001".parse().expect("addr"));
        assert_eq!(at(Some("")), "0.0.0.0:8001".parse().expect("addr"));
        assert_eq!(at(Some("::")), "[::]:8001".parse().expect("addr"));
        assert_eq!(at(Some("[::1]")), "[::1]:8001".parse().expect("addr"));
        assert_eq!(
            at(Some("127.0.0.1")),
            "127.0.0.1:8001".parse().expect("addr")
        );
        assert!(at(Some("localhost")).ip().is_loopback());
        let err = resolve(Some("no such host.invalid"), 8001).expect_err("cannot resolve");
        let msg = err.to_string();
        assert!(
            msg.contains("no such host.invalid")
                && msg.contains("8001")
                && msg.contains("metrics_endpoint_address"),
            "{msg}"
        );
    }

    #[test]
    fn listening_inodes_match_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1F41 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n\
   2: 0100007F:1F42 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 8001), vec![4242]);
        assert_eq!(listening_inodes(table, 8002), vec![4444]);
        assert!(listening_inodes(table, 80).is_empty());
        assert!(listening_inodes("garbage\nmore garbage here\n", 8001).is_empty());
    }
}
