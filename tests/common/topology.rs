//! Real Redis topologies for the fleet suites: a Sentinel group (a master, a replica, three
//! sentinels) and a Redis Cluster (masters with replicas). Every server is a `redis-server`
//! process on free loopback ports, in a directory of its own, killed (and the directory
//! removed) when dropped; a failing test keeps the directories and prints where, for the logs.
//! Driven and inspected with `redis-cli`, never through the sidecar's own code. Everything
//! waits by polling, so start-up takes as long as the servers need and no more.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use authz_sidecar::tools::devkeys::random_id;

/// Start-up and topology changes that take longer than this are failures.
const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The service name the sentinels monitor.
pub const SENTINEL_SERVICE: &str = "authz";

/// `redis-cli -p <port> <args>`: its output, or `None` if it could not connect or failed.
pub fn try_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// [`try_cli`], failing the test when the server does not answer.
pub fn cli(port: u16, args: &[&str]) -> String {
    try_cli(port, args).unwrap_or_else(|| panic!("redis-cli -p {port} {args:?} failed"))
}

/// Polls `probe` every 20 ms until it gives a value; fails the test after `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(POLL);
    }
}

/// `field:value` lines of an `INFO` or `CLUSTER INFO` reply.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_owned)
}

/// One `redis-server` process (data node or sentinel) and its directory.
pub struct Node {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// A server on a free port with `config(port)` appended to the basics (loopback, no
    /// persistence, its own directory and log). A port taken between choosing and binding is
    /// retried elsewhere.
    fn start(kind: &str, sentinel: bool, config: impl Fn(u16) -> String) -> Node {
        for _ in 0..3 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("authz-{kind}-{port}-{}", random_id()));
            fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("redis.conf");
            fs::write(
                &conf,
                format!(
                    // A replica's first sync starts at once (the default waits 5 s for
                    // more replicas to share it).
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\nsave \"\"\n\
                     appendonly no\nrepl-diskless-sync-delay 0\n{}\n",
                    dir.display(),
                    dir.join("redis.log").display(),
                    config(port)
                ),
            )
            .unwrap();
            let mut command = Command::new("redis-server");
            command.arg(&conf);
            if sentinel {
                command.arg("--sentinel");
            }
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (make test installs it)");
            let mut node = Node {
                port,
                dir,
                child: Some(child),
            };
            if node.wait_until_up() {
                return node;
            }
            eprintln!(
                "redis-server ({kind}) did not come up on port {port}: {}",
                node.log_tail()
            );
        }
        panic!("could not start a {kind} redis-server");
    }

    /// Whether it answers PING before it exits or 10 s pass.
    fn wait_until_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if try_cli(self.port, &["PING"]).as_deref() == Some("PONG") {
                return true;
            }
            let child = self.child.as_mut().expect("started");
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            std::thread::sleep(POLL);
        }
        false
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: its connections close at once and the port stops answering.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// `INFO <section>` field, e.g. `role` in `replication`.
    pub fn info(&self, section: &str, field: &str) -> Option<String> {
        info_field(&try_cli(self.port, &["INFO", section])?, field)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("kept {} for its redis.log", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One master, one replica and three sentinels (quorum 2) monitoring them as
/// [`SENTINEL_SERVICE`]. A master that stops answering for a second is failed over; the
/// replica is promoted within a few seconds.
pub struct Sentinels {
    /// The master and the replica, in start order (which is master changes on failover).
    pub data: Vec<Node>,
    pub sentinels: Vec<Node>,
    /// The master port at the last [`Sentinels::kill_master`].
    killed: Option<u16>,
}

impl Sentinels {
    pub fn start() -> Sentinels {
        let master = Node::start("sentinel-master", false, |_| String::new());
        let replica = Node::start("sentinel-replica", false, |_| {
            format!("replicaof 127.0.0.1 {}", master.port)
        });
        wait_for(SETTLE, "the replica to sync", || {
            (replica.info("replication", "master_link_status")? == "up").then_some(())
        });
        let monitored = master.port;
        let sentinels: Vec<Node> = (0..3)
            .map(|_| {
                Node::start("sentinel", true, |_| {
                    // `monitor` first: the other lines name the service it declares.
                    format!(
                        "sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {monitored} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                         sentinel failover-timeout {SENTINEL_SERVICE} 3000\n\
                         sentinel parallel-syncs {SENTINEL_SERVICE} 1"
                    )
                })
            })
            .collect();
        let group = Sentinels {
            data: vec![master, replica],
            sentinels,
            killed: None,
        };
        // A failover needs a quorum of sentinels that know each other (they meet through
        // hello messages on the master, every 2 s) and know the replica.
        for sentinel in &group.sentinels {
            wait_for(SETTLE, "the sentinels to meet", || {
                let state = sentinel_master_state(sentinel.port)?;
                (state.others >= 2 && state.replicas >= 1).then_some(())
            });
        }
        group
    }

    /// The URL fred connects through: every sentinel, and the service name.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={SENTINEL_SERVICE}",
            self.sentinels[0].port
        );
        for sentinel in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", sentinel.port));
        }
        url
    }

    /// The master port as the first answering sentinel reports it.
    pub fn master(&self) -> u16 {
        self.sentinels
            .iter()
            .find_map(|s| master_addr(s.port))
            .expect("a sentinel answers")
    }

    /// The data node that is not the master (the replica until a failover).
    pub fn replica(&self) -> u16 {
        let master = self.master();
        self.data
            .iter()
            .map(|n| n.port)
            .find(|&p| p != master)
            .expect("two data nodes")
    }

    /// SIGKILLs the current master; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master();
        self.data
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the master is one of ours")
            .kill();
        self.killed = Some(port);
        port
    }

    /// Waits until every sentinel reports a master other than the one killed, and that node
    /// itself says it is a master; returns its port.
    pub fn wait_for_new_master(&self, limit: Duration) -> u16 {
        let old = self.killed.expect("kill_master first");
        wait_for(limit, "the sentinels to promote the replica", || {
            let ports: Vec<u16> = self
                .sentinels
                .iter()
                .map(|s| master_addr(s.port))
                .collect::<Option<_>>()?;
            let new = ports[0];
            let agreed = new != old && ports.iter().all(|&p| p == new);
            let promoted = info_field(&try_cli(new, &["INFO", "replication"])?, "role")?;
            (agreed && promoted == "master").then_some(new)
        })
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }
}

struct SentinelView {
    others: usize,
    replicas: usize,
}

/// What one sentinel knows of the service: other sentinels and replicas.
fn sentinel_master_state(sentinel: u16) -> Option<SentinelView> {
    let reply = try_cli(sentinel, &["SENTINEL", "MASTER", SENTINEL_SERVICE])?;
    // A flat list of field and value lines.
    let lines: Vec<&str> = reply.lines().collect();
    let field = |name: &str| -> Option<usize> {
        let at = lines.iter().position(|l| *l == name)?;
        lines.get(at + 1)?.parse().ok()
    };
    Some(SentinelView {
        others: field("num-other-sentinels")?,
        replicas: field("num-slaves")?,
    })
}

fn master_addr(sentinel: u16) -> Option<u16> {
    let reply = try_cli(
        sentinel,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE],
    )?;
    reply.lines().nth(1)?.trim().parse().ok()
}

/// A Redis Cluster on loopback: `cluster-enabled` servers joined by `redis-cli --cluster
/// create`, each master with its replicas. Manual failovers and slot moves are driven through
/// `redis-cli`, and every change is waited for until all nodes agree.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    pub failed: bool,
    /// Owned slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|&(a, b)| (b - a) as usize + 1).sum()
    }
}

impl Cluster {
    pub fn start(masters: usize, replicas_per_master: usize) -> Cluster {
        let nodes: Vec<Node> = (0..masters * (1 + replicas_per_master))
            .map(|_| {
                // The bus port is chosen too: the default (port + 10000) may be taken, or
                // past 65535 for a port from the ephemeral range.
                Node::start("cluster", false, |_| {
                    format!(
                        "cluster-enabled yes\ncluster-config-file nodes.conf\n\
                         cluster-node-timeout 5000\ncluster-port {}",
                        free_port()
                    )
                })
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args([
                "--cluster-replicas",
                &replicas_per_master.to_string(),
                "--cluster-yes",
            ])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes };
        cluster.wait_until_settled(|view| {
            view.iter().filter(|n| n.master).count() == masters
                && view.iter().filter(|n| !n.master).count() == masters * replicas_per_master
        });
        // Replicas have synced (a manual failover needs it).
        for node in &cluster.nodes {
            wait_for(SETTLE, "the replicas to sync", || {
                let info = try_cli(node.port, &["INFO", "replication"])?;
                let synced = info_field(&info, "role")? == "master"
                    || info_field(&info, "master_link_status")? == "up";
                synced.then_some(())
            });
        }
        cluster
    }

    /// The URL fred connects with: every node as a seed.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, node) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }

    /// The cluster as the first answering node sees it.
    pub fn view(&self) -> Vec<ClusterNode> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .find_map(|n| view_from(n.port))
            .expect("a cluster node answers")
    }

    /// Master ports, in slot order.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<ClusterNode> = self.view().into_iter().filter(|n| n.master).collect();
        masters.sort_by_key(|n| n.slots.first().map_or(u16::MAX, |s| s.0));
        masters.into_iter().map(|n| n.port).collect()
    }

    /// Ports of the replicas of the master on `master`.
    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        let view = self.view();
        let id = &view.iter().find(|n| n.port == master).expect("a node").id;
        view.iter()
            .filter(|n| n.master_id.as_ref() == Some(id))
            .map(|n| n.port)
            .collect()
    }

    pub fn keyslot(&self, key: &str) -> u16 {
        cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot number")
    }

    /// The port of the master that serves `key`.
    pub fn node_for_key(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        self.view()
            .into_iter()
            .find(|n| n.master && n.owns(slot))
            .unwrap_or_else(|| panic!("no master owns slot {slot}"))
            .port
    }

    fn id_of(&self, port: u16) -> String {
        cli(port, &["CLUSTER", "MYID"])
    }

    /// `CLUSTER FAILOVER` on a replica (its master agrees and hands over): waits until every
    /// node sees it as a master and the cluster is ok again.
    pub fn failover(&self, replica: u16) {
        let reply = cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(reply, "OK", "CLUSTER FAILOVER on {replica}");
        self.wait_until_settled(|view| {
            view.iter()
                .any(|n| n.port == replica && n.master && !n.slots.is_empty())
        });
    }

    /// Moves `slots` slots from the master on `from` to the master on `to` with `redis-cli
    /// --cluster reshard` (keys included), and waits until every node agrees.
    pub fn reshard(&self, slots: usize, from: u16, to: u16) {
        let before = self.owned_by(to);
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &self.id_of(from)])
            .args(["--cluster-to", &self.id_of(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_until_settled(|view| {
            view.iter()
                .find(|n| n.port == to)
                .is_some_and(|n| n.slot_count() == before + slots)
        });
    }

    /// Moves one slot (with its keys) to the master on `to`, the way `redis-cli` does it
    /// (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE everywhere): for moving the slot of one
    /// chosen key. Waits until every node agrees.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let view = self.view();
        let source = view
            .iter()
            .find(|n| n.master && n.owns(slot))
            .expect("an owner")
            .clone();
        if source.port == to {
            return;
        }
        let target_id = self.id_of(to);
        let slot_arg = slot.to_string();
        let ok = |port: u16, args: &[&str]| assert_eq!(cli(port, args), "OK", "{port} {args:?}");
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &source.id],
        );
        ok(
            source.port,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &target_id],
        );
        loop {
            let keys = cli(source.port, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(source.port, &args);
        }
        // The new owner first, then the old one, then everyone else (as redis-cli does).
        let mut order = vec![to, source.port];
        order.extend(
            view.iter()
                .filter(|n| n.master && n.port != to && n.port != source.port)
                .map(|n| n.port),
        );
        for port in order {
            ok(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target_id]);
        }
        self.wait_until_settled(|view| {
            view.iter()
                .any(|n| n.port == to && n.master && n.owns(slot))
        });
    }

    /// Slots owned by the master on `port`.
    pub fn owned_by(&self, port: u16) -> usize {
        self.view()
            .iter()
            .find(|n| n.port == port)
            .map_or(0, ClusterNode::slot_count)
    }

    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots served and a
    /// view of the cluster for which `agreed` holds.
    fn wait_until_settled(&self, agreed: impl Fn(&[ClusterNode]) -> bool) {
        wait_for(SETTLE, "the cluster to settle", || {
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let info = try_cli(node.port, &["CLUSTER", "INFO"])?;
                let ok = info_field(&info, "cluster_state")? == "ok"
                    && info_field(&info, "cluster_slots_ok")? == "16384";
                if !ok || !agreed(&view_from(node.port)?) {
                    return None;
                }
            }
            Some(())
        });
    }
}

/// `CLUSTER NODES` as seen from one node.
fn view_from(port: u16) -> Option<Vec<ClusterNode>> {
    let reply = try_cli(port, &["CLUSTER", "NODES"])?;
    reply.lines().map(parse_cluster_node).collect()
}

/// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_cluster_node(line: &str) -> Option<ClusterNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?;
    let flags: Vec<&str> = fields.get(2)?.split(',').collect();
    let master_id = fields
        .get(3)
        .filter(|id| **id != "-")
        .map(|s| s.to_string());
    let slots = fields
        .iter()
        .skip(8)
        // `[slot->-id]` / `[slot-<-id]`: a migration in progress, not ownership.
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let slot = s.parse().ok()?;
                Some((slot, slot))
            }
        })
        .collect();
    Some(ClusterNode {
        id: fields[0].to_owned(),
        port: port.parse().ok()?,
        master: flags.contains(&"master"),
        master_id,
        failed: flags.contains(&"fail"),
        slots,
    })
}
