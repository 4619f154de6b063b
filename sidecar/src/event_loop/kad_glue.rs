//! The swarm task's DHT glue: the schemas this node provides (announced again when the routing
//! table changes) and its provider lookups, kept by [`Providing`], and closest-peer lookups that
//! feed the peer book and move held requests on ([`crate::connect`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;

use libp2p::{PeerId, kad};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::command::MeshError;

impl EventLoop {
    /// [`Command::Provide`]: announce exactly these schemas in the DHT.
    pub(super) fn provide(&mut self, schemas: Vec<String>, reply: oneshot::Sender<Vec<String>>) {
        for gone in self.providing.set(schemas.into_iter().collect()) {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&schema_key(&gone));
        }
        self.reprovide();
        let _ = reply.send(self.providing.provided());
    }

    /// [`Command::FindProviders`]: a DHT provider lookup, answered in
    /// [`EventLoop::on_providers_found`].
    pub(super) fn find_providers(
        &mut self,
        schema: String,
        reply: oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
    ) {
        let found = self.providing.known_here(&schema, self.local());
        // With no other node to ask, "none found" would be a guess: say so instead.
        let known: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        if known == 0 {
            let _ = reply.send(alone(&schema, found));
            return;
        }
        let q = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(schema_key(&schema));
        self.providing.looking_up(q, (schema, found, reply));
    }

    pub(super) fn reprovide(&mut self) {
        for name in self.providing.provided() {
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
                self.providing.routing_updated();
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
                self.providing.found(&id, providers);
                (last, None)
            }
            Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => (true, None),
            Err(e) => {
                tracing::debug!(error = %e, "provider lookup ended");
                (true, Some(e.to_string()))
            }
        };
        if done && let Some((reply, answer)) = self.providing.finish(&id, failure, requests) {
            let _ = reply.send(answer);
        }
    }

    /// A step of a closest-peers lookup: the peers found go to the peer book; a finished lookup
    /// for a peer with requests held moves its connecting on (crate::connector).
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
        if last {
            let b = self.swarm.behaviour_mut();
            let book = b.book.book();
            b.connect.lookup_finished(&id, |p| {
                book.get(p).map(|e| e.addrs.clone()).unwrap_or_default()
            });
        }
    }
}

fn schema_key(name: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("fold-schema:{name}"))
}

/// The answer to a provider lookup: the providers and the DHT requests it took.
type Answer = Result<(Vec<PeerId>, u32), MeshError>;

/// A provider lookup in flight: the schema, the providers found so far, and who asked.
type ProviderQuery = (String, HashSet<PeerId>, oneshot::Sender<Answer>);

/// The schemas this node provides and its provider lookups in flight, keyed by query id (no
/// I/O: the handlers above carry out on the DHT what it answers).
pub(super) struct Providing<Q = kad::QueryId> {
    provided: BTreeSet<String>,
    lookups: HashMap<Q, ProviderQuery>,
    /// The routing table changed since the schemas were last announced.
    reprovide_due: bool,
}

impl<Q> Default for Providing<Q> {
    fn default() -> Self {
        Providing {
            provided: BTreeSet::new(),
            lookups: HashMap::new(),
            reprovide_due: false,
        }
    }
}

impl<Q: Hash + Eq> Providing<Q> {
    /// Provide exactly `want`; returns the schemas provided before and no longer.
    fn set(&mut self, want: BTreeSet<String>) -> Vec<String> {
        let gone = self.provided.difference(&want).cloned().collect();
        self.provided = want;
        gone
    }

    /// The schemas provided, in order.
    pub(super) fn provided(&self) -> Vec<String> {
        self.provided.iter().cloned().collect()
    }

    /// The providers of `schema` this node knows without asking: itself, if it provides it.
    fn known_here(&self, schema: &str, local: PeerId) -> HashSet<PeerId> {
        let mut found = HashSet::new();
        if self.provided.contains(schema) {
            found.insert(local);
        }
        found
    }

    /// The routing table changed: the schemas are announced again on the next tick.
    fn routing_updated(&mut self) {
        if !self.provided.is_empty() {
            self.reprovide_due = true;
        }
    }

    /// Whether the schemas are to be announced again (once per change of the routing table).
    pub(super) fn take_reprovide_due(&mut self) -> bool {
        std::mem::take(&mut self.reprovide_due)
    }

    fn looking_up(&mut self, q: Q, lookup: ProviderQuery) {
        self.lookups.insert(q, lookup);
    }

    /// Providers found by a step of lookup `q`.
    fn found(&mut self, q: &Q, providers: impl IntoIterator<Item = PeerId>) {
        if let Some((_, found, _)) = self.lookups.get_mut(q) {
            found.extend(providers);
        }
    }

    /// Lookup `q` is over (`failure` says why, if it failed): who asked, and the answer.
    fn finish(
        &mut self,
        q: &Q,
        failure: Option<String>,
        requests: u32,
    ) -> Option<(oneshot::Sender<Answer>, Answer)> {
        let (schema, found, reply) = self.lookups.remove(q)?;
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
        Some((reply, answer))
    }
}

/// The answer when this node knows no other node to ask: "none found" would be a guess.
fn alone(schema: &str, found: HashSet<PeerId>) -> Answer {
    if found.is_empty() {
        Err(MeshError::Unavailable(format!(
            "cannot look up providers of '{schema}': this node knows no other node to ask (dial one or add a bootstrap peer)"
        )))
    } else {
        Ok((found.into_iter().collect(), 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(p: &mut Providing<u32>, q: u32, schema: &str) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let found = p.known_here(schema, PeerId::random());
        p.looking_up(q, (schema.to_string(), found, tx));
        rx
    }

    #[test]
    fn set_returns_the_schemas_no_longer_provided() {
        let mut p = Providing::<u32>::default();
        assert!(p.set(["a".into(), "b".into()].into()).is_empty());
        assert_eq!(
            p.set(["b".into(), "c".into()].into()),
            vec!["a".to_string()]
        );
        assert_eq!(p.provided(), vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn reprovide_is_due_once_per_routing_change_and_only_when_providing() {
        let mut p = Providing::<u32>::default();
        p.routing_updated();
        assert!(!p.take_reprovide_due());
        p.set(["a".into()].into());
        p.routing_updated();
        p.routing_updated();
        assert!(p.take_reprovide_due());
        assert!(!p.take_reprovide_due());
    }

    #[test]
    fn this_node_is_a_provider_of_what_it_provides() {
        let mut p = Providing::<u32>::default();
        p.set(["a".into()].into());
        let me = PeerId::random();
        assert_eq!(p.known_here("a", me), [me].into());
        assert!(p.known_here("b", me).is_empty());
    }

    #[test]
    fn a_finished_lookup_answers_sorted_providers_once() {
        let mut p = Providing::<u32>::default();
        let _rx = lookup(&mut p, 1, "a");
        let (x, y) = (PeerId::random(), PeerId::random());
        p.found(&1, [x]);
        p.found(&1, [y, x]);
        p.found(&2, [PeerId::random()]);
        let (_, answer) = p.finish(&1, None, 3).expect("lookup 1 is in flight");
        let mut want = vec![x, y];
        want.sort();
        assert_eq!(answer.expect("found some"), (want, 3));
        assert!(p.finish(&1, None, 3).is_none());
    }

    #[test]
    fn a_failed_lookup_is_an_error_only_when_it_found_nobody() {
        let mut p = Providing::<u32>::default();
        let _a = lookup(&mut p, 1, "a");
        let _b = lookup(&mut p, 2, "b");
        let x = PeerId::random();
        p.found(&2, [x]);
        let (_, a) = p.finish(&1, Some("timeout".into()), 5).expect("in flight");
        assert!(
            matches!(a, Err(MeshError::DeadlineExceeded(m)) if m.contains("'a'") && m.contains("timeout"))
        );
        let (_, b) = p.finish(&2, Some("timeout".into()), 5).expect("in flight");
        assert_eq!(b.expect("found one"), (vec![x], 5));
    }

    #[test]
    fn alone_answers_itself_or_says_it_cannot_look_up() {
        let me = PeerId::random();
        assert_eq!(alone("a", [me].into()).expect("itself"), (vec![me], 0));
        assert!(matches!(
            alone("a", HashSet::new()),
            Err(MeshError::Unavailable(_))
        ));
    }
}
