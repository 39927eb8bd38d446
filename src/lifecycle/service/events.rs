//! Container events from the runtime (CRI `GetContainerEvents`, answered by
//! containerd 1.7 and later; 1.6 answers UNIMPLEMENTED).
//!
//! The shim holds one subscription, for its clients (below) and, on a
//! runtime without containerd's own task exit events
//! ([`super::task_exits`], which come first and faster wherever they
//! are), for exits. While it brings exits, nothing is polled; the exits the
//! lifecycle waits for are otherwise polled every 100 ms
//! ([`super::watch_loop`]). The runtime sends its first response headers
//! only with its first event, so a subscription that has not failed within
//! [`SETTLE`] is taken as established; then every watched container is read
//! at once and polled for [`CATCH_UP`] more, so that an exit between the
//! last poll and the subscription's registration in the runtime is not
//! missed. When the stream breaks, polling takes over again at once and the
//! subscription is made again with backoff (and caught up with again when
//! it is back). Its ContainerStopped events are acted on also while
//! containerd's task exits bring exits: each stream may come up before the
//! other, and an exit is recorded once.
//!
//! Clients that subscribe through the shim (kubelet with the `EventedPLEG`
//! gate) get the same events from that one subscription, with the container
//! statuses rewritten as everywhere else (a deferred app reads RUNNING, a
//! sidecar the shim stopped exit 0 `Completed`): relayed as they were, they
//! would show a deferred app CREATED and kubelet would create it again.
//! It also has to be one subscription: containerd 1.7 hands each event to
//! one of its subscribers only. For the same reason, on 1.7 the exits that
//! matter are still read every second while these events bring them: a
//! client subscribed to containerd directly takes some events away from the
//! shim. On a runtime without events, clients get the runtime's own
//! UNIMPLEMENTED; when the shim's subscription breaks, theirs end
//! UNAVAILABLE (as a direct one would when the runtime goes) and they
//! subscribe again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_cri::v1 as cri;
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::{lock, unreachable, Event, Inner};
use crate::proxy::MessageStream;

/// How long a subscription must stand without an error to count as
/// established.
const SETTLE: Duration = Duration::from_millis(500);
/// Backoff of a subscription that failed, doubled up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often exits are read while events flow from a runtime that may give
/// an event to another subscriber instead (containerd 1.7 hands each event
/// to one of its subscribers: a client subscribed to containerd directly
/// takes some away from the shim).
const SPLIT_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long exits are still polled after a subscription came up. It is
/// taken as established after [`SETTLE`] without an error, but containerd
/// may register it later than that on a loaded node (seen: no task exit
/// event came for exits 400 ms after the request), and an exit before that
/// comes on no stream. The CRI shows such an exit only once containerd has
/// deleted the task (100-200 ms later), so a single read as the
/// subscription comes up can still find the container running.
pub(super) const CATCH_UP: Duration = Duration::from_secs(3);
/// Events kept for a client that reads slowly; one that falls further
/// behind has its stream ended (it subscribes again).
const CLIENT_BACKLOG: usize = 1024;
/// How long a client's subscription waits for the shim's to be there.
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// Whether the runtime streams events, once known.
#[derive(Clone, Debug)]
enum Support {
    Unknown,
    Streams,
    /// The runtime's own answer (UNIMPLEMENTED), for the clients that ask.
    Unsupported(tonic::Status),
}

pub(super) struct Events {
    /// Exits may come from the subscriptions (config `exit_events`; when
    /// false they are polled even while events flow, for the clients'
    /// subscriptions only).
    for_exits: bool,
    /// containerd's own task exit subscription runs ([`super::task_exits`]):
    /// exits come from it, whatever this one does.
    pub(super) task_exits: AtomicBool,
    /// The subscription runs.
    live: AtomicBool,
    /// The runtime may hand an event to another of its subscribers instead
    /// of the shim (containerd 1.7): exits are still polled, slowly.
    split: AtomicBool,
    support: watch::Sender<Support>,
    /// Events for the clients' subscriptions, while the shim's runs.
    feed: Mutex<Option<broadcast::Sender<Arc<cri::ContainerEventResponse>>>>,
    /// Tells waiting clients that a feed is there.
    feed_changed: watch::Sender<u64>,
    /// When a subscription that brings exits last came up (see
    /// [`CATCH_UP`]).
    came_up: Mutex<Option<Instant>>,
}

impl Events {
    pub(super) fn new(for_exits: bool) -> Self {
        Events {
            for_exits,
            task_exits: AtomicBool::new(false),
            live: AtomicBool::new(false),
            split: AtomicBool::new(false),
            support: watch::channel(Support::Unknown).0,
            feed: Mutex::new(None),
            feed_changed: watch::channel(0).0,
            came_up: Mutex::new(None),
        }
    }

    /// A subscription that brings exits came up: exits are still polled
    /// for [`CATCH_UP`].
    pub(super) fn came_up(&self) {
        *lock(&self.came_up) = Some(Instant::now());
    }

    pub(super) fn for_exits(&self) -> bool {
        self.for_exits
    }

    /// Exits come from containerd's task exit events.
    pub(super) fn task_exits(&self) -> bool {
        self.for_exits && self.task_exits.load(Ordering::Acquire)
    }

    /// Exits come from this subscription (the runtime has no task exit
    /// events, or they are down).
    fn live(&self) -> bool {
        self.for_exits && !self.task_exits() && self.live.load(Ordering::Acquire)
    }

    /// How often a container whose exit matters is read: never while the
    /// events bring every exit, slowly while they may miss some (a runtime
    /// that splits its events between subscribers), every
    /// [`super::WATCH_INTERVAL`] otherwise, and also for [`CATCH_UP`] after
    /// a subscription came up.
    pub(super) fn watch_interval(&self) -> Option<Duration> {
        self.watch_interval_at(Instant::now())
    }

    fn watch_interval_at(&self, now: Instant) -> Option<Duration> {
        let catching_up = lock(&self.came_up).is_some_and(|t| now < t + CATCH_UP);
        if self.for_exits && catching_up {
            return Some(super::WATCH_INTERVAL);
        }
        if self.task_exits() {
            return None;
        }
        match (self.live(), self.split.load(Ordering::Acquire)) {
            (false, _) => Some(super::WATCH_INTERVAL),
            (true, true) => Some(SPLIT_WATCH_INTERVAL),
            (true, false) => None,
        }
    }
}

/// One of the shim's long-lived subscriptions to the runtime, held by
/// [`hold`]: the CRI's container events ([`CriEvents`]) and containerd's
/// task exits ([`super::task_exits::TaskExits`]).
pub(super) trait Subscription {
    type Item: Send;
    /// What the logs call it.
    const WHAT: &'static str;
    /// What exits come from while it is down (for the logs).
    const MEANWHILE: &'static str;
    fn subscribe(
        me: &Arc<Inner>,
    ) -> impl Future<Output = Result<tonic::Response<tonic::Streaming<Self::Item>>, tonic::Status>> + Send;
    /// It stands (called once per establishment; may be called again).
    fn up(me: &Arc<Inner>) -> impl Future<Output = ()> + Send;
    /// It is gone (`why`: the error, if any).
    fn down(me: &Arc<Inner>, why: Option<&tonic::Status>);
    /// The runtime answered UNIMPLEMENTED: it is given up for good.
    fn unsupported(me: &Arc<Inner>, status: tonic::Status);
    fn handle(me: &Arc<Inner>, item: Self::Item) -> impl Future<Output = ()> + Send;
}

/// Hold a subscription for as long as the shim runs (or until the runtime
/// says it has no such thing). The runtime sends its first response
/// headers only with its first event, so a subscription that has not
/// failed within [`SETTLE`] is taken as established. A broken one is made
/// again with backoff.
pub(super) async fn hold<S: Subscription>(me: Arc<Inner>) {
    let mut backoff = RETRY_MIN;
    let mut failures = 0u32;
    loop {
        let call = S::subscribe(&me);
        tokio::pin!(call);
        let answer = tokio::select! {
            r = &mut call => r,
            _ = tokio::time::sleep(SETTLE) => {
                // No error by now: the runtime took the subscription and
                // waits for an event to send (with its first headers).
                S::up(&me).await;
                (&mut call).await
            }
        };
        let mut stream = match answer {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                info!(
                    detail = s.message(),
                    "the runtime does not answer {} (UNIMPLEMENTED): {}",
                    S::WHAT,
                    S::MEANWHILE
                );
                S::unsupported(&me, s);
                S::down(&me, None);
                return;
            }
            Err(s) => {
                S::down(&me, Some(&s));
                failures += 1;
                if failures == 1 || !unreachable(&s) {
                    warn!(error = %s, "cannot subscribe to {}; {} until it is back, trying again", S::WHAT, S::MEANWHILE);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        S::up(&me).await;
        backoff = RETRY_MIN;
        failures = 0;
        let ended = loop {
            match stream.message().await {
                Ok(Some(item)) => S::handle(&me, item).await,
                Ok(None) => break None,
                Err(s) => break Some(s),
            }
        };
        S::down(&me, ended.as_ref());
        warn!(
            error = ended.as_ref().map(|s| s.to_string()),
            "{} ended; {} until it is back",
            S::WHAT,
            S::MEANWHILE
        );
        tokio::time::sleep(backoff).await;
    }
}

/// The CRI's `GetContainerEvents`.
pub(super) struct CriEvents;

impl Subscription for CriEvents {
    type Item = cri::ContainerEventResponse;
    const WHAT: &'static str = "the runtime's container events (GetContainerEvents)";
    const MEANWHILE: &'static str =
        "exits come from containerd's task exit events if they stand, are polled otherwise";

    fn subscribe(
        me: &Arc<Inner>,
    ) -> impl Future<Output = Result<tonic::Response<tonic::Streaming<Self::Item>>, tonic::Status>> + Send
    {
        let mut rt = me.runtime.clone();
        async move { rt.get_container_events(cri::GetEventsRequest {}).await }
    }

    fn up(me: &Arc<Inner>) -> impl Future<Output = ()> + Send {
        up(me)
    }

    fn down(me: &Arc<Inner>, why: Option<&tonic::Status>) {
        down(me, why)
    }

    fn unsupported(me: &Arc<Inner>, status: tonic::Status) {
        me.events.support.send_replace(Support::Unsupported(status));
    }

    fn handle(me: &Arc<Inner>, item: Self::Item) -> impl Future<Output = ()> + Send {
        handle(me, item)
    }
}

/// The subscription stands: exits come from it from now on. Every watched
/// container is read once, for an exit the polling had not seen yet.
async fn up(me: &Arc<Inner>) {
    if me.events.live.swap(true, Ordering::AcqRel) {
        return;
    }
    me.events.support.send_replace(Support::Streams);
    let (tx, _) = broadcast::channel(CLIENT_BACKLOG);
    *lock(&me.events.feed) = Some(tx);
    me.events.feed_changed.send_modify(|n| *n += 1);
    if !me.events.for_exits {
        info!(
            "subscribed to the runtime's container events (exit_events = false: exits are polled)"
        );
        return;
    }
    let version = me
        .runtime
        .clone()
        .version(cri::VersionRequest::default())
        .await;
    let split = version.as_ref().is_ok_and(|v| splits_events(v.get_ref()));
    me.events.split.store(split, Ordering::Release);
    if me.events.task_exits() {
        info!("subscribed to the runtime's container events (exits come from containerd's task exit events)");
    } else if split {
        info!(
            "subscribed to the runtime's container events; containerd 1.7 gives each event to \
             one subscriber only, so exits are also read every {SPLIT_WATCH_INTERVAL:?} in case \
             another client took one"
        );
    } else {
        info!("subscribed to the runtime's container events: exits are polled only for {CATCH_UP:?} more");
    }
    me.events.came_up();
    me.wake.notify_one();
    let watched = lock(&me.machine).watched();
    for container in watched {
        me.observe_exit(&container).await;
    }
}

/// Whether the runtime hands each container event to one of its
/// subscribers only: containerd 1.7 (2.x sends every event to every
/// subscriber).
fn splits_events(v: &cri::VersionResponse) -> bool {
    v.runtime_name == "containerd"
        && v.runtime_version
            .trim_start_matches('v')
            .starts_with("1.7.")
}

/// The subscription is gone (`why`: the error, if any): polling takes over,
/// and the clients' subscriptions end.
fn down(me: &Arc<Inner>, why: Option<&tonic::Status>) {
    let was = me.events.live.swap(false, Ordering::AcqRel);
    lock(&me.events.feed).take();
    if was {
        debug!(
            error = why.map(|s| s.to_string()),
            "container event subscription down"
        );
    }
    me.wake.notify_one();
}

/// One event from the runtime.
async fn handle(me: &Arc<Inner>, event: cri::ContainerEventResponse) {
    let stopped =
        event.container_event_type == cri::ContainerEventType::ContainerStoppedEvent as i32;
    let id = event.container_id.clone();
    let code = event
        .containers_statuses
        .iter()
        .find(|s| s.id == id)
        .filter(|s| s.state == cri::ContainerState::ContainerExited as i32)
        .map(|s| s.exit_code);
    if let Some(feed) = lock(&me.events.feed).as_ref() {
        // No receiver: no client subscribed; nothing to do.
        let _ = feed.send(Arc::new(event));
    }
    // Also while containerd's task exits bring exits: this subscription
    // may have been registered before that one (an exit is recorded once).
    if stopped && me.events.for_exits() && lock(&me.machine).is_watched(&id) {
        match code {
            Some(code) => me.feed(Event::Exited {
                container: id,
                code,
            }),
            // The event did not carry the container's status: ask.
            None => me.observe_exit(&id).await,
        }
    }
}

/// A client's GetContainerEvents: the shim's events, statuses rewritten.
pub(super) async fn subscribe(me: Arc<Inner>) -> Result<MessageStream, tonic::Status> {
    let mut support = me.events.support.subscribe();
    let known = tokio::time::timeout(CLIENT_WAIT, async {
        support
            .wait_for(|s| !matches!(s, Support::Unknown))
            .await
            .map(|s| s.clone())
    })
    .await;
    let Ok(Ok(known)) = known else {
        return Err(tonic::Status::unavailable(
            "sidecar-shim: the container runtime's event stream is not there yet",
        ));
    };
    if let Support::Unsupported(status) = known {
        return Err(status);
    }
    let mut changed = me.events.feed_changed.subscribe();
    let mut events = tokio::time::timeout(CLIENT_WAIT, async {
        loop {
            if let Some(feed) = lock(&me.events.feed).as_ref() {
                return Some(feed.subscribe());
            }
            if changed.changed().await.is_err() {
                return None;
            }
        }
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| {
        tonic::Status::unavailable("sidecar-shim: the container runtime's event stream is down")
    })?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let item = match events.recv().await {
                Ok(event) => {
                    let mut event = (*event).clone();
                    for status in &mut event.containers_statuses {
                        me.patch_status(status);
                    }
                    Ok(Bytes::from(event.encode_to_vec()))
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Err(tonic::Status::resource_exhausted(format!(
                        "sidecar-shim: the subscriber fell {n} container events behind"
                    )))
                }
                Err(broadcast::error::RecvError::Closed) => Err(tonic::Status::unavailable(
                    "sidecar-shim: the container runtime's event stream ended",
                )),
            };
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(name: &str, version: &str) -> cri::VersionResponse {
        cri::VersionResponse {
            runtime_name: name.to_owned(),
            runtime_version: version.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn exits_are_polled_for_a_while_after_a_subscription_came_up() {
        let events = Events::new(true);
        events.task_exits.store(true, Ordering::Release);
        let now = Instant::now();
        assert_eq!(events.watch_interval_at(now), None, "never came up");
        events.came_up();
        let up = lock(&events.came_up).expect("set");
        assert_eq!(
            events.watch_interval_at(up + CATCH_UP / 2),
            Some(super::super::WATCH_INTERVAL)
        );
        assert_eq!(events.watch_interval_at(up + CATCH_UP), None);
        // Without exits from events (exit_events = false) polling goes on.
        let polled = Events::new(false);
        polled.came_up();
        assert_eq!(
            polled.watch_interval_at(Instant::now() + CATCH_UP),
            Some(super::super::WATCH_INTERVAL)
        );
    }

    #[test]
    fn only_containerd_1_7_splits_its_events() {
        assert!(splits_events(&version("containerd", "v1.7.34")));
        assert!(splits_events(&version("containerd", "1.7.0")));
        assert!(!splits_events(&version("containerd", "v2.3.4")));
        assert!(!splits_events(&version("containerd", "v1.6.20")));
        assert!(!splits_events(&version("containerd", "v1.70.0")));
        assert!(!splits_events(&version("cri-o", "1.7.1")));
    }
}
