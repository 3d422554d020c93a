//! `meshd-agent init` against the real kernel's netfilter, as root: every test makes
//! its own network namespaces (`meshd-init-<pid>-<n>`, deleted when the test ends) and
//! runs the built binary in them through `ip netns exec`; the host's own namespace is
//! never changed.
//!
//! A "pod" namespace reaches a "world" namespace over a veth pair: the pod is 10.0.0.2
//! (fd00::2), the world 10.0.0.1 (fd00::1) and also the addresses the pod calls,
//! 10.96.0.10 (a Service VIP), 10.97.0.10 (something else) and fd00:96::10. Listeners
//! stand in for Envoy (15001, 15006), the agent's health port, the app and the world's
//! servers; clients are bash `/dev/tcp` connections, as root or as another uid/gid
//! through `setpriv`. Where a connection lands, and the original destination the kernel
//! recorded for it (`SO_ORIGINAL_DST`, what Envoy's listeners read), is what is
//! asserted, besides the rules `iptables-save` shows.

mod support;

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};

use support::AGENT;

const POD: &str = "10.0.0.2";
const SERVICE: &str = "10.96.0.10";
const ELSEWHERE: &str = "10.97.0.10";
/// A uid and gid that are neither root's nor the proxy's.
const APP_USER: As = As::User(1000, 1000);
const PROXY_USER: As = As::User(1337, 1337);

// ---------------------------------------------------------------------------------
// The agent's app probes under the capture

#[test]
fn the_agents_app_probes_reach_the_app_past_the_capture() {
    let t = Topology::new(false);
    succeeded(&t.pod.init(&[]));
    // The app, and a server in the world; no Envoy: a probe the capture sent to 15006
    // would be refused.
    let _app = t.pod.listen("0.0.0.0:8080");
    let _world = t.world.listen("0.0.0.0:8080");
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("chown")
        .args(["-R", "1337:1337"])
        .arg(dir.path()));
    let probe = |host: &str| {
        format!(r#"{{"check":{{"tcpSocket":{{"port":8080,"host":"{host}"}}}},"timeoutSeconds":2}}"#)
    };
    let probes = format!(
        r#"{{"/app-health/app/livez":{},"/app-health/app/readyz":{},"/app-health/app/startupz":{}}}"#,
        probe("127.0.0.1"),
        probe(POD),
        probe("10.0.0.1"),
    );
    // The agent runs as the proxy's uid, as in a pod.
    let mut agent = t.pod.command("setpriv");
    agent.args([
        "--reuid",
        "1337",
        "--regid",
        "1337",
        "--clear-groups",
        AGENT,
    ]);
    let agent = support::start(agent, dir.path(), "127.0.0.1:1", &probes);
    for (kind, reached) in [
        ("livez", "127.0.0.1:8080"),
        // The pod's own address: over lo the proxy's connections are captured, unless
        // they come from 127.0.0.6.
        ("readyz", "10.0.0.2:8080"),
        ("startupz", "10.0.0.1:8080"),
    ] {
        let (status, body) = t.pod.get(&agent.health, &format!("/app-health/app/{kind}"));
        assert_eq!(
            (status, body.as_str()),
            (200, format!("connected to {reached}\n").as_str()),
            "{kind}"
        );
    }
    assert!(agent.log_lines("app probe fails").is_empty());
}

// ---------------------------------------------------------------------------------
// Outbound

#[test]
fn outbound_tcp_goes_to_envoy_except_the_proxys_loopback_and_what_is_excluded() {
    let t = Topology::new(false);
    let out = t.pod.init(&[
        "--exclude-outbound-ports",
        "5432",
        "--exclude-outbound-ip-ranges",
        "10.97.0.0/16",
    ]);
    succeeded(&out);
    let rules = t.pod.save("iptables-save");
    for rule in [
        "-A OUTPUT -p tcp -j MESHD_OUTPUT",
        "-A MESHD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHD_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A MESHD_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A MESHD_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESHD_OUTPUT -d 10.97.0.0/16 -j RETURN",
        "-A MESHD_OUTPUT -j MESHD_REDIRECT",
        "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(rules.contains(rule), "no {rule:?} in\n{rules}");
    }
    // The veth has only a link-local IPv6 address: no ip6tables rules.
    let v6 = t.pod.save("ip6tables-save");
    assert!(!v6.contains("MESHD"), "{v6}");
    assert!(
        stderr(&out).contains("IPv6: left alone: no IPv6 address"),
        "{}",
        stderr(&out)
    );

    let l = Listeners {
        pod: vec![
            ("envoy outbound", t.pod.listen("0.0.0.0:15001")),
            ("envoy inbound", t.pod.listen("0.0.0.0:15006")),
            ("app", t.pod.listen("0.0.0.0:8080")),
        ],
        world: vec![
            ("world:80", t.world.listen("0.0.0.0:80")),
            ("world:5432", t.world.listen("0.0.0.0:5432")),
        ],
    };
    let to = |addr: &str| Some(addr.parse::<SocketAddr>().unwrap());
    let outbound = ("envoy outbound", to("10.96.0.10:80"));
    assert_eq!(l.reach(&t.pod, As::Root, SERVICE, 80), outbound);
    assert_eq!(l.reach(&t.pod, APP_USER, SERVICE, 80), outbound);
    // The proxy's own traffic leaves: by its uid, and by its gid alone.
    assert_eq!(l.reach(&t.pod, PROXY_USER, SERVICE, 80), ("world:80", None));
    assert_eq!(
        l.reach(&t.pod, As::User(1000, 1337), SERVICE, 80),
        ("world:80", None)
    );
    assert_eq!(
        l.reach(&t.pod, As::Root, SERVICE, 5432),
        ("world:5432", None)
    );
    assert_eq!(l.reach(&t.pod, As::Root, ELSEWHERE, 80), ("world:80", None));
    assert_eq!(
        l.reach(&t.pod, APP_USER, "127.0.0.1", 8080),
        ("app", to("127.0.0.1:8080"))
    );
    // The app calling its own pod IP reaches itself; Envoy doing so (having sent a
    // self-call on to the pod's address) goes through the inbound listener.
    assert_eq!(
        l.reach(&t.pod, APP_USER, POD, 8080),
        ("app", to("10.0.0.2:8080"))
    );
    assert_eq!(
        l.reach(&t.pod, PROXY_USER, POD, 8080),
        ("envoy inbound", to("10.0.0.2:8080"))
    );
}

// ---------------------------------------------------------------------------------
// Inbound

#[test]
fn inbound_tcp_goes_to_envoy_except_the_health_port_and_what_is_excluded() {
    let t = Topology::new(false);
    succeeded(&t.pod.init(&["--exclude-inbound-ports", "9090"]));
    let rules = t.pod.save("iptables-save");
    for rule in [
        "-A PREROUTING -p tcp -j MESHD_INBOUND",
        "-A MESHD_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A MESHD_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
        "-A MESHD_INBOUND -p tcp -j MESHD_IN_REDIRECT",
        "-A MESHD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(rules.contains(rule), "no {rule:?} in\n{rules}");
    }

    let l = Listeners {
        pod: vec![
            ("envoy outbound", t.pod.listen("0.0.0.0:15001")),
            ("envoy inbound", t.pod.listen("0.0.0.0:15006")),
            ("agent health", t.pod.listen("0.0.0.0:15020")),
            ("app", t.pod.listen("0.0.0.0:8080")),
            ("metrics", t.pod.listen("0.0.0.0:9090")),
        ],
        world: vec![],
    };
    let to = |port: u16| Some(SocketAddr::from(([10, 0, 0, 2], port)));
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 8080),
        ("envoy inbound", to(8080))
    );
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 15020),
        ("agent health", to(15020))
    );
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 9090),
        ("metrics", to(9090))
    );
    // The outbound listener is not for callers outside the pod: they meet the inbound one.
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 15001),
        ("envoy inbound", to(15001))
    );
}

#[test]
fn include_lists_capture_only_what_they_name() {
    let t = Topology::new(false);
    succeeded(&t.pod.init(&[
        "--include-outbound-ip-ranges",
        "10.96.0.0/16",
        "--include-inbound-ports",
        "8080",
    ]));
    let l = Listeners {
        pod: vec![
            ("envoy outbound", t.pod.listen("0.0.0.0:15001")),
            ("envoy inbound", t.pod.listen("0.0.0.0:15006")),
            ("metrics", t.pod.listen("0.0.0.0:9090")),
        ],
        world: vec![("world:80", t.world.listen("0.0.0.0:80"))],
    };
    let to = |addr: &str| Some(addr.parse::<SocketAddr>().unwrap());
    assert_eq!(
        l.reach(&t.pod, As::Root, SERVICE, 80),
        ("envoy outbound", to("10.96.0.10:80"))
    );
    assert_eq!(l.reach(&t.pod, As::Root, ELSEWHERE, 80), ("world:80", None));
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 8080),
        ("envoy inbound", to("10.0.0.2:8080"))
    );
    assert_eq!(
        l.reach(&t.world, As::Root, POD, 9090),
        ("metrics", to("10.0.0.2:9090"))
    );
}

// ---------------------------------------------------------------------------------
// IPv6

#[test]
fn a_pod_with_ipv6_gets_the_same_capture_from_ip6tables() {
    let t = Topology::new(true);
    let out = t.pod.init(&[]);
    succeeded(&out);
    assert!(stderr(&out).contains("IPv6: applied"), "{}", stderr(&out));
    let rules = t.pod.save("ip6tables-save");
    for rule in [
        "-A OUTPUT -p tcp -j MESHD_OUTPUT",
        "-A MESHD_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j MESHD_IN_REDIRECT",
        "-A MESHD_OUTPUT -d ::1/128 -j RETURN",
        "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESHD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(rules.contains(rule), "no {rule:?} in\n{rules}");
    }
    assert!(!rules.contains("127.0.0.1"), "{rules}");
    assert!(
        t.pod
            .save("iptables-save")
            .contains("-A OUTPUT -p tcp -j MESHD_OUTPUT")
    );

    let l = Listeners {
        pod: vec![
            ("envoy outbound", t.pod.listen("[::]:15001")),
            ("envoy inbound", t.pod.listen("[::]:15006")),
            ("app", t.pod.listen("[::]:8080")),
        ],
        world: vec![("world:80", t.world.listen("[::]:80"))],
    };
    let to = |addr: &str| Some(addr.parse::<SocketAddr>().unwrap());
    assert_eq!(
        l.reach(&t.pod, APP_USER, "fd00:96::10", 80),
        ("envoy outbound", to("[fd00:96::10]:80"))
    );
    assert_eq!(
        l.reach(&t.pod, PROXY_USER, "fd00:96::10", 80),
        ("world:80", None)
    );
    assert_eq!(
        l.reach(&t.pod, APP_USER, "::1", 8080),
        ("app", to("[::1]:8080"))
    );
    assert_eq!(
        l.reach(&t.world, As::Root, "fd00::2", 8080),
        ("envoy inbound", to("[fd00::2]:8080"))
    );
}

// ---------------------------------------------------------------------------------
// Idempotence and cleanup

#[test]
fn init_twice_changes_nothing_and_cleanup_restores_what_was_there_in_both_backends() {
    for (kind, iptables, other) in [
        ("nft", "iptables-nft", "iptables-legacy"),
        ("legacy", "iptables-legacy", "iptables-nft"),
    ] {
        let ns = Netns::new();
        // Somebody else's rules, in the backend under test: they choose it, and survive.
        ns.sh(&format!(
            "{iptables} -t nat -A OUTPUT -d 192.0.2.1/32 -j RETURN
             {iptables} -t nat -N OTHER
             {iptables} -t nat -A OTHER -j RETURN
             {iptables} -t nat -A PREROUTING -s 192.0.2.0/24 -j OTHER"
        ));
        let save = || ns.save(&format!("{iptables}-save"));
        let before = save();

        let first = ns.init(&["--exclude-outbound-ports", "5432"]);
        succeeded(&first);
        assert!(
            stderr(&first).contains(&format!(
                "IPv4: applied 16 rules in one transaction; {kind} backend"
            )),
            "{}",
            stderr(&first)
        );
        let once = save();
        assert_ne!(once, before);
        assert_eq!(once.matches("-j MESHD_OUTPUT").count(), 1, "{once}");
        assert_eq!(once.matches("-j MESHD_INBOUND").count(), 1, "{once}");
        assert!(
            once.contains("-A OUTPUT -d 192.0.2.1/32 -j RETURN"),
            "{once}"
        );

        let second = ns.init(&["--exclude-outbound-ports", "5432"]);
        succeeded(&second);
        assert!(
            stderr(&second).contains("auto: it holds meshd's chains"),
            "{}",
            stderr(&second)
        );
        assert_eq!(save(), once, "{kind}: a second init changed the rules");

        let cleanup = ns.init(&["--cleanup"]);
        succeeded(&cleanup);
        assert!(stderr(&cleanup).contains("IPv4: removed meshd's jumps and chains"));
        assert_eq!(save(), before, "{kind}: cleanup left the rules changed");
        let again = ns.init(&["--cleanup"]);
        succeeded(&again);
        assert!(
            stderr(&again).contains("IPv4: nothing of meshd's to remove"),
            "{}",
            stderr(&again)
        );
        assert_eq!(save(), before);

        let untouched = ns.save(&format!("{other}-save"));
        assert!(
            !untouched.contains("-A "),
            "{kind}: {other} got rules:\n{untouched}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Refusals

/// In a pod with its own user namespace that does not map the proxy's uid (Kubernetes'
/// `hostUsers: false`), the kernel refuses every owner match for that uid.
#[test]
fn a_rule_the_kernel_refuses_is_named_and_changes_nothing() {
    let ns = UserNetns::new();
    ns.sh("iptables -t nat -A OUTPUT -d 192.0.2.1/32 -j RETURN");
    let before = ns.save("iptables-save");

    let out = ns.run(AGENT, &["init"]);
    assert!(!out.status.success(), "init succeeded: {}", stderr(&out));
    let message = stderr(&out);
    for expected in [
        "IPv4: the transaction was refused and nothing was changed",
        "`-A MESHD_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j MESHD_IN_REDIRECT` (from --proxy-uid)",
        "RULE_APPEND failed (Invalid argument)",
    ] {
        assert!(message.contains(expected), "no {expected:?} in {message}");
    }
    assert_eq!(ns.save("iptables-save"), before);

    // Legacy cannot say which rule: it says that, and adds nothing either (its first
    // use instantiates the empty nat table, as any legacy command does).
    assert_eq!(ns.save("iptables-legacy-save"), "");
    let out = ns.run(AGENT, &["init", "--iptables-backend", "legacy"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("COMMIT: the kernel refused the table as a whole"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        ns.save("iptables-legacy-save"),
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\nCOMMIT"
    );
    assert_eq!(ns.save("iptables-save"), before);
}

/// A cleanup that cannot remove a chain (somebody else's rule jumps to it) is refused
/// whole, and the family done before it (IPv6) is rolled back.
#[test]
fn a_refused_cleanup_removes_nothing_in_either_family() {
    let t = Topology::new(true);
    succeeded(&t.pod.init(&[]));
    t.pod
        .sh("iptables -t nat -N OTHER && iptables -t nat -A OTHER -j MESHD_OUTPUT");
    let (v4, v6) = (t.pod.save("iptables-save"), t.pod.save("ip6tables-save"));
    assert!(v6.contains("MESHD_OUTPUT"), "{v6}");

    let out = t.pod.init(&["--cleanup"]);
    assert!(!out.status.success(), "cleanup succeeded: {}", stderr(&out));
    let message = stderr(&out);
    for expected in [
        "IPv6: removed meshd's jumps and chains",
        "IPv4: the transaction was refused and nothing was changed",
        "`-X MESHD_OUTPUT` (meshd's chain; is a rule outside meshd's chains jumping to it?)",
        "IPv6 was rolled back to what it was",
    ] {
        assert!(message.contains(expected), "no {expected:?} in {message}");
    }
    assert_eq!(t.pod.save("iptables-save"), v4);
    assert_eq!(t.pod.save("ip6tables-save"), v6);
}

#[test]
fn bad_values_are_refused_by_flag_before_anything_runs() {
    let ns = Netns::new();
    let before = ns.save("iptables-save");
    for (args, expected) in [
        (
            &["--exclude-outbound-ports", "5432,pg"][..],
            "'--exclude-outbound-ports <PORTS>': \"pg\" is not a port",
        ),
        (
            &["--inbound-port", "15001"][..],
            "--outbound-port and --inbound-port are both 15001",
        ),
        (
            &["--exclude-outbound-ip-ranges", "10.0.0.1/8"][..],
            "\"10.0.0.1/8\" has host bits set: the range is 10.0.0.0/8",
        ),
    ] {
        let out = ns.init(args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // MESHD_AGENT_* variables are the flags.
    let mut env = ns.command(AGENT);
    env.args(["init", "--dry-run"])
        .env("MESHD_AGENT_EXCLUDE_INBOUND_PORTS", "22,x");
    let out = env.output().unwrap();
    assert!(
        stderr(&out).contains("--exclude-inbound-ports"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ns.save("iptables-save"), before);
}

// ---------------------------------------------------------------------------------
// Dry run

#[test]
fn dry_run_prints_both_transactions_and_touches_nothing() {
    let t = Topology::new(true);
    let tools = [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ];
    let saves = || tools.map(|tool| t.pod.save(tool));
    let before = saves();

    let mut env = t.pod.command(AGENT);
    env.arg("init").env("MESHD_AGENT_DRY_RUN", "true");
    for out in [t.pod.init(&["--dry-run"]), env.output().unwrap()] {
        succeeded(&out);
        let script = String::from_utf8_lossy(&out.stdout);
        for line in [
            "# IPv4: iptables-restore --noflush\n*nat\n:MESHD_INBOUND - [0:0]\n",
            "-A OUTPUT -p tcp -j MESHD_OUTPUT\n",
            "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n",
            "# IPv6: ip6tables-restore --noflush\n*nat\n",
            "-A MESHD_OUTPUT -d ::1/128 -j RETURN\n",
        ] {
            assert!(script.contains(line), "no {line:?} in\n{script}");
        }
        assert!(stderr(&out).contains("IPv4: dry run, nothing applied; nft backend"));
        assert_eq!(saves(), before, "a dry run changed the rules");
    }

    // Without root it cannot read the rules, and prints what a fresh namespace gets.
    let mut user = t.pod.command("setpriv");
    user.args([
        "--reuid",
        "1000",
        "--regid",
        "1000",
        "--clear-groups",
        AGENT,
        "init",
        "--dry-run",
    ]);
    let out = user.output().unwrap();
    succeeded(&out);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("cannot read the current rules"), "{script}");
    assert!(
        script.contains("-A PREROUTING -p tcp -j MESHD_INBOUND\n"),
        "{script}"
    );
    assert_eq!(saves(), before);
}

// ---------------------------------------------------------------------------------
// Network namespaces

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("meshd-init-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn sh(&self, script: &str) -> String {
        run(self.command("bash").args(["-euc", script]))
    }

    fn init(&self, args: &[&str]) -> Output {
        self.command(AGENT).arg("init").args(args).output().unwrap()
    }

    /// GET `path` from `addr` inside this namespace, as root: (status, body).
    fn get(&self, addr: &str, path: &str) -> (u16, String) {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let response = self.sh(&format!(
            "exec 3<>/dev/tcp/{host}/{port}
             printf 'GET {path} HTTP/1.1\\r\\nHost: {addr}\\r\\nConnection: close\\r\\n\\r\\n' >&3
             timeout 10 cat <&3"
        ));
        support::parse_response(&response)
    }

    /// What `program` (an `iptables-save`) shows, without its dated comments and counters.
    fn save(&self, program: &str) -> String {
        normalized(&run(&mut self.command(program)))
    }

    /// A listener inside this namespace (a socket stays in the namespace it was made in).
    fn listen(&self, addr: &str) -> TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        let addr = addr.to_string();
        std::thread::spawn(move || {
            setns(File::open(&path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            listener
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A pod and the world it calls, over a veth pair.
struct Topology {
    pod: Netns,
    world: Netns,
}

impl Topology {
    fn new(ipv6: bool) -> Topology {
        let (pod, world) = (Netns::new(), Netns::new());
        pod.sh(&format!(
            "ip link add eth0 type veth peer name peer0 netns {world}
             ip addr add 10.0.0.2/24 dev eth0
             ip link set eth0 up",
            world = world.name
        ));
        world.sh("ip addr add 10.0.0.1/24 dev peer0
             ip addr add 10.96.0.10/32 dev peer0
             ip addr add 10.97.0.10/32 dev peer0
             ip link set peer0 up");
        pod.sh("ip route add default via 10.0.0.1");
        if ipv6 {
            world.sh("ip -6 addr add fd00::1/64 dev peer0 nodad
                 ip -6 addr add fd00:96::10/128 dev peer0 nodad");
            pod.sh("ip -6 addr add fd00::2/64 dev eth0 nodad
                 ip -6 route add default via fd00::1");
        }
        Topology { pod, world }
    }
}

/// A network namespace owned by a user namespace that maps only root (to root), as
/// `unshare --user --map-root-user --net` makes it; commands enter both.
struct UserNetns {
    holder: Child,
}

impl UserNetns {
    fn new() -> UserNetns {
        let holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "sleep", "600"])
            .spawn()
            .expect("cannot run unshare (util-linux)");
        let comm = format!("/proc/{}/comm", holder.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        // unshare execs sleep once the namespaces and the uid map are in place.
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            assert!(
                Instant::now() < deadline,
                "unshare did not set up its namespaces"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        UserNetns { holder }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args([
                "--target",
                &self.holder.id().to_string(),
                "--user",
                "--net",
                "--",
            ])
            .arg(program)
            .args(args)
            .output()
            .unwrap()
    }

    fn sh(&self, script: &str) {
        let out = self.run("bash", &["-euc", script]);
        assert!(out.status.success(), "{script}: {}", stderr(&out));
    }

    fn save(&self, program: &str) -> String {
        let out = self.run(program, &[]);
        assert!(out.status.success(), "{program}: {}", stderr(&out));
        normalized(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for UserNetns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

// ---------------------------------------------------------------------------------
// Connections

/// Who makes a connection.
#[derive(Debug, Clone, Copy)]
enum As {
    Root,
    /// uid, gid (no supplementary groups).
    User(u32, u32),
}

/// Listeners by name: the pod's (whose connections' original destination is read)
/// and the world's.
struct Listeners {
    pod: Vec<(&'static str, TcpListener)>,
    world: Vec<(&'static str, TcpListener)>,
}

impl Listeners {
    /// Connects from `from` as `who` to `host:port`; which listener got the connection,
    /// and for the pod's, the original destination the kernel recorded.
    fn reach(
        &self,
        from: &Netns,
        who: As,
        host: &str,
        port: u16,
    ) -> (&'static str, Option<SocketAddr>) {
        // The client waits for the listener's "ok": a connection that merely opened
        // somewhere else does not pass.
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && read -r -t 10 reply <&3 && [ \"$reply\" = ok ]"
        );
        let mut command = match who {
            As::Root => from.command("bash"),
            As::User(uid, gid) => {
                let mut c = from.command("setpriv");
                let (uid, gid) = (uid.to_string(), gid.to_string());
                c.args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "bash"]);
                c
            }
        };
        let client = command
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let what = format!("{who:?} → {host}:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let (name, mut stream, original) = loop {
            if let Some(landed) = self.accept() {
                break landed;
            }
            assert!(Instant::now() < deadline, "{what}: no listener got it");
            std::thread::sleep(Duration::from_millis(5));
        };
        stream.write_all(b"ok\n").unwrap();
        let out = client.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: the client failed: {}",
            stderr(&out)
        );
        (name, original)
    }

    fn accept(&self) -> Option<(&'static str, TcpStream, Option<SocketAddr>)> {
        let pod = self.pod.iter().map(|l| (l, true));
        let world = self.world.iter().map(|l| (l, false));
        for ((name, listener), in_pod) in pod.chain(world) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    let original = in_pod.then(|| original_destination(&stream));
                    return Some((name, stream, original));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{name}: {e}"),
            }
        }
        None
    }
}

/// What Envoy's listeners read: the destination before any REDIRECT.
fn original_destination(stream: &TcpStream) -> SocketAddr {
    match stream.local_addr().unwrap() {
        SocketAddr::V4(_) => {
            let addr = getsockopt(stream, sockopt::OriginalDst).unwrap();
            SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(addr)))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst).unwrap();
            SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(addr)))
        }
    }
}

// ---------------------------------------------------------------------------------
// Processes

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "meshd-agent init failed: {}",
        stderr(out)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `iptables-save` output without its dated comments, counters at zero.
fn normalized(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.find(" ["), l.ends_with(']')) {
            (Some(at), true) if l.starts_with(':') => format!("{} [0:0]", &l[..at]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
