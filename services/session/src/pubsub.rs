//! Listening to every bucket's channel (sharded pub/sub): revoked token
//! hashes leave the validation cache and are acknowledged (`a <nonce>`, so
//! the revoking instance knows every cache has dropped them before it
//! answers), acknowledgements are counted for the revocations this instance
//! waits on ([`Acks`]), outbox notifications wake the drainer.
//!
//! One dedicated Redis client holds the subscriptions (a subscribed
//! connection can do nothing else). Each bucket's channel is in the bucket's
//! slot, so the scripts publish in the same atomic step as the change, and
//! `SSUBSCRIBE` goes to the master owning that slot, one channel per command
//! (fred matches one reply per command).
//!
//! Fail safe: the cache is enabled only once every channel is subscribed.
//! Any sign that a subscription may be gone — a connection error or
//! reconnection, a change in the cluster's routing (failover, resharding),
//! an unresponsive node, missed messages — disables and clears it at once,
//! and it stays off until every channel is subscribed again. So does an
//! acknowledgement this instance cannot publish: the revoking instance
//! cannot count it, so this one resynchronises (its cache is off until every
//! channel is subscribed again) rather than trust it. Changes the
//! subscriber's own connections did not see (a slot moved between two
//! healthy masters) are caught by asking the cluster for its routing every
//! [`ROUTING_CHECK`]; the cache's TTL bounds whatever remains.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::{Client, Pool},
    interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface},
    types::ClusterStateChange,
};
use futures::{StreamExt as _, stream};
use tokio::{
    sync::{Notify, broadcast::error::RecvError, mpsc},
    task::JoinHandle,
    time::{Instant, timeout_at},
};

use crate::{
    cache::Cache,
    metrics::Metrics,
    token::{Bucket, TokenHash},
};

/// How often the cluster's routing is compared with the subscriptions'.
pub(crate) const ROUTING_CHECK: Duration = Duration::from_secs(1);
/// `SSUBSCRIBE`s in flight at once while (re)subscribing.
const SUBSCRIBE_CONCURRENCY: usize = 32;

/// Acknowledgements of revocations this instance published, by nonce.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    waiting: Mutex<HashMap<String, Arc<Counted>>>,
}

#[derive(Debug, Default)]
struct Counted {
    count: AtomicU64,
    notify: Notify,
}

/// One revocation's acknowledgements, counted from before it is published;
/// forgotten when dropped.
#[derive(Debug)]
pub(crate) struct Expected {
    acks: Arc<Acks>,
    nonce: String,
    counted: Arc<Counted>,
}

impl Acks {
    /// Starts counting acknowledgements of `nonce`.
    pub(crate) fn expect(self: &Arc<Self>, nonce: &str) -> Expected {
        let counted = Arc::new(Counted::default());
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(nonce.to_owned(), counted.clone());
        Expected { acks: self.clone(), nonce: nonce.to_owned(), counted }
    }

    fn ack(&self, nonce: &str) {
        let counted = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).get(nonce).cloned();
        if let Some(c) = counted {
            c.count.fetch_add(1, Ordering::SeqCst);
            c.notify.notify_waiters();
        }
    }
}

impl Expected {
    /// Waits until `n` acknowledgements arrived, at most `timeout`; whether they did.
    pub(crate) async fn wait(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.counted.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so an ack in between still wakes us.
            notified.as_mut().enable();
            if self.counted.count.load(Ordering::SeqCst) >= n {
                return true;
            }
            if timeout_at(deadline, notified).await.is_err() {
                return self.counted.count.load(Ordering::SeqCst) >= n;
            }
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.acks.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.nonce);
    }
}

/// The subscriber and its two tasks.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pool: Pool,
    /// Publishes acknowledgements (a subscribed connection cannot).
    publisher: Pool,
    acks: Arc<Acks>,
    prefix: String,
    channels: Vec<String>,
    cache: Arc<Cache>,
    outbox: Option<mpsc::Sender<Bucket>>,
    metrics: Arc<Metrics>,
    /// Woken when an acknowledgement could not be published.
    unconfirmed: Arc<Notify>,
}

impl Subscriber {
    /// `pool` is a pool of one client of its own; `channels` every bucket's channel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: Pool,
        publisher: Pool,
        acks: Arc<Acks>,
        prefix: String,
        channels: Vec<String>,
        cache: Arc<Cache>,
        outbox: Option<mpsc::Sender<Bucket>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { pool, publisher, acks, prefix, channels, cache, outbox, metrics, unconfirmed: Arc::default() }
    }

    /// Starts listening and managing the subscriptions.
    pub(crate) fn spawn(self) -> Vec<JoinHandle<()>> {
        let this = Arc::new(self);
        let client = this.pool.next().clone();
        vec![tokio::spawn(this.clone().listen(client.clone())), tokio::spawn(this.manage(client))]
    }

    /// Handles every message, in order.
    async fn listen(self: Arc<Self>, client: Client) {
        let mut rx = client.message_rx();
        loop {
            match rx.recv().await {
                Ok(msg) => {
                    let Some(bucket) = Bucket::from_key(&self.prefix, &msg.channel) else { continue };
                    let Some(text) = msg.value.as_str() else { continue };
                    self.handle(bucket, &msg.channel, &text);
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "invalidation messages were missed, clearing the session cache"
                    );
                    self.cache.reset("missed_messages");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn handle(&self, bucket: Bucket, channel: &str, text: &str) {
        if let Some(rest) = text.strip_prefix("r ") {
            let mut parts = rest.split(' ');
            let nonce = parts.next().unwrap_or_default();
            let hashes: Vec<TokenHash> = parts.filter_map(TokenHash::from_hex).collect();
            self.metrics.cache_invalidations.inc_by(hashes.len() as u64);
            self.cache.invalidate(&hashes);
            tracing::trace!(bucket = %bucket.hint(), tokens = hashes.len(), "revoked tokens invalidated");
            // Only now is this instance's cache clean: say so.
            let (client, channel, ack) =
                (self.publisher.next().clone(), channel.to_owned(), format!("a {nonce}"));
            let (cache, unconfirmed) = (self.cache.clone(), self.unconfirmed.clone());
            tokio::spawn(async move {
                if let Err(e) = client.spublish::<(), _, _>(channel, ack).await {
                    tracing::warn!(error = %e.details(), "cannot acknowledge a revocation, session cache off until resubscribed");
                    cache.set_enabled(false, "unconfirmed");
                    unconfirmed.notify_one();
                }
            });
        } else if let Some(nonce) = text.strip_prefix("a ") {
            self.acks.ack(nonce);
        } else if text == "o"
            && let Some(tx) = &self.outbox
        {
            // Full: the drainer is busy and its sweep finds the bucket anyway.
            let _ = tx.try_send(bucket);
        }
    }

    /// Subscribes, enables the cache, watches for trouble, repeats.
    async fn manage(self: Arc<Self>, client: Client) {
        let mut errors = client.error_rx();
        let mut reconnects = client.reconnect_rx();
        let mut changes = client.cluster_change_rx();
        let mut unresponsive = client.unresponsive_rx();
        let mut routing;
        loop {
            let mut attempt = 0u32;
            loop {
                if attempt > 0 {
                    // 100 ms doubling to 2 s: a failover takes seconds.
                    tokio::time::sleep(
                        Duration::from_millis(100 << attempt.min(5)).min(Duration::from_secs(2)),
                    )
                    .await;
                }
                attempt += 1;
                // Events that happened before this attempt are answered by it.
                drain(&mut errors);
                drain(&mut reconnects);
                drain(&mut changes);
                drain(&mut unresponsive);
                if !client.is_connected() {
                    continue;
                }
                let started = Instant::now();
                match self.subscribe_all(&client).await {
                    Ok(()) => {
                        let troubled = drain(&mut errors)
                            | drain(&mut reconnects)
                            | drain(&mut changes)
                            | drain(&mut unresponsive);
                        if !troubled {
                            routing = routing_of(&client);
                            tracing::info!(
                                channels = self.channels.len(),
                                took = ?started.elapsed(),
                                "subscribed to every bucket channel"
                            );
                            break;
                        }
                    }
                    Err(e) => {
                        if attempt == 1 || attempt.is_multiple_of(10) {
                            tracing::warn!(error = %e, attempt, "cannot subscribe to invalidation channels, session cache off");
                        }
                    }
                }
            }
            self.cache.set_enabled(true, "subscribed");

            let mut tick = tokio::time::interval_at(Instant::now() + ROUTING_CHECK, ROUTING_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let reason = loop {
                tokio::select! {
                    r = errors.recv() => if !matches!(r, Err(RecvError::Closed)) { break "connection_error" } else { return },
                    r = reconnects.recv() => if !matches!(r, Err(RecvError::Closed)) { break "reconnected" } else { return },
                    r = changes.recv() => match r {
                        Err(RecvError::Closed) => return,
                        // fred announces every routing refresh (ours included)
                        // as a "rebalance": only a real change matters.
                        Ok(c) if c.iter().all(|c| matches!(c, ClusterStateChange::Rebalance))
                            && routing_of(&client) == routing => {}
                        _ => break "cluster_changed",
                    },
                    r = unresponsive.recv() => if !matches!(r, Err(RecvError::Closed)) { break "unresponsive" } else { return },
                    () = self.unconfirmed.notified() => break "unconfirmed",
                    _ = tick.tick() => {
                        self.cache.purge(Instant::now());
                        if !client.is_connected() {
                            break "disconnected";
                        }
                        // A routing change on the server side (a slot moved)
                        // unsubscribes its channel without telling fred.
                        if client.sync_cluster().await.is_ok() && routing_of(&client) != routing {
                            break "routing_changed";
                        }
                    }
                }
            };
            self.cache.set_enabled(false, reason);
            tracing::warn!(
                reason,
                "invalidation subscriptions may be lost, session cache off until resubscribed"
            );
        }
    }

    async fn subscribe_all(&self, client: &Client) -> Result<(), fred::error::Error> {
        let mut results = stream::iter(self.channels.iter().cloned())
            .map(|ch| {
                let client = client.clone();
                async move { client.ssubscribe(ch).await }
            })
            .buffer_unordered(SUBSCRIBE_CONCURRENCY);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }
}

/// Which master owns which slots, as the client last learnt it.
fn routing_of(client: &Client) -> Option<Vec<(u16, u16, String)>> {
    let state = client.cached_cluster_state()?;
    let mut slots: Vec<_> = state.slots().iter().map(|r| (r.start, r.end, r.primary.to_string())).collect();
    slots.sort_unstable();
    Some(slots)
}

/// Empties a receiver; true when anything (or a lag) was in it.
fn drain<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<T>) -> bool {
    let mut any = false;
    loop {
        match rx.try_recv() {
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => any = true,
            Err(_) => return any,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn acknowledgements_are_counted_from_before_the_wait() {
        let acks = Arc::new(Acks::default());
        let expected = acks.expect("n1");
        acks.ack("n1");
        acks.ack("other");
        assert!(expected.wait(1, Duration::from_millis(10)).await);
        assert!(!expected.wait(2, Duration::from_millis(10)).await, "times out short of the count");
        let waiter = tokio::spawn({
            let acks = acks.clone();
            async move { acks.expect("n2").wait(2, Duration::from_secs(1)).await }
        });
        tokio::task::yield_now().await;
        acks.ack("n2");
        acks.ack("n2");
        assert!(waiter.await.unwrap());
        drop(expected);
        assert!(acks.waiting.lock().unwrap().is_empty(), "forgotten when dropped");
    }
}
