//! The swarm task's DHT glue: the schemas this node provides (announced again when the routing
//! table changes), provider lookups answered when they finish, and closest-peer lookups that feed
//! the peer book and move held requests on ([`crate::connect`]).

use std::collections::{BTreeSet, HashSet};

use libp2p::{PeerId, kad};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::command::MeshError;

impl EventLoop {
    /// [`Command::Provide`]: announce exactly these schemas in the DHT.
    pub(super) fn provide(&mut self, schemas: Vec<String>, reply: oneshot::Sender<Vec<String>>) {
        let want: BTreeSet<String> = schemas.into_iter().collect();
        for gone in self.provided.difference(&want) {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&schema_key(gone));
        }
        self.provided = want;
        self.reprovide();
        let _ = reply.send(self.provided.iter().cloned().collect());
    }

    /// [`Command::FindProviders`]: a DHT provider lookup, answered in
    /// [`EventLoop::on_providers_found`].
    pub(super) fn find_providers(
        &mut self,
        schema: String,
        reply: oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
    ) {
        let mut found = HashSet::new();
        if self.provided.contains(&schema) {
            found.insert(self.local());
        }
        // With no other node to ask, "none found" would be a guess: say so instead.
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        if known == 0 {
            let _ = reply.send(if found.is_empty() {
                Err(MeshError::Unavailable(format!(
                    "cannot look up providers of '{schema}': this node knows no other node to ask (dial one or add a bootstrap peer)"
                )))
            } else {
                Ok((found.into_iter().collect(), 0))
            });
            return;
        }
        let q = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(schema_key(&schema));
        self.pending_providers.insert(q, (schema, found, reply));
    }

    pub(super) fn reprovide(&mut self) {
        for name in self.provided.clone() {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(schema_key(&name))
            {
                tracing::warn!(schema = %name, error = %e, "cannot announce schema");
            }
        }
    }

    pub(super) fn on_kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } => {
                let e = self.entry(peer, "dht");
                for a in addresses.iter() {
                    e.add_addr(a.clone());
                }
                if !self.provided.is_empty() {
                    self.reprovide_due = true;
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(r),
                step,
                stats,
            } => self.on_providers_found(id, r, step.last, stats.num_requests()),
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(r),
                step,
                ..
            } => self.on_closest_peers(id, r, step.last),
            _ => {}
        }
    }

    /// A step of a provider lookup ([`Command::FindProviders`]): answered once it is done.
    pub(super) fn on_providers_found(
        &mut self,
        id: kad::QueryId,
        r: kad::GetProvidersResult,
        last: bool,
        requests: u32,
    ) {
        let (done, failure) = match r {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                if let Some((_, found, _)) = self.pending_providers.get_mut(&id) {
                    found.extend(providers);
                }
                (last, None)
            }
            Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => (true, None),
            Err(e) => {
                tracing::debug!(error = %e, "provider lookup ended");
                (true, Some(e))
            }
        };
        if done && let Some((schema, found, reply)) = self.pending_providers.remove(&id) {
            let mut v: Vec<PeerId> = found.into_iter().collect();
            v.sort();
            tracing::debug!(%schema, providers = v.len(), "provider lookup finished");
            // A lookup that failed before finding anyone is an error, not "none".
            let answer = match failure {
                Some(e) if v.is_empty() => Err(MeshError::DeadlineExceeded(format!(
                    "the provider lookup for '{schema}' failed: {e}"
                ))),
                _ => Ok((v, requests)),
            };
            let _ = reply.send(answer);
        }
    }

    /// A step of a closest-peers lookup: the peers found go to the peer book; a finished lookup
    /// for a peer with requests held moves its connecting on (crate::connect).
    pub(super) fn on_closest_peers(
        &mut self,
        id: kad::QueryId,
        r: kad::GetClosestPeersResult,
        last: bool,
    ) {
        let peers = match r {
            Ok(ok) => ok.peers,
            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
        };
        for p in peers {
            if p.peer_id == self.local() {
                continue;
            }
            let e = self.entry(p.peer_id, "dht");
            for a in p.addrs {
                e.add_addr(a);
            }
        }
        if last && let Some(target) = self.connecting.lookup_finished(&id) {
            let connected = self.swarm.is_connected(&target);
            let known = self.known_addrs(&target);
            let relays = self.relays.circuit_routes();
            let next = self
                .connecting
                .after_lookup(target, connected, known, relays);
            self.connect_step(target, next);
        }
    }
}

fn schema_key(name: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("fold-schema:{name}"))
}

/// A provider lookup in flight: the schema, the providers found so far, and who asked.
pub(super) type ProviderQuery = (
    String,
    HashSet<PeerId>,
    oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
);
