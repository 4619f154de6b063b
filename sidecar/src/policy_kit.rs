//! What the sidecar's policy behaviours ([`crate::book_keeper`], [`crate::connector`],
//! [`crate::reach_keeper`]) share: the queue of `ToSwarm` actions they hand the swarm ([`Actions`],
//! which wakes it), their own timer ([`Every`]), and the methods of a behaviour with no protocol
//! of its own ([`no_protocol!`], libp2p's `dummy::ConnectionHandler`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libp2p::swarm::ToSwarm;

/// The actions a behaviour queued for the swarm, handed out by its `poll`.
pub struct Actions<E> {
    queue: VecDeque<ToSwarm<E, Infallible>>,
    waker: Option<Waker>,
}

impl<E> Default for Actions<E> {
    fn default() -> Self {
        Actions {
            queue: VecDeque::new(),
            waker: None,
        }
    }
}

impl<E> Actions<E> {
    /// Queue `action` and wake the swarm to take it.
    pub fn push(&mut self, action: ToSwarm<E, Infallible>) {
        self.queue.push_back(action);
        self.wake();
    }

    /// Wake the swarm (the behaviour has something new to hand out).
    pub fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The next queued action.
    pub fn pop(&mut self) -> Option<ToSwarm<E, Infallible>> {
        self.queue.pop_front()
    }

    /// Nothing to hand out: `poll`'s answer, remembering whom to wake.
    pub fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A behaviour's own periodic timer, made on the first poll (it needs the runtime); a tick that
/// was missed is not made up in a burst.
pub struct Every {
    period: Duration,
    timer: Option<tokio::time::Interval>,
}

impl Every {
    pub fn new(period: Duration) -> Every {
        Every {
            period,
            timer: None,
        }
    }

    /// Whether the timer ticked; once it answers false it wakes `cx` at the next tick. The first
    /// call ticks at once.
    pub fn ticked(&mut self, cx: &mut Context<'_>) -> bool {
        let period = self.period;
        let timer = self.timer.get_or_insert_with(|| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        timer.poll_tick(cx).is_ready()
    }
}

/// The `NetworkBehaviour` items of a behaviour that speaks no protocol: its connection handler is
/// libp2p's `dummy::ConnectionHandler`, which accepts every connection and emits nothing.
macro_rules! no_protocol {
    () => {
        type ConnectionHandler = libp2p::swarm::dummy::ConnectionHandler;

        fn handle_established_inbound_connection(
            &mut self,
            _: libp2p::swarm::ConnectionId,
            _: libp2p::PeerId,
            _: &libp2p::Multiaddr,
            _: &libp2p::Multiaddr,
        ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
            Ok(libp2p::swarm::dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: libp2p::swarm::ConnectionId,
            _: libp2p::PeerId,
            _: &libp2p::Multiaddr,
            _: libp2p::core::Endpoint,
            _: libp2p::core::transport::PortUse,
        ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
            Ok(libp2p::swarm::dummy::ConnectionHandler)
        }

        fn on_connection_handler_event(
            &mut self,
            _: libp2p::PeerId,
            _: libp2p::swarm::ConnectionId,
            event: libp2p::swarm::THandlerOutEvent<Self>,
        ) {
            libp2p::core::util::unreachable(event)
        }
    };
}

pub(crate) use no_protocol;

/// The peers with open connections, as a behaviour sees them come and go (bounded by the
/// swarm's connection limits).
#[derive(Default)]
pub struct Connected(std::collections::HashMap<libp2p::PeerId, usize>);

impl Connected {
    /// A connection to `peer` came up.
    pub fn established(&mut self, peer: libp2p::PeerId) {
        *self.0.entry(peer).or_default() += 1;
    }

    /// A connection to `peer` closed, `remaining` left open.
    pub fn closed(&mut self, peer: libp2p::PeerId, remaining: usize) {
        if remaining == 0 {
            self.0.remove(&peer);
        } else {
            self.0.insert(peer, remaining);
        }
    }

    pub fn contains(&self, peer: &libp2p::PeerId) -> bool {
        self.0.contains_key(peer)
    }
}
