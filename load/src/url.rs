//! `ws://host:port/path`, parsed by hand (no TLS: `wss://` is refused).

use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `host:port` as written, for the Host header.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Path and query, at least "/".
    pub path: String,
}

impl WsUrl {
    pub fn parse(s: &str) -> Result<WsUrl, String> {
        let rest = if let Some(r) = s.strip_prefix("ws://") {
            r
        } else if s.starts_with("wss://") {
            return Err(format!("{s}: wss:// is not supported, use ws://"));
        } else {
            return Err(format!("{s}: expected ws://host:port/path"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{s}: missing or unsupported host"));
        }
        // [v6]:port, host:port, or host alone (port 80).
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s}: unclosed [ in host"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("{s}: junk after ]")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{s}: bad port {p:?}"))?,
            None => 80,
        };
        if host.is_empty() {
            return Err(format!("{s}: empty host"));
        }
        Ok(WsUrl {
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// Resolve the host, IPv4 first.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("{} resolves to no address", self.host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = WsUrl::parse("ws://127.0.0.1:9001/echo").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.authority.as_str()
            ),
            ("127.0.0.1", 9001, "/echo", "127.0.0.1:9001")
        );
        let u = WsUrl::parse("ws://localhost").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = WsUrl::parse("ws://[::1]:8080/a/b?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/a/b?x=1")
        );
        let u = WsUrl::parse("ws://h:1?q").unwrap();
        assert_eq!(u.path, "/?q");
        assert_eq!(
            WsUrl::parse("ws://127.0.0.1:9001/echo")
                .unwrap()
                .resolve()
                .unwrap(),
            "127.0.0.1:9001".parse().unwrap()
        );
    }

    #[test]
    fn refuses() {
        for bad in [
            "http://x/",
            "wss://x/",
            "ws://",
            "ws://:80/",
            "ws://h:99999/",
            "ws://h:x/",
            "ws://u@h/",
            "ws://[::1/",
        ] {
            assert!(WsUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
