//! A NAT lab inside this machine: a "public internet" bridge with public
//! hosts on it, and private hosts each behind a router namespace that
//! masquerades (NAT) and drops new connections arriving from the public
//! side, as home routers do. A symmetric NAT (`masquerade fully-random`)
//! is one switch away. The test reaches every host over a management link
//! of its own (a /30 that routes nowhere else), so nodes behind NATs stay
//! unreachable from each other while their APIs answer the test.
//!
//! Needs root, iproute2 and nftables. Everything is removed when the
//! [`NatLab`] drops, and what a killed earlier run left behind is removed
//! on the next.

use std::net::Ipv4Addr;
use std::process::{Command, Output};

use super::{Node, ringlet_binary};

/// Every namespace and interface name starts with this and the pid.
const PREFIX: &str = "rnat";

/// The public network: the test's own address is `.1`. Not a
/// documentation range (198.51.100.0/24 and the like): coturn does not
/// relay to those, as a public TURN server should not.
const PUBLIC: [u8; 3] = [11, 11, 11];
/// The public network's default gateway: no namespace has this address.
const NOWHERE: u8 = 254;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("run `{program}`: {e} (tests/run installs iproute2 and nftables)")
        })
}

/// Runs `ip` with `args`; panics with its message on failure.
fn ip(args: &[&str]) {
    let output = run("ip", args);
    assert!(
        output.status.success(),
        "ip {} failed: {} (the NAT lab needs root; CI runs as root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = run("ip", args);
}

/// Loads an nftables ruleset into namespace `ns`.
fn nft(ns: &str, ruleset: &str) {
    let path = std::env::temp_dir().join(format!("{ns}.nft"));
    std::fs::write(&path, ruleset).expect("write the ruleset");
    let output = run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "nft",
            "-f",
            path.to_str().expect("path"),
        ],
    );
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "nft in {ns} failed: {}\n{ruleset}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A host with an address the test reaches it at.
#[derive(Debug, Clone)]
pub struct Host {
    pub namespace: String,
    /// Where the test reaches it: its public address, or its management
    /// address behind a NAT.
    pub reach: Ipv4Addr,
    /// Its address on the public network: its own, or its router's.
    pub public: Ipv4Addr,
    /// The router's namespace, for a host behind a NAT.
    pub router: Option<String>,
}

/// How a router maps its hosts' connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent, port-preserving (a home router).
    Home,
    /// A new random port per destination: STUN's answer is useless.
    Symmetric,
}

pub struct NatLab {
    bridge: String,
    /// Namespaces to delete, in order.
    namespaces: Vec<String>,
    /// Veths whose outer end is in the test's namespace.
    links: Vec<String>,
    next: usize,
    /// One lab at a time in a process: labs reuse the public addresses
    /// and the names.
    _alone: std::sync::MutexGuard<'static, ()>,
}

static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl NatLab {
    pub fn new() -> NatLab {
        // A test that failed with the lab held poisons the lock; the next
        // lab is built afresh all the same.
        let alone = ONE_LAB
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        remove_leftovers();
        let bridge = format!("{PREFIX}{}br", std::process::id());
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let lab = NatLab {
            bridge,
            namespaces: Vec::new(),
            links: Vec::new(),
            next: 0,
            _alone: alone,
        };
        let address = format!("{}/24", public(1));
        ip(&["addr", "add", &address, "dev", &lab.bridge]);
        ip(&["link", "set", &lab.bridge, "up"]);
        lab
    }

    fn name(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{PREFIX}{}{what}{}", std::process::id(), self.next)
    }

    fn namespace(&mut self, what: &str) -> String {
        let ns = self.name(what);
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// Plugs `ns` into the public bridge as interface `ifname` with
    /// address `.last`.
    fn plug_public(&mut self, ns: &str, ifname: &str, last: u8) {
        let outer = self.name("o");
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", ifname, "netns", ns,
        ]);
        // Deleted with the lab: a namespace's deletion removes its end
        // of the veth only later, and the next lab reuses the name.
        self.links.push(outer.clone());
        ip(&["link", "set", &outer, "master", &self.bridge]);
        ip(&["link", "set", &outer, "up"]);
        let address = format!("{}/24", public(last));
        ip(&["-n", ns, "addr", "add", &address, "dev", ifname]);
        ip(&["-n", ns, "link", "set", ifname, "up"]);
        // A default route to a gateway that never answers, as on the
        // internet: what is sent to an address nobody routes (a peer's
        // private candidate) leaves and is lost. Without a default route
        // sendto fails at once, and coturn closes a relay socket whose
        // send fails, ending that allocation's relaying.
        let nowhere = public(NOWHERE).to_string();
        ip(&["-n", ns, "route", "add", "default", "via", &nowhere]);
    }

    /// A host on the public network at `.last`.
    pub fn public_host(&mut self, last: u8) -> Host {
        let ns = self.namespace("p");
        self.plug_public(&ns, "eth0", last);
        Host {
            namespace: ns,
            reach: public(last),
            public: public(last),
            router: None,
        }
    }

    /// Host number `index` (1..=50) behind its own router, whose public
    /// address is `.(20 + index)`.
    pub fn private_host(&mut self, index: u8, nat: Nat) -> Host {
        let router = self.namespace("r");
        let wan = public(20 + index);
        self.plug_public(&router, "wan", 20 + index);
        let host = self.namespace("h");
        ip(&[
            "link", "add", "lan", "netns", &router, "type", "veth", "peer", "name", "eth0",
            "netns", &host,
        ]);
        let lan = format!("10.{index}.0.1/24");
        let inside = format!("10.{index}.0.2/24");
        ip(&["-n", &router, "addr", "add", &lan, "dev", "lan"]);
        ip(&["-n", &router, "link", "set", "lan", "up"]);
        ip(&["-n", &host, "addr", "add", &inside, "dev", "eth0"]);
        ip(&["-n", &host, "link", "set", "eth0", "up"]);
        let gateway = format!("10.{index}.0.1");
        ip(&["-n", &host, "route", "add", "default", "via", &gateway]);
        let forward = run(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        assert!(forward.status.success(), "enable forwarding in {router}");
        let masquerade = match nat {
            Nat::Home => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        // New connections from the public side are dropped in input as
        // well as forward: without the input rule a peer's first probe
        // takes the port on the router and punching fails at random.
        nft(
            &router,
            &format!(
                "table ip nat {{
                    chain postrouting {{
                        type nat hook postrouting priority srcnat;
                        oifname \"wan\" {masquerade};
                    }}
                }}
                table inet filter {{
                    chain input {{
                        type filter hook input priority 0;
                        iifname \"wan\" ct state established,related accept;
                        iifname \"wan\" ct state new drop;
                    }}
                    chain forward {{
                        type filter hook forward priority 0;
                        iifname \"wan\" ct state established,related accept;
                        iifname \"wan\" ct state new drop;
                    }}
                }}"
            ),
        );
        // The management link: the test's end is 100.64.index.1, the
        // host's .2; nothing routes through it.
        let outer = self.name("m");
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "mgmt", "netns", &host,
        ]);
        let ours = format!("100.64.{index}.1/30");
        let theirs = format!("100.64.{index}.2/30");
        ip(&["addr", "add", &ours, "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&["-n", &host, "addr", "add", &theirs, "dev", "mgmt"]);
        ip(&["-n", &host, "link", "set", "mgmt", "up"]);
        // A node binds its UDP sockets to every address, the management
        // one too: the router sends what comes back for that one to the
        // host, so the host's sockets all work alike behind the NAT.
        let host_side = format!("100.64.{index}.0/30");
        let via = format!("10.{index}.0.2");
        ip(&["-n", &router, "route", "add", &host_side, "via", &via]);
        self.links.push(outer);
        Host {
            namespace: host,
            reach: Ipv4Addr::new(100, 64, index, 2),
            public: wan,
            router: Some(router),
        }
    }

    /// Starts `ringlet serve` on `host` listening on every address, with
    /// `extra` flags; the node's `addr` is where the test reaches it.
    pub fn start_node(&self, host: &Host, extra: &[&str]) -> Node {
        self.start_node_on(host, 0, extra)
    }

    /// [`NatLab::start_node`] on a chosen port (0: any).
    pub fn start_node_on(&self, host: &Host, port: u16, extra: &[&str]) -> Node {
        let listen = format!("0.0.0.0:{port}");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &host.namespace])
            .arg(ringlet_binary())
            .args([
                "serve",
                "--listen",
                &listen,
                "--threads",
                "1",
                "--no-mdns",
                "--open-api",
            ])
            .args(extra);
        let mut node = Node::spawn(command);
        node.addr.set_ip(host.reach.into());
        node
    }

    /// Forwards TCP `port` on `host`'s router to the host, as a person
    /// opens a port on a home router: peers can then dial the host.
    pub fn forward_tcp(&self, host: &Host, port: u16) {
        let router = host.router.as_deref().expect("a host behind a router");
        let inside = format!("10.{}.0.2", host.reach.octets()[2]);
        nft(
            router,
            &format!(
                "table ip nat {{
                    chain prerouting {{
                        type nat hook prerouting priority dstnat;
                        iifname \"wan\" tcp dport {port} dnat to {inside}:{port};
                    }}
                }}
                insert rule inet filter forward iifname \"wan\" ct status dnat accept"
            ),
        );
    }

    /// Whether a TCP connection from `from` to `to` opens within 3 s.
    pub fn tcp_connects(&self, from: &Host, to: Ipv4Addr, port: u16) -> bool {
        let script = format!("exec 3<>/dev/tcp/{to}/{port}");
        run(
            "ip",
            &[
                "netns",
                "exec",
                &from.namespace,
                "timeout",
                "3",
                "bash",
                "-c",
                &script,
            ],
        )
        .status
        .success()
    }

    /// Runs `program` in `host`'s namespace (a server the test needs).
    pub fn command_in(&self, host: &Host, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.namespace, program]);
        command
    }

    /// Counts the bytes `host`'s namespace sends or receives on UDP ports
    /// `ports` (a range, e.g. a TURN server's relay ports), from now on.
    pub fn count_udp(&self, host: &Host, ports: &str) {
        nft(
            &host.namespace,
            &format!(
                "table inet count {{
                    counter relayed {{ }}
                    chain input {{
                        type filter hook input priority 0;
                        udp dport {ports} counter name \"relayed\";
                    }}
                    chain output {{
                        type filter hook output priority 0;
                        udp sport {ports} counter name \"relayed\";
                    }}
                }}"
            ),
        );
    }

    /// The bytes counted by [`NatLab::count_udp`] so far.
    pub fn counted_bytes(&self, host: &Host) -> u64 {
        let output = run(
            "ip",
            &[
                "netns",
                "exec",
                &host.namespace,
                "nft",
                "list",
                "counter",
                "inet",
                "count",
                "relayed",
            ],
        );
        let listing = String::from_utf8_lossy(&output.stdout);
        listing
            .split_whitespace()
            .skip_while(|w| *w != "bytes")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no byte count in: {listing}"))
    }
}

fn public(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(PUBLIC[0], PUBLIC[1], PUBLIC[2], last)
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Removes its veths, and with them their other ends.
            ip_quiet(&["netns", "del", ns]);
        }
        for link in &self.links {
            ip_quiet(&["link", "del", link]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

/// Removes namespaces and bridges of earlier lab runs whose process is
/// gone.
fn remove_leftovers() {
    let dead = |name: &str| -> bool {
        let digits: String = name
            .trim_start_matches(PREFIX)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        !digits.is_empty() && !std::path::Path::new(&format!("/proc/{digits}")).exists()
    };
    let output = run("ip", &["netns", "list"]);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(PREFIX) && dead(name) {
            ip_quiet(&["netns", "del", name]);
        }
    }
    let output = run("ip", &["-o", "link", "show"]);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line
            .split(": ")
            .nth(1)
            .unwrap_or_default()
            .split('@')
            .next()
            .unwrap_or_default();
        if name.starts_with(PREFIX) && dead(name) {
            ip_quiet(&["link", "del", name]);
        }
    }
}
