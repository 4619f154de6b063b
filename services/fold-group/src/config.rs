//! Group configuration: Raft timings suited to a LAN, log compaction and snapshot chunking.

use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};

use crate::GroupError;

/// Settings of one group member. The defaults suit members on one LAN (sub-millisecond RTT):
/// heartbeats every 50 ms, elections after 150–300 ms of silence, so a failover takes well under
/// a second.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Leader heartbeat interval. openraft 0.9 also gives each append-entries RPC this long, so
    /// the largest batch of entries (see `max_command_bytes`) must cross the link, be fsynced and
    /// answered within it.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Build a snapshot (and compact the log) after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging members catch up by log.
    pub keep_after_snapshot: u64,
    /// Largest snapshot chunk put in one install-snapshot message (bytes).
    pub snapshot_chunk_bytes: u64,
    /// Most entries in one append-entries message.
    pub max_entries_per_append: u64,
    /// Time allowed to one RPC (vote, append, snapshot chunk) before the transport gives up.
    pub rpc_timeout: Duration,
    /// Time a write waits for commit and apply before answering `WriteError::Timeout`.
    pub write_timeout: Duration,
    /// Time a linearizable read waits for a read index and for this member to apply it.
    pub read_timeout: Duration,
    /// Largest snapshot a member accepts from its leader (bytes; the chunks are put together in
    /// memory before they are installed).
    pub max_snapshot_bytes: u64,
    /// Largest command `Group::write` accepts (bytes), so every log entry fits one message.
    pub max_command_bytes: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            snapshot_every: 5_000,
            keep_after_snapshot: 1_000,
            snapshot_chunk_bytes: 256 * 1024,
            max_entries_per_append: 300,
            rpc_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(2),
            max_snapshot_bytes: 1 << 30,
            max_command_bytes: 1 << 20,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl GroupConfig {
    /// The openraft config for a group, validated.
    pub fn to_raft_config(&self, cluster_name: &str) -> Result<Arc<Config>, GroupError> {
        let config = Config {
            cluster_name: cluster_name.to_string(),
            heartbeat_interval: millis(self.heartbeat_interval),
            election_timeout_min: millis(self.election_timeout_min),
            election_timeout_max: millis(self.election_timeout_max),
            install_snapshot_timeout: millis(self.rpc_timeout),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.max_entries_per_append,
            ..Default::default()
        };
        // Commands travel hex-encoded in JSON log entries: one must fit a message on its own.
        if self.max_command_bytes.saturating_mul(2) > crate::network::MAX_RPC_BYTES / 2 {
            return Err(GroupError::Config(format!(
                "max_command_bytes {} too large for {} byte messages",
                self.max_command_bytes,
                crate::network::MAX_RPC_BYTES
            )));
        }
        let config = config
            .validate()
            .map_err(|e| GroupError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }
}
