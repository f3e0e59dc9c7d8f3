//! Tail: replay, then live events, for any number of subscribers per
//! instance with one database listener.
//!
//! - The [`Hub`] task LISTENs on the schema's channel. Each WAL flush of the
//!   appenders NOTIFYs the last sequence it made durable; the hub reads the
//!   new events once, from the primary, into a ring of the most recent `tail_buffer` events and
//!   publishes the new head on a watch channel. A poll of the chain head
//!   every second (and after every reconnect; flushed before it counts)
//!   covers lost notifications. Only durable events are ever sent.
//!   With no subscribers it only follows the head.
//! - A subscriber keeps a cursor (the last sequence it examined). Behind the
//!   ring it pages from the database (a replica that has the range, else the
//!   primary); inside the ring it copies from memory; at the head it waits
//!   for the watch. Sequences are gapless, so the cursor alone guarantees no
//!   gap and no duplicate across the replay → live switch and across resumes.
//! - Each subscriber has a bounded queue to its gRPC stream. One that falls
//!   out of the ring after it was live *because its queue was full* is too
//!   slow: its stream ends with RESOURCE_EXHAUSTED and the sequence to resume
//!   after. Memory per subscriber is bounded by its queue.
//! - Draining ends every stream with UNAVAILABLE (and the resume sequence).
//! - At most `tail_max_subscribers` streams per instance: a Tail beyond it
//!   is refused at once with RESOURCE_EXHAUSTED ([`Hub::admit`]); a stream's
//!   place is freed when its subscriber task ends.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use mesh_db::Db;
use mesh_proto::audit as pb;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    chain::Event,
    domain::{Filter, event_to_proto},
    error::Error,
    store,
};

/// Events read from the database per page (replay and hub catch-up).
const PAGE: usize = 500;
/// How often the hub re-reads the head in case a notification was lost.
const POLL: Duration = Duration::from_secs(1);

/// The server-streaming response of Tail.
pub(crate) type TailStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    /// Sequence of `events[0]`; when empty, the head + 1.
    first: u64,
}

impl Ring {
    fn head(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }
}

#[derive(Debug)]
struct HubInner {
    ring: Mutex<Ring>,
    head: watch::Sender<u64>,
    capacity: usize,
}

enum Read {
    /// Events after the cursor.
    Events(Vec<Arc<Event>>),
    /// Nothing after the cursor yet.
    AtHead,
    /// The cursor is older than the ring: read `(cursor, upto]` from the database.
    Behind { upto: u64 },
}

impl HubInner {
    fn read_after(&self, cursor: u64, max: usize) -> Read {
        let ring = self.ring.lock().expect("ring lock");
        if cursor >= ring.head() {
            return Read::AtHead;
        }
        if cursor + 1 < ring.first {
            return Read::Behind { upto: ring.first - 1 };
        }
        let start = (cursor + 1 - ring.first) as usize;
        Read::Events(ring.events.iter().skip(start).take(max).cloned().collect())
    }

    fn publish(&self, events: Vec<Event>) {
        let Some(last) = events.last().map(|e| e.sequence) else { return };
        {
            let mut ring = self.ring.lock().expect("ring lock");
            for e in events {
                debug_assert_eq!(e.sequence, ring.head() + 1);
                ring.events.push_back(Arc::new(e));
            }
            while ring.events.len() > self.capacity {
                ring.events.pop_front();
                ring.first += 1;
            }
        }
        self.head.send_replace(last);
    }

    /// Moves the head without keeping events (nobody is listening).
    fn skip_to(&self, head: u64) {
        {
            let mut ring = self.ring.lock().expect("ring lock");
            ring.events.clear();
            ring.first = head + 1;
        }
        self.head.send_replace(head);
    }

    /// Whether events after `cursor` have already left the ring.
    fn behind(&self, cursor: u64) -> bool {
        cursor + 1 < self.ring.lock().expect("ring lock").first
    }

    fn published(&self) -> u64 {
        self.ring.lock().expect("ring lock").head()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    subscribers: Gauge,
    ended: Family<EndLabels, Counter>,
}

/// The per-instance fan-out point of live events.
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    inner: Arc<HubInner>,
    metrics: Metrics,
    /// One permit per open stream.
    slots: Arc<Semaphore>,
    max_subscribers: usize,
}

/// A place among the open Tail streams, held by its subscriber.
#[derive(Debug)]
pub(crate) struct Admission {
    _slot: OwnedSemaphorePermit,
}

impl Hub {
    /// Starts the listener on `pool` (the primary) for `channel`, beginning
    /// at head `start`; it stops on `stop` or when the hub is dropped.
    pub(crate) fn start(
        pool: PgPool,
        channel: String,
        capacity: usize,
        max_subscribers: usize,
        start: u64,
        stop: CancellationToken,
        registry: &mut Registry,
    ) -> Self {
        let (head, _) = watch::channel(start);
        let inner = Arc::new(HubInner {
            ring: Mutex::new(Ring { events: VecDeque::new(), first: start + 1 }),
            head,
            capacity,
        });
        let metrics = Metrics::default();
        for reason in ["slow", "draining", "error"] {
            let _ = metrics.ended.get_or_create(&EndLabels { reason });
        }
        registry.register("mesh_audit_tail_subscribers", "Open Tail streams", metrics.subscribers.clone());
        registry.register(
            "mesh_audit_tail_ended",
            "Tail streams ended by the server, by reason (slow, draining, error)",
            metrics.ended.clone(),
        );
        tokio::spawn(listen(Arc::downgrade(&inner), pool, channel, stop));
        Self { inner, metrics, slots: Arc::new(Semaphore::new(max_subscribers)), max_subscribers }
    }

    /// A place for one more stream, or [`Error::TooManySubscribers`] at once.
    pub(crate) fn admit(&self) -> Result<Admission, Error> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(|slot| Admission { _slot: slot })
            .map_err(|_| Error::TooManySubscribers { max: self.max_subscribers })
    }

    /// Starts a subscriber after `cursor` in the place `admission` holds
    /// (until the subscriber ends) and returns its stream.
    pub(crate) fn subscribe(
        &self,
        admission: Admission,
        db: Db,
        filter: Filter,
        cursor: u64,
        queue: usize,
        draining: CancellationToken,
    ) -> TailStream {
        let (tx, rx) = mpsc::channel(queue);
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let sub = Subscriber {
            hub: self.inner.clone(),
            head: self.inner.head.subscribe(),
            db,
            filter,
            cursor,
            tx,
            queue,
            live: false,
            blocked: false,
            draining,
        };
        let metrics = self.metrics.clone();
        metrics.subscribers.inc();
        tokio::spawn(async move {
            let end = sub.run().await;
            drop(admission);
            metrics.subscribers.dec();
            if let Some((reason, status)) = end {
                metrics.ended.get_or_create(&EndLabels { reason }).inc();
                let _ = end_tx.send(status);
            }
        });
        // The queued events first, then the status the subscriber ended with.
        let end = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
        Box::pin(ReceiverStream::new(rx).chain(end))
    }
}

/// The hub's listener task.
async fn listen(hub: Weak<HubInner>, pool: PgPool, channel: String, stop: CancellationToken) {
    let backoff = mesh_tower::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Failed attempts in a row.
    let mut failed = 0;
    'connect: loop {
        let mut listener = match connect(&pool, &channel).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "tail listener cannot connect, retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.delay(failed)) => {}
                }
                failed += 1;
                continue;
            }
        };
        failed = 0;
        // Anything committed while we were not listening.
        let mut target = head_or_zero(&pool, &hub).await;
        let mut poll = tokio::time::interval(POLL);
        loop {
            let Some(inner) = hub.upgrade() else { return };
            if target > inner.published()
                && let Err(e) = catch_up(&inner, &pool, target).await
            {
                tracing::warn!(error = %e, "tail listener cannot read new events, reconnecting");
                tokio::time::sleep(backoff.delay(0)).await;
                continue 'connect;
            }
            drop(inner);
            tokio::select! {
                () = stop.cancelled() => return,
                n = listener.try_recv() => match n {
                    // sent after the WAL flush: everything up to it is durable
                    Ok(Some(n)) => target = target.max(n.payload().parse().unwrap_or(0)),
                    // reconnected: notifications may have been lost, read the head
                    Ok(None) => target = target.max(head_or_zero(&pool, &hub).await),
                    Err(e) => {
                        tracing::warn!(error = %e, "tail listener lost its connection");
                        continue 'connect;
                    }
                },
                _ = poll.tick() => target = target.max(head_or_zero(&pool, &hub).await),
            }
        }
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(channel).await?;
    Ok(l)
}

/// The durable head, or 0 (no news) when it cannot be read.
async fn head_or_zero(pool: &PgPool, hub: &Weak<HubInner>) -> u64 {
    let Some(published) = hub.upgrade().map(|h| h.published()) else { return 0 };
    store::durable_head(pool, published).await.map(|h| h.last()).unwrap_or(0)
}

/// Brings the ring up to `target`, reading only if someone is subscribed.
async fn catch_up(hub: &HubInner, pool: &PgPool, target: u64) -> Result<(), Error> {
    loop {
        let published = hub.published();
        if published >= target {
            return Ok(());
        }
        if hub.head.receiver_count() == 0 {
            hub.skip_to(target);
            return Ok(());
        }
        // More than a ring's worth behind: the older events would be evicted at once.
        let after = published.max(target.saturating_sub(hub.capacity as u64));
        if after > published {
            hub.skip_to(after);
        }
        let events = store::range_page(pool, &Filter::default(), after, target, PAGE).await?;
        if events.first().is_none_or(|e| e.sequence != after + 1) {
            // gapless sequences: a missing event here is not committed yet
            // on this connection's view; try again on the next wake-up
            return Ok(());
        }
        hub.publish(events);
    }
}

struct Subscriber {
    hub: Arc<HubInner>,
    head: watch::Receiver<u64>,
    db: Db,
    filter: Filter,
    /// The last sequence examined (sent, or skipped by the filter).
    cursor: u64,
    tx: mpsc::Sender<Result<pb::AuditEvent, Status>>,
    queue: usize,
    /// Has reached the live head at least once.
    live: bool,
    /// Found its queue full since it was last at the head.
    blocked: bool,
    draining: CancellationToken,
}

/// Why a subscriber stopped: `None` when the client went away.
type End = Option<(&'static str, Status)>;

/// Why delivery stopped.
enum Stop {
    /// The client went away.
    Gone,
    /// The server is draining.
    Draining,
    /// The subscriber fell out of the ring while its queue was full.
    Slow,
}

impl Subscriber {
    async fn run(mut self) -> End {
        loop {
            if self.draining.is_cancelled() {
                return self.drained();
            }
            self.head.borrow_and_update();
            let step = match self.hub.read_after(self.cursor, PAGE) {
                Read::Events(events) => self.deliver_all(events.iter().map(|e| &**e)).await,
                Read::AtHead => {
                    self.live = true;
                    self.blocked = false;
                    tokio::select! {
                        r = self.head.changed() => match r {
                            Ok(()) => Ok(()),
                            Err(_) => return Some(("error", Status::unavailable("the tail listener stopped"))),
                        },
                        () = self.draining.cancelled() => Err(Stop::Draining),
                        () = self.tx.closed() => Err(Stop::Gone),
                    }
                }
                Read::Behind { upto } => {
                    if self.live && self.blocked {
                        return self.too_slow();
                    }
                    match self.replay_page(upto).await {
                        Ok(step) => step,
                        Err(e) => {
                            tracing::warn!(error = %e, "tail replay failed");
                            return Some(("error", Status::from(e)));
                        }
                    }
                }
            };
            match step {
                Ok(()) => {}
                Err(Stop::Gone) => return None,
                Err(Stop::Draining) => return self.drained(),
                Err(Stop::Slow) => return self.too_slow(),
            }
        }
    }

    fn too_slow(&self) -> End {
        let e = Error::SlowSubscriber { resume_after: self.cursor, buffered: self.hub.capacity };
        Some(("slow", e.into()))
    }

    fn drained(&self) -> End {
        Some(("draining", Error::Draining { resume_after: self.cursor }.into()))
    }

    /// One page of `(cursor, upto]` from the database.
    async fn replay_page(&mut self, upto: u64) -> Result<Result<(), Stop>, Error> {
        let pool = store::covering(&self.db, upto).await?;
        let events = store::range_page(&pool, &self.filter, self.cursor, upto, PAGE).await?;
        let full = events.len() == PAGE;
        if let Err(stop) = self.deliver_all(events.iter()).await {
            return Ok(Err(stop));
        }
        if !full {
            // everything up to `upto` that matches has been sent
            self.cursor = self.cursor.max(upto);
        }
        Ok(Ok(()))
    }

    async fn deliver_all(&mut self, events: impl Iterator<Item = &Event>) -> Result<(), Stop> {
        for e in events {
            self.deliver(e).await?;
        }
        Ok(())
    }

    /// Sends `e` if it matches, and moves the cursor past it.
    async fn deliver(&mut self, e: &Event) -> Result<(), Stop> {
        if e.sequence <= self.cursor {
            return Ok(());
        }
        if self.filter.matches(e) {
            match self.tx.try_send(Ok(event_to_proto(e))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.blocked = true;
                    // Wait for room, but notice when live events move past
                    // us meanwhile: a client that stopped reading must not
                    // hold a subscriber (or the ring) forever.
                    loop {
                        tokio::select! {
                            permit = self.tx.reserve() => {
                                permit.map_err(|_| Stop::Gone)?.send(item);
                                break;
                            }
                            () = self.draining.cancelled() => return Err(Stop::Draining),
                            r = self.head.changed() => {
                                if r.is_err() {
                                    return Err(Stop::Gone);
                                }
                                if self.live && self.hub.behind(self.cursor) {
                                    return Err(Stop::Slow);
                                }
                            }
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::Gone),
            }
        }
        self.cursor = e.sequence;
        Ok(())
    }
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber").field("cursor", &self.cursor).field("queue", &self.queue).finish()
    }
}
