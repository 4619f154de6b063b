//! Test support (cargo feature `test-support`): a history of calls on a few registers, checked for
//! linearizability with stateright's `LinearizabilityTester`. One register per key:
//! linearizability is local, so checking each key's history on its own checks the whole.
//!
//! Used by this crate's linearizability test (a group in one process) and by the end-to-end test
//! of a group of real nodes; neither product build enables the feature.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stateright::semantics::register::Register;
pub use stateright::semantics::register::{RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

/// A register's value: absent, or a string.
pub type Value = Option<String>;

/// The name the tests give register `key`.
pub fn key_name(key: usize) -> String {
    format!("reg-{key}")
}

enum Event {
    Invoke {
        op: usize,
        thread: u64,
        key: usize,
        call: RegisterOp<Value>,
    },
    Return {
        op: usize,
        ret: RegisterRet<Value>,
    },
}

/// Calls and completions on `keys` registers in real-time order (the lock orders them).
pub struct History {
    keys: usize,
    initial: Value,
    events: Mutex<Vec<Event>>,
    /// Calls known not to have taken effect (refused before proposing, failed reads).
    dropped: Mutex<BTreeSet<usize>>,
}

impl History {
    /// An empty history of registers `0..keys`, each holding `initial` at the start.
    pub fn new(keys: usize, initial: Value) -> History {
        History {
            keys,
            initial,
            events: Mutex::new(Vec::new()),
            dropped: Mutex::new(BTreeSet::new()),
        }
    }

    /// Records the call `call` on register `key` by client `thread`; returns the call's id.
    pub fn invoke(&self, thread: u64, key: usize, call: RegisterOp<Value>) -> usize {
        let mut events = self.events.lock().expect("history");
        let op = events.len();
        events.push(Event::Invoke {
            op,
            thread,
            key,
            call,
        });
        op
    }

    /// Records the completion of call `op`.
    pub fn complete(&self, op: usize, ret: RegisterRet<Value>) {
        self.events
            .lock()
            .expect("history")
            .push(Event::Return { op, ret });
    }

    /// Leaves call `op` out of the check: it is known not to have taken effect.
    pub fn drop_call(&self, op: usize) {
        self.dropped.lock().expect("history").insert(op);
    }

    /// How many invocations and completions were recorded.
    pub fn events(&self) -> usize {
        self.events.lock().expect("history").len()
    }

    /// How many calls were left out with [`History::drop_call`].
    pub fn dropped(&self) -> usize {
        self.dropped.lock().expect("history").len()
    }

    /// One tester per key, fed the history without the dropped calls; (completed, open) calls.
    pub fn check(&self) -> Result<(usize, usize), String> {
        let events = self.events.lock().expect("history");
        let dropped = self.dropped.lock().expect("history");
        let mut testers: Vec<LinearizabilityTester<u64, Register<Value>>> = (0..self.keys)
            .map(|_| LinearizabilityTester::new(Register(self.initial.clone())))
            .collect();
        let mut key_of = BTreeMap::new();
        let mut thread_of = BTreeMap::new();
        let (mut completed, mut pending) = (0usize, 0usize);
        for e in events.iter() {
            match e {
                Event::Invoke {
                    op,
                    thread,
                    key,
                    call,
                } if !dropped.contains(op) => {
                    let tester = testers
                        .get_mut(*key)
                        .ok_or_else(|| format!("#{op} on key {key} of {}", self.keys))?;
                    key_of.insert(*op, *key);
                    thread_of.insert(*op, *thread);
                    pending += 1;
                    tester.on_invoke(*thread, call.clone())?;
                }
                Event::Return { op, ret } if !dropped.contains(op) => {
                    let (Some(&key), Some(&thread)) = (key_of.get(op), thread_of.get(op)) else {
                        return Err(format!("return of #{op} without its invocation"));
                    };
                    completed += 1;
                    pending -= 1;
                    testers[key].on_return(thread, ret.clone())?;
                }
                _ => {}
            }
        }
        for (key, tester) in testers.iter().enumerate() {
            if tester.serialized_history().is_none() {
                let calls: Vec<String> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Invoke {
                            op,
                            thread,
                            key: k,
                            call,
                        } if *k == key && !dropped.contains(op) => {
                            Some(format!("#{op} t{thread} invoke {call:?}"))
                        }
                        Event::Return { op, ret } if key_of.get(op) == Some(&key) => {
                            Some(format!("#{op} return {ret:?}"))
                        }
                        _ => None,
                    })
                    .collect();
                return Err(format!(
                    "key {} is not linearizable:\n{}",
                    key_name(key),
                    calls.join("\n")
                ));
            }
        }
        Ok((completed, pending))
    }

    /// [`History::check`] on a thread of its own, waited for at most `bound` (open calls make
    /// its search grow fast); `None` when it did not finish in time.
    pub fn check_within(
        self: &Arc<Self>,
        bound: Duration,
    ) -> Option<Result<(usize, usize), String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = self.clone();
        std::thread::spawn(move || {
            let _ = tx.send(h.check());
        });
        rx.recv_timeout(bound).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_of_the_written_value_passes_and_a_stale_read_fails() {
        let h = History::new(2, None);
        let w = h.invoke(1, 0, RegisterOp::Write(Some("a".into())));
        h.complete(w, RegisterRet::WriteOk);
        let r = h.invoke(2, 0, RegisterOp::Read);
        h.complete(r, RegisterRet::ReadOk(Some("a".into())));
        // An open write on key 1 and a refused one: neither breaks the history.
        h.invoke(3, 1, RegisterOp::Write(Some("b".into())));
        let refused = h.invoke(4, 1, RegisterOp::Write(Some("c".into())));
        h.drop_call(refused);
        assert_eq!(h.check(), Ok((2, 1)));
        assert_eq!((h.events(), h.dropped()), (6, 1));

        // Read after the write completed, yet it sees the initial value.
        let stale = h.invoke(5, 0, RegisterOp::Read);
        h.complete(stale, RegisterRet::ReadOk(None));
        let e = Arc::new(h)
            .check_within(Duration::from_secs(10))
            .expect("a small history is checked at once")
            .expect_err("a stale read");
        assert!(e.starts_with("key reg-0 is not linearizable"), "{e}");
    }
}
