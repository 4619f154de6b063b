//! Test harness: members of one group in one process, each on its own redb file, linked by an
//! in-process router that can cut links (partitions) and lose members (crash-restart).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fold_group::kv::{KvCommand, KvReply, KvStateMachine};
use fold_group::{
    Group, GroupConfig, GroupId, GroupTransport, Node, NodeId, TransportError, WriteError,
};
use openraft::ServerState;

/// One member as the tests run it.
pub type Member = Group<KvStateMachine, Router>;

/// Delivers messages between the live members; a cut link loses every message both ways.
#[derive(Default)]
pub struct Router {
    members: Mutex<HashMap<NodeId, Arc<Member>>>,
    cut: Mutex<BTreeSet<(NodeId, NodeId)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        lock(&self.cut).contains(&(a.min(b), a.max(b)))
    }

    fn member(&self, id: NodeId) -> Option<Arc<Member>> {
        lock(&self.members).get(&id).cloned()
    }
}

impl GroupTransport for Router {
    async fn send(
        &self,
        from: NodeId,
        to: NodeId,
        group: &GroupId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        if self.is_cut(from, to) {
            return Err(TransportError::Unreachable(to, "link cut".into()));
        }
        let Some(member) = self.member(to) else {
            return Err(TransportError::Unreachable(to, "member down".into()));
        };
        if member.id() != group {
            return Err(TransportError::Unreachable(to, "no such group".into()));
        }
        let reply = member.handle_rpc(from, &request).await;
        // A link cut while the request was in flight loses the reply too.
        if self.is_cut(from, to) {
            return Err(TransportError::Unreachable(to, "link cut".into()));
        }
        Ok(reply)
    }
}

/// A group of members on redb files in a temporary directory.
pub struct Cluster {
    pub router: Arc<Router>,
    pub group: GroupId,
    pub config: GroupConfig,
    pub sm: Arc<KvStateMachine>,
    dir: tempfile::TempDir,
    dbs: Mutex<HashMap<NodeId, Weak<redb::Database>>>,
}

/// Waits for `f` to hold, polling every 20 ms, failing after `bound` (a fail-fast bound).
pub async fn wait_for<F: FnMut() -> bool>(what: &str, bound: Duration, mut f: F) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens (or creates) a redb file. The last handle of a crashed member may still be closing on
/// another thread (its weak handle dies before the file is unlocked): retry for a bounded time.
pub async fn open_db(path: &std::path::Path) -> Arc<redb::Database> {
    let start = Instant::now();
    loop {
        match redb::Database::create(path) {
            Ok(db) => return Arc::new(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if start.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("open redb file {}: {e}", path.display()),
        }
    }
}

pub fn node(id: NodeId) -> Node {
    Node {
        addr: format!("member-{id}"),
    }
}

impl Cluster {
    /// Starts members `ids` and founds the group with all of them as voters.
    pub async fn start(ids: &[NodeId], config: GroupConfig) -> Self {
        let group = GroupId::new("people-v1").expect("group id");
        let cluster = Self {
            router: Arc::new(Router::default()),
            sm: Arc::new(KvStateMachine::new(&group)),
            group,
            config,
            dir: tempfile::tempdir().expect("temp dir"),
            dbs: Mutex::new(HashMap::new()),
        };
        for id in ids {
            cluster.up(*id).await;
        }
        let members: BTreeMap<NodeId, Node> = ids.iter().map(|id| (*id, node(*id))).collect();
        cluster
            .get(ids[0])
            .initialize(members)
            .await
            .expect("initialize");
        cluster.leader(Duration::from_secs(10)).await;
        cluster
    }

    pub fn path(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("member-{id}.redb"))
    }

    /// Opens member `id` from its redb file (created empty the first time) and links it.
    pub async fn up(&self, id: NodeId) -> Arc<Member> {
        let path = self.path(id);
        let db = open_db(&path).await;
        lock(&self.dbs).insert(id, Arc::downgrade(&db));
        let member = Group::open(
            db,
            self.group.clone(),
            id,
            self.config.clone(),
            self.sm.clone(),
            self.router.clone(),
        )
        .await
        .expect("open group member");
        let member = Arc::new(member);
        lock(&self.router.members).insert(id, member.clone());
        member
    }

    /// Crash: unlinks member `id`, stops its Raft and closes its redb file. Everything it
    /// acknowledged is already on disk (every vote, append and apply is an fsynced commit).
    pub async fn down(&self, id: NodeId) {
        let Some(member) = lock(&self.router.members).remove(&id) else {
            return;
        };
        member.shutdown().await.expect("shutdown");
        drop(member);
        let weak = lock(&self.dbs).get(&id).cloned().unwrap_or_default();
        wait_for(
            "the redb file to close (a test still holds the member?)",
            Duration::from_secs(10),
            || weak.upgrade().is_none(),
        )
        .await;
    }

    /// Crash and restart from the same redb file.
    pub async fn restart(&self, id: NodeId) -> Arc<Member> {
        self.down(id).await;
        self.up(id).await
    }

    pub fn get(&self, id: NodeId) -> Arc<Member> {
        self.router
            .member(id)
            .unwrap_or_else(|| panic!("member {id} is down"))
    }

    pub fn try_get(&self, id: NodeId) -> Option<Arc<Member>> {
        self.router.member(id)
    }

    pub fn live(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = lock(&self.router.members).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Cuts every link between `a` and `b`.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut cut = lock(&self.router.cut);
        for x in a {
            for y in b {
                cut.insert((*x.min(y), *x.max(y)));
            }
        }
    }

    pub fn heal(&self) {
        lock(&self.router.cut).clear();
    }

    /// The live member that leads with the highest term among `among` (all live if empty),
    /// waiting for one.
    pub async fn leader_among(&self, among: &[NodeId], bound: Duration) -> NodeId {
        let start = Instant::now();
        loop {
            let mut best: Option<(u64, NodeId)> = None;
            for id in self.live() {
                if !among.is_empty() && !among.contains(&id) {
                    continue;
                }
                // A member may go down meanwhile (other tasks crash members).
                let Some(m) = self.try_get(id).map(|m| m.metrics()) else {
                    continue;
                };
                if m.state == ServerState::Leader && best.is_none_or(|(t, _)| m.current_term > t) {
                    best = Some((m.current_term, id));
                }
            }
            if let Some((_, id)) = best {
                return id;
            }
            assert!(
                start.elapsed() < bound,
                "no leader among {among:?} after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self, bound: Duration) -> NodeId {
        self.leader_among(&[], bound).await
    }

    /// One write through member `via`, following one redirect to the leader it names.
    pub async fn put_via(
        &self,
        via: NodeId,
        key: &str,
        value: &str,
    ) -> Result<KvReply, WriteError> {
        let cmd = KvCommand::Put {
            key: key.into(),
            value: value.into(),
        }
        .encode();
        let first = match self.try_get(via) {
            Some(m) => m.write(cmd.clone()).await,
            None => return Err(WriteError::Unavailable("member down".into())),
        };
        let reply = match first {
            Err(WriteError::NotLeader { leader: Some(l) }) if l != via => match self.try_get(l) {
                Some(m) => m.write(cmd).await,
                None => Err(WriteError::NotLeader { leader: Some(l) }),
            },
            other => other,
        }?;
        Ok(KvReply::decode(&reply).expect("kv reply"))
    }

    /// Writes until acknowledged (retrying on refusals), through any live member.
    pub async fn put(&self, key: &str, value: &str, bound: Duration) -> KvReply {
        let start = Instant::now();
        let mut i = 0usize;
        loop {
            let live = self.live();
            let via = live[i % live.len()];
            i += 1;
            match self.put_via(via, key, value).await {
                Ok(r) => return r,
                Err(e) => {
                    assert!(
                        start.elapsed() < bound,
                        "write {key}={value} not acknowledged after {bound:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Member `id`'s whole key-value state, read locally.
    pub async fn dump(&self, id: NodeId) -> BTreeMap<String, String> {
        self.get(id)
            .read_local(|sm, txn| sm.all(txn))
            .await
            .expect("local read")
    }

    /// Waits until every live member has applied what the leader has, then returns their states.
    pub async fn converged(&self, bound: Duration) -> BTreeMap<NodeId, BTreeMap<String, String>> {
        // The leader's read index covers every write acknowledged so far (its metrics may lag).
        let start = Instant::now();
        let target = loop {
            let leader = self.leader(bound).await;
            if let Some(m) = self.try_get(leader)
                && let Ok(read) = m.raft().ensure_linearizable().await
            {
                break read.map(|l| l.index);
            }
            assert!(
                start.elapsed() < bound,
                "no leader could confirm a read index"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for id in self.live() {
            self.get(id)
                .raft()
                .wait(Some(bound))
                .applied_index_at_least(target, "converge")
                .await
                .unwrap_or_else(|e| panic!("member {id} did not catch up: {e}"));
        }
        let mut out = BTreeMap::new();
        for id in self.live() {
            out.insert(id, self.dump(id).await);
        }
        out
    }

    pub async fn stop(&self) {
        for id in self.live() {
            self.down(id).await;
        }
    }
}
