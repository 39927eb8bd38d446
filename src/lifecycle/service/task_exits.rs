//! containerd's own task exit events (`/tasks/exit` from its events
//! service, on the same socket as the CRI), the fastest word of an exit.
//!
//! containerd publishes a task's exit the moment its shim reaps the
//! process. Its CRI plugin turns that into a CRI `ContainerStopped` event
//! only after it has deleted the task (a `runc delete`), which on a busy
//! node takes 100-200 ms more; that delay is all between a Job's last main
//! container exiting and its sidecars' SIGTERM. containerd's events
//! service also gives every event to every subscriber, where its 1.7 CRI
//! hands each container event to one subscriber only, and it answers on
//! 1.6, whose CRI has no events at all. So while this subscription stands
//! it is where exits come from (see [`super::events`] for the CRI stream,
//! which the shim still serves to its clients, and is the source of exits
//! on a runtime without these events).
//!
//! Exits are of init processes only (an exec's end is not a container's);
//! containers are told apart by their ids, which are the CRI's. After the
//! subscription (re)starts every watched container is read at once and
//! polled for [`super::events::CATCH_UP`] more, so that no exit is
//! missed in between.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, info};

use super::events::Subscription;
use super::{lock, Event, Inner};

/// containerd's events service: subscribe to a filtered stream.
const SUBSCRIBE: &str = "/containerd.services.events.v1.Events/Subscribe";
/// The events wanted: task exits, in whatever namespace the CRI uses.
const FILTER: &str = "topic==\"/tasks/exit\"";
/// The event type in the envelope's `Any`.
const TASK_EXIT: &str = "containerd.events.TaskExit";
/// `containerd.services.events.v1.SubscribeRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct SubscribeRequest {
    #[prost(string, repeated, tag = "1")]
    filters: Vec<String>,
}

/// `containerd.services.events.v1.Envelope` (its timestamp left out).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Envelope {
    #[prost(string, tag = "2")]
    namespace: String,
    #[prost(string, tag = "3")]
    topic: String,
    #[prost(message, optional, tag = "4")]
    event: Option<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `containerd.events.TaskExit` (its exit time left out).
#[derive(Clone, PartialEq, prost::Message)]
struct TaskExit {
    #[prost(string, tag = "1")]
    container_id: String,
    /// The process: the container's id for its init process, an exec's id
    /// otherwise.
    #[prost(string, tag = "2")]
    id: String,
    #[prost(uint32, tag = "3")]
    pid: u32,
    #[prost(uint32, tag = "4")]
    exit_status: u32,
}

/// The exit of a container's init process in an envelope: (container, exit
/// code). None for anything else.
fn container_exit(envelope: &Envelope) -> Option<(String, i32)> {
    let any = envelope.event.as_ref()?;
    if envelope.topic != "/tasks/exit" || !any.type_url.ends_with(TASK_EXIT) {
        return None;
    }
    let exit = <TaskExit as prost::Message>::decode(any.value.as_slice()).ok()?;
    if exit.id != exit.container_id || exit.container_id.is_empty() {
        return None;
    }
    Some((exit.container_id, exit.exit_status as i32))
}

/// containerd's events service, filtered to task exits.
pub(super) struct TaskExits;

impl Subscription for TaskExits {
    type Item = Envelope;
    const WHAT: &'static str = "containerd's task exit events";
    const MEANWHILE: &'static str =
        "exits come from the runtime's container events if they stand, are polled otherwise";

    fn subscribe(
        me: &Arc<Inner>,
    ) -> impl Future<Output = Result<tonic::Response<tonic::Streaming<Envelope>>, tonic::Status>> + Send
    {
        let mut grpc = me.raw.clone();
        async move {
            grpc.ready().await.map_err(|e| {
                tonic::Status::unavailable(format!("sidecar-shim: runtime unavailable: {e}"))
            })?;
            grpc.server_streaming(
                tonic::Request::new(SubscribeRequest {
                    filters: vec![FILTER.to_owned()],
                }),
                SUBSCRIBE.parse().expect("a valid path"),
                tonic_prost::ProstCodec::<SubscribeRequest, Envelope>::default(),
            )
            .await
        }
    }

    /// Exits come from it. Every watched container is read once, for an
    /// exit that came before it.
    fn up(me: &Arc<Inner>) -> impl Future<Output = ()> + Send {
        let me = me.clone();
        async move {
            if me.events.task_exits.swap(true, Ordering::AcqRel) {
                return;
            }
            info!(
                "subscribed to containerd's task exit events: exits are polled only for {:?} more",
                super::events::CATCH_UP
            );
            me.events.came_up();
            me.wake.notify_one();
            let watched = lock(&me.machine).watched();
            for container in watched {
                me.observe_exit(&container).await;
            }
        }
    }

    /// Exits come from the CRI events or polling again, and every watched
    /// container is read once (a CRI event that came while this
    /// subscription was thought to stand was not acted on).
    fn down(me: &Arc<Inner>, _why: Option<&tonic::Status>) {
        if me.events.task_exits.swap(false, Ordering::AcqRel) {
            debug!("task exit subscription down");
            let me = me.clone();
            tokio::spawn(async move {
                let watched = lock(&me.machine).watched();
                for container in watched {
                    me.observe_exit(&container).await;
                }
            });
        }
        me.wake.notify_one();
    }

    fn unsupported(_me: &Arc<Inner>, _status: tonic::Status) {}

    fn handle(me: &Arc<Inner>, envelope: Envelope) -> impl Future<Output = ()> + Send {
        if let Some((container, code)) = container_exit(&envelope) {
            // Every exit of a container the shim knows: one that does not
            // matter yet may matter once the CRI still reads it running.
            if lock(&me.machine).knows(&container) {
                debug!(container, code, "task exit event");
                me.feed(Event::Exited { container, code });
            }
        }
        std::future::ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn envelope(topic: &str, type_url: &str, exit: TaskExit) -> Envelope {
        Envelope {
            namespace: "k8s.io".into(),
            topic: topic.into(),
            event: Some(Any {
                type_url: type_url.into(),
                value: exit.encode_to_vec(),
            }),
        }
    }

    fn exit(container: &str, process: &str, status: u32) -> TaskExit {
        TaskExit {
            container_id: container.into(),
            id: process.into(),
            pid: 42,
            exit_status: status,
        }
    }

    #[test]
    fn init_process_exits_are_container_exits() {
        let e = envelope(
            "/tasks/exit",
            "containerd.events.TaskExit",
            exit("c1", "c1", 137),
        );
        assert_eq!(container_exit(&e), Some(("c1".into(), 137)));
        // containerd 2.x names the type with a type URL prefix.
        let e = envelope(
            "/tasks/exit",
            "types.containerd.io/containerd.events.TaskExit",
            exit("c1", "c1", 0),
        );
        assert_eq!(container_exit(&e), Some(("c1".into(), 0)));
    }

    #[test]
    fn exec_exits_and_other_events_are_not() {
        let e = envelope("/tasks/exit", TASK_EXIT, exit("c1", "exec-7", 0));
        assert_eq!(container_exit(&e), None);
        let e = envelope("/tasks/oom", TASK_EXIT, exit("c1", "c1", 0));
        assert_eq!(container_exit(&e), None);
        let e = envelope(
            "/tasks/exit",
            "containerd.events.TaskOOM",
            exit("c1", "c1", 0),
        );
        assert_eq!(container_exit(&e), None);
        let mut garbage = envelope("/tasks/exit", TASK_EXIT, exit("c1", "c1", 0));
        garbage.event.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        assert_eq!(container_exit(&garbage), None);
    }

    /// The messages written here decode what containerd's own definitions
    /// encode: field numbers from containerd's api/events/task.proto and
    /// api/services/events/v1/events.proto.
    #[test]
    fn wire_format_matches_containerds() {
        // TaskExit{container_id:"c", id:"c", pid:7, exit_status:1,
        // exited_at:{seconds:1}} as containerd encodes it.
        let bytes = [
            0x0a, 0x01, b'c', 0x12, 0x01, b'c', 0x18, 0x07, 0x20, 0x01, 0x2a, 0x02, 0x08, 0x01,
        ];
        let exit = TaskExit::decode(&bytes[..]).unwrap();
        assert_eq!(exit, self::exit("c", "c", 1).with_pid(7));
    }

    impl TaskExit {
        fn with_pid(mut self, pid: u32) -> Self {
            self.pid = pid;
            self
        }
    }
}
