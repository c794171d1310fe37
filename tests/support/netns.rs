//! Hosts on one LAN inside this machine: a Linux bridge and a network
//! namespace per host, joined to the bridge by a veth pair, each with an
//! IPv4 address of its own. Multicast (mDNS) crosses the bridge as on a
//! real switch. Needs root; everything is removed when the [`Lan`] drops,
//! and what a killed earlier run left behind is removed on the next.

use std::net::Ipv4Addr;
use std::process::Command;

use super::{Node, ringlet_binary};

/// Every name starts with this and the test process's pid.
const PREFIX: &str = "rlt";

/// Runs `ip` with `args`; panics with its message on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("run `ip` (iproute2)");
    assert!(
        output.status.success(),
        "ip {} failed: {} (the multi-host test needs root and iproute2; tests/run installs iproute2, CI runs as root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Like [`ip`], ignoring failure (for cleaning up).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// A host: a network namespace with one interface on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub namespace: String,
    /// The veth end on the bridge (in the test's namespace).
    outer: String,
    /// The veth end inside the namespace.
    inner: String,
    pub ip: Ipv4Addr,
}

/// A bridge and the hosts on it.
pub struct Lan {
    bridge: String,
    /// The /24 every host's address is in: `10.<a>.<b>.x`.
    subnet: [u8; 3],
    hosts: Vec<Host>,
}

impl Lan {
    /// A new, empty LAN. Panics when not root (`tests/run` runs as root in
    /// CI).
    pub fn new() -> Lan {
        remove_leftovers();
        let pid = std::process::id();
        let bridge = format!("{PREFIX}{pid}br");
        // Distinct per test process, so two runs never share a subnet.
        let subnet = [10, 200 + (pid % 50) as u8, (pid / 50 % 250) as u8];
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let lan = Lan {
            bridge,
            subnet,
            hosts: Vec::new(),
        };
        // The test itself reaches the hosts through the bridge.
        let address = format!("{}/24", lan.address(1));
        ip(&["addr", "add", &address, "dev", &lan.bridge]);
        ip(&["link", "set", &lan.bridge, "up"]);
        lan
    }

    /// The bridge's name (an interface in the test's namespace).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The test's own address on the LAN.
    pub fn gateway(&self) -> Ipv4Addr {
        self.address(1)
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last)
    }

    /// Adds host number `index` (0..) with address `.last` on the LAN.
    pub fn add_host(&mut self, last: u8) -> Host {
        let pid = std::process::id();
        let index = self.hosts.len();
        let host = Host {
            namespace: format!("{PREFIX}{pid}-{index}"),
            outer: format!("{PREFIX}{pid}o{index}"),
            inner: format!("{PREFIX}{pid}i{index}"),
            ip: self.address(last),
        };
        ip(&["netns", "add", &host.namespace]);
        ip(&[
            "link",
            "add",
            &host.outer,
            "type",
            "veth",
            "peer",
            "name",
            &host.inner,
        ]);
        ip(&["link", "set", &host.inner, "netns", &host.namespace]);
        ip(&["link", "set", &host.outer, "master", &self.bridge]);
        ip(&["link", "set", &host.outer, "up"]);
        let ns = host.namespace.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "set", &host.inner, "up"]);
        self.set_address(&host, last);
        self.hosts.push(host.clone());
        host
    }

    /// Gives `host` the address `.last` in place of the one it had.
    pub fn set_address(&self, host: &Host, last: u8) -> Host {
        let ns = host.namespace.as_str();
        ip(&["-n", ns, "addr", "flush", "dev", &host.inner]);
        let address = format!("{}/24", self.address(last));
        ip(&["-n", ns, "addr", "add", &address, "dev", &host.inner]);
        // Multicast leaves by this interface; the host has no default route.
        ip_quiet(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", &host.inner]);
        Host {
            ip: self.address(last),
            ..host.clone()
        }
    }

    /// Unplugs (or plugs back) `host`'s cable: its end on the bridge goes
    /// down (up).
    pub fn set_link(&self, host: &Host, up: bool) {
        ip(&["link", "set", &host.outer, if up { "up" } else { "down" }]);
    }

    /// Starts `ringlet serve` on `host`, listening on every address at a
    /// free port, with `extra` flags; the node's `addr` is its address on
    /// the LAN. The tests call the API from outside the node's namespace,
    /// so its API is open (`--open-api`) unless the test sets a key.
    pub fn start_node(&self, host: &Host, extra: &[&str]) -> Node {
        if extra.iter().any(|a| a.starts_with("--api-key")) {
            self.start_node_exact(host, extra)
        } else {
            self.start_node_exact(host, &[extra, &["--open-api"]].concat())
        }
    }

    /// Like [`Lan::start_node`], with exactly the flags given: a node
    /// without a key answers only its own machine.
    pub fn start_node_exact(&self, host: &Host, extra: &[&str]) -> Node {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &host.namespace])
            .arg(ringlet_binary())
            .args(["serve", "--listen", "0.0.0.0:0", "--threads", "1"])
            .args(extra);
        let mut node = Node::spawn(command);
        node.addr.set_ip(host.ip.into());
        node
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Removes the veth pair with it.
            ip_quiet(&["netns", "del", &host.namespace]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

/// Removes namespaces and bridges of earlier test processes that no longer
/// run (killed before their `Lan` dropped).
fn remove_leftovers() {
    let alive = |name: &str| -> bool {
        let digits: String = name
            .trim_start_matches(PREFIX)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.is_empty() || std::path::Path::new(&format!("/proc/{digits}")).exists()
    };
    if let Ok(output) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(PREFIX) && !alive(name) {
                ip_quiet(&["netns", "del", name]);
            }
        }
    }
    if let Ok(output) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or_default();
            if name.starts_with(PREFIX) && !alive(name) {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}
