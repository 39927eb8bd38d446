//! One client connection relayed to the runtime, without I/O: bytes from
//! either peer go in, frames for either peer come out (see [`super::conn`]
//! for the loop that moves them).
//!
//! The proxy is an HTTP/2 endpoint on each hop: a server to the client and
//! a client to the runtime. Connection-level frames are per hop and never
//! cross: each side gets the proxy's own SETTINGS (and has its own
//! acknowledged), its PINGs answered by the proxy, its own flow-control
//! windows, and GOAWAY from the proxy, naming what the proxy accepted on
//! that connection. Streams are what crosses: a client stream to a method
//! the [`Interceptor`] does not claim is opened on the runtime connection
//! under the same id, and its header blocks (decoded, checked and encoded
//! again for the other hop) and DATA (passed as it is) are relayed in order.
//! Streams the interceptor claims ("local" streams) are answered by the
//! proxy itself; the runtime never hears of them.
//!
//! Why per hop: a gRPC client written in Go pings after DATA it receives.
//! Relayed end to end, pings that follow the proxy's own answers reached a
//! runtime that had sent nothing, which counts them as abuse (GOAWAY
//! `too_many_pings`); and the runtime's GOAWAY, relayed as it was, named
//! only the streams the runtime saw, so the client re-sent calls the proxy
//! had answered, StartContainer included.
//!
//! Flow control: DATA is forwarded as soon as the receiving peer's windows
//! allow and queued per stream until then; the sending peer gets its credit
//! back when its bytes have been forwarded (or consumed by a local call). So
//! what a connection buffers is bounded by the windows the proxy grants.
//!
//! When the runtime cannot be reached, relayed calls are answered UNAVAILABLE
//! at once, after one more attempt to connect ([`Action::Connect`]); once it
//! answers, the connection is relayed from then on. When the runtime goes
//! away under a connection (GOAWAY, or the socket closes), its calls in
//! flight end as they would on a direct connection, local calls carry on,
//! and the client is told GOAWAY so that its next calls take a new
//! connection.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use super::frame::{self, flag, kind, reason, setting, Head};
use super::hpack::{self, HeaderList};
use super::{grpc, Interceptor, LocalCall};
use crate::metrics::{self, Metrics};

/// SETTINGS_MAX_CONCURRENT_STREAMS the proxy advertises to clients.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// SETTINGS_MAX_HEADER_LIST_SIZE the proxy advertises to clients. A CRI
/// client's requests carry a few hundred bytes of headers.
pub const MAX_HEADER_LIST_SIZE: usize = 64 * 1024;

/// The receive windows (each stream's and the connection's) the proxy
/// grants a client: HTTP/2's default. CRI requests are small.
const CLIENT_WINDOW: i64 = frame::DEFAULT_WINDOW;

/// The receive windows the proxy grants the runtime (each stream's and the
/// connection's): answers such as ListContainers on a busy node run to
/// megabytes.
const RUNTIME_WINDOW: i64 = 1 << 20;

/// SETTINGS_MAX_HEADER_LIST_SIZE the proxy advertises to the runtime.
const RUNTIME_MAX_HEADER_LIST_SIZE: usize = 1 << 20;

/// Requests to intercepted methods larger than this are refused (gRPC's
/// default message limit; kubelet's CreateContainer requests are kilobytes).
const MAX_LOCAL_REQUEST: usize = 4 * 1024 * 1024;

/// Request bytes of intercepted calls a connection may hold at once (until
/// each is answered); beyond it further ones are refused.
const MAX_LOCAL_BUFFERED: usize = 8 * 1024 * 1024;

/// Messages of a server-streaming local call waiting for a client that does
/// not read: beyond this the stream ends RESOURCE_EXHAUSTED.
const MAX_LOCAL_STREAM_QUEUE: i64 = 1 << 20;

/// Once this much is waiting to be written to a peer, the proxy stops
/// queueing DATA for it and stops reading what would add to it.
pub const OUT_HIGH: usize = 256 * 1024;

/// How many closed streams the proxy remembers: frames on a stream it reset
/// may still be on their way and are ignored, frames on one closed normally
/// are the client's error (STREAM_CLOSED), and a stream id below the last
/// that was never used is an unexpected one (RFC 9113 §5.1, §5.1.1).
const CLOSED_MEMORY: usize = 256;

/// Something the I/O loop must do for the relay.
pub enum Action {
    /// Run a local call and hand its result to [`Relay::local_result`].
    Call(u32, LocalCall),
    /// Run a server-streaming local call: [`Relay::local_stream_started`],
    /// then [`Relay::local_stream_message`] for each message and
    /// [`Relay::local_stream_end`] (or [`Relay::local_result`] with an
    /// error if it fails at once).
    CallStream(u32, LocalCall),
    /// Drop the local call of this stream (the client reset it).
    Cancel(u32),
    /// Connect to the runtime: [`Relay::runtime_attached`] or
    /// [`Relay::runtime_unreachable`].
    Connect,
}

/// A connection error: GOAWAY with this code and close.
#[derive(Debug)]
struct ConnError(u32, &'static str);

/// One hop's connection-level state.
struct Hop {
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    /// The peer's SETTINGS_MAX_FRAME_SIZE: the largest frame it accepts.
    max_frame: usize,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE: the send window of new streams.
    initial_window: i64,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS.
    max_streams: u32,
    /// How much DATA the peer still accepts on the connection.
    send_window: i64,
    /// How much DATA the peer may still send on the connection.
    recv_window: i64,
    /// DATA received and passed on, not yet given back in a WINDOW_UPDATE.
    unreturned: i64,
    /// The full receive window granted (the target of WINDOW_UPDATEs).
    granted: i64,
    /// The receive window each new stream gets.
    stream_window: i64,
    /// The peer's first SETTINGS has arrived.
    settings_seen: bool,
    /// A header block in progress (HEADERS without END_HEADERS, then
    /// CONTINUATION frames).
    block: Option<PendingBlock>,
}

struct PendingBlock {
    stream: u32,
    end_stream: bool,
    /// HEADERS carried PRIORITY and named the stream itself.
    self_dependent: bool,
    fragment: BytesMut,
}

impl Hop {
    fn new(granted: i64, stream_window: i64) -> Hop {
        Hop {
            decoder: hpack::Decoder::default(),
            encoder: hpack::Encoder::default(),
            max_frame: frame::DEFAULT_MAX_FRAME,
            initial_window: frame::DEFAULT_WINDOW,
            max_streams: u32::MAX,
            send_window: frame::DEFAULT_WINDOW,
            recv_window: granted,
            unreturned: 0,
            granted,
            stream_window,
            settings_seen: false,
            block: None,
        }
    }

    /// Apply the peer's SETTINGS; the change to the send windows of open
    /// streams is returned (RFC 9113 §6.9.2).
    fn apply_settings(&mut self, payload: &[u8]) -> Result<i64, ConnError> {
        if payload.len() % 6 != 0 {
            return Err(ConnError(reason::FRAME_SIZE_ERROR, "SETTINGS length"));
        }
        let mut delta = 0;
        for (id, value) in frame::settings(payload) {
            match id {
                setting::HEADER_TABLE_SIZE => self.encoder.set_peer_max(value),
                setting::ENABLE_PUSH if value > 1 => {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH"));
                }
                setting::MAX_CONCURRENT_STREAMS => self.max_streams = value,
                setting::INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > frame::MAX_WINDOW {
                        return Err(ConnError(
                            reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE",
                        ));
                    }
                    delta += value - self.initial_window;
                    self.initial_window = value;
                }
                setting::MAX_FRAME_SIZE => {
                    let value = value as usize;
                    if !(frame::DEFAULT_MAX_FRAME..=frame::MAX_FRAME_LIMIT).contains(&value) {
                        return Err(ConnError(reason::PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE"));
                    }
                    self.max_frame = value;
                }
                _ => {}
            }
        }
        self.settings_seen = true;
        Ok(delta)
    }

    /// A WINDOW_UPDATE's increment.
    fn increment(payload: &[u8]) -> Result<i64, ConnError> {
        match frame::payload_u32(payload) {
            Some(v) if payload.len() == 4 => Ok(i64::from(v & 0x7fff_ffff)),
            _ => Err(ConnError(reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE length")),
        }
    }

    /// Write a WINDOW_UPDATE for the connection once a quarter of the
    /// window is waiting to be given back.
    fn return_credit(&mut self, out: &mut BytesMut) {
        if self.unreturned > 0 && self.unreturned >= self.granted / 4 {
            frame::put_window_update(out, 0, self.unreturned as u32);
            self.recv_window += self.unreturned;
            self.unreturned = 0;
        }
    }
}

/// Something to send on a stream, in order.
enum Item {
    Headers(HeaderList, bool),
    Data(Bytes, bool),
}

/// One direction of a stream: what the proxy still has to send to a peer,
/// and that peer's window for it.
struct Half {
    queue: VecDeque<Item>,
    /// The receiving peer's window for this stream.
    send_window: i64,
    /// Something (the first HEADERS) has been written toward the peer: the
    /// stream exists for it.
    sent: bool,
    /// END_STREAM has been written toward the peer.
    ended: bool,
}

impl Half {
    fn new(send_window: i64) -> Half {
        Half {
            queue: VecDeque::new(),
            send_window,
            sent: false,
            ended: false,
        }
    }

    /// Bytes of DATA queued (credit owed to whoever sent them).
    fn queued_data(&self) -> i64 {
        self.queue
            .iter()
            .map(|i| match i {
                Item::Data(d, _) => d.len() as i64,
                Item::Headers(..) => 0,
            })
            .sum()
    }
}

/// The receive side of a stream at one hop.
struct Recv {
    /// How much DATA the peer may still send on this stream.
    window: i64,
    /// Passed on, not yet given back.
    unreturned: i64,
    /// The peer sent END_STREAM.
    ended: bool,
}

impl Recv {
    fn new(window: i64) -> Recv {
        Recv {
            window,
            unreturned: 0,
            ended: false,
        }
    }
}

enum Route {
    /// Opened (or waiting to be opened) on the runtime connection.
    Relayed {
        /// HEADERS went to the runtime.
        opened: bool,
        /// The request, toward the runtime.
        up: Half,
        /// The response, as the runtime sends it.
        rt_recv: Recv,
        /// The runtime's response headers have been queued for the client.
        started: bool,
        /// `grpc-status` seen in a response header block.
        status: Option<tonic::Code>,
    },
    /// Answered by the proxy.
    Local(LocalPhase),
}

enum LocalPhase {
    Receiving {
        headers: HeaderList,
        body: BytesMut,
    },
    Running,
    /// A server-streaming answer under way: headers sent, messages flowing.
    Streaming,
    Answered,
}

struct Stream {
    method: Box<str>,
    started: Instant,
    /// Request bytes of a local call, counted in [`Relay::local_bytes`].
    local_size: usize,
    route: Route,
    /// The request, as the client sends it.
    recv: Recv,
    /// The response, toward the client.
    down: Half,
}

/// Where the runtime connection stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runtime {
    /// Not connected: the next relayed call tries to connect.
    Unreachable,
    /// A connection attempt is on its way.
    Connecting,
    Connected,
    /// The runtime sent GOAWAY: streams it accepted go on, no new ones.
    GoingAway,
    /// The connection is gone.
    Lost,
}

/// One client connection and its runtime connection.
pub struct Relay {
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
    runtime_path: Arc<PathBuf>,
    client: Hop,
    rt: Hop,
    runtime: Runtime,
    /// Why the runtime could not be reached (for the UNAVAILABLE answers).
    unreachable: String,
    streams: HashMap<u32, Stream, BuildHasherDefault<StreamIdHasher>>,
    /// Streams with something queued toward the client / the runtime.
    down_ready: VecDeque<u32>,
    up_ready: VecDeque<u32>,
    /// Highest stream id the client opened.
    last_stream: u32,
    /// Streams closed recently, newest last, and whether the proxy reset
    /// them.
    closed: VecDeque<(u32, bool)>,
    /// Request bytes of local calls not yet answered (bounded by
    /// [`MAX_LOCAL_BUFFERED`]).
    local_bytes: usize,
    /// The last-stream-id of the GOAWAY the proxy sent the client.
    goaway: Option<u32>,
    /// A connection error was sent: nothing more is read or written after
    /// what is already in `client_out`.
    failed: bool,
    actions: Vec<Action>,
    /// Frames for the client.
    pub client_out: BytesMut,
    /// Frames for the runtime.
    pub runtime_out: BytesMut,
}

impl Relay {
    /// A relay for a client connection whose preface has been read; the
    /// proxy's SETTINGS are queued for the client. Tell it next whether the
    /// runtime could be reached ([`Self::runtime_attached`],
    /// [`Self::runtime_unreachable`]).
    pub fn new(
        interceptor: Arc<dyn Interceptor>,
        metrics: Arc<Metrics>,
        runtime_path: Arc<PathBuf>,
    ) -> Relay {
        let mut client_out = BytesMut::with_capacity(1024);
        // The server's connection preface: its SETTINGS (RFC 9113 §3.4).
        frame::put_settings(
            &mut client_out,
            &[
                (setting::MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
                (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE as u32),
            ],
        );
        Relay {
            interceptor,
            metrics,
            runtime_path,
            client: Hop::new(CLIENT_WINDOW, CLIENT_WINDOW),
            rt: Hop::new(RUNTIME_WINDOW, RUNTIME_WINDOW),
            runtime: Runtime::Unreachable,
            unreachable: String::new(),
            streams: HashMap::default(),
            down_ready: VecDeque::new(),
            up_ready: VecDeque::new(),
            last_stream: 0,
            closed: VecDeque::new(),
            local_bytes: 0,
            goaway: None,
            failed: false,
            actions: Vec::new(),
            client_out,
            runtime_out: BytesMut::new(),
        }
    }

    /// What the I/O loop must do now.
    pub fn actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// The connection is finished: everything owed has been queued in
    /// `client_out` (write it, then close).
    pub fn finished(&self) -> bool {
        self.failed || (self.goaway.is_some() && self.streams.is_empty())
    }

    /// Whether the runtime connection is in use (its socket should be read).
    pub fn runtime_live(&self) -> bool {
        matches!(self.runtime, Runtime::Connected | Runtime::GoingAway)
    }

    /// Whether more input may be taken (backpressure: what it produces
    /// would pile up in an output buffer a peer is not reading).
    pub fn wants_input(&self) -> bool {
        !self.failed && self.client_out.len() < OUT_HIGH && self.runtime_out.len() < OUT_HIGH
    }

    /// Queue what waited for room in an output buffer that has since been
    /// written out.
    pub fn pump(&mut self) {
        if (!self.down_ready.is_empty() && self.client_out.len() < OUT_HIGH)
            || (!self.up_ready.is_empty() && self.runtime_out.len() < OUT_HIGH)
        {
            self.flush();
        }
    }

    // -- Events from the I/O loop ---------------------------------------

    /// A runtime connection is there: the proxy's client preface goes out
    /// and waiting streams are opened.
    pub fn runtime_attached(&mut self) {
        self.runtime_out.extend_from_slice(frame::PREFACE);
        frame::put_settings(
            &mut self.runtime_out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, RUNTIME_WINDOW as u32),
                (
                    setting::MAX_HEADER_LIST_SIZE,
                    RUNTIME_MAX_HEADER_LIST_SIZE as u32,
                ),
            ],
        );
        frame::put_window_update(
            &mut self.runtime_out,
            0,
            (RUNTIME_WINDOW - frame::DEFAULT_WINDOW) as u32,
        );
        self.rt = Hop::new(RUNTIME_WINDOW, RUNTIME_WINDOW);
        self.runtime = Runtime::Connected;
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.route, Route::Relayed { opened: false, .. }))
            .map(|(&id, _)| id)
            .collect();
        let mut waiting = waiting;
        waiting.sort_unstable();
        for id in waiting {
            self.open_on_runtime(id);
        }
        self.flush();
    }

    /// Connecting to the runtime failed: relayed calls waiting for it are
    /// answered UNAVAILABLE.
    pub fn runtime_unreachable(&mut self, error: &std::io::Error) {
        self.runtime = Runtime::Unreachable;
        self.unreachable = error.to_string();
        let status = tonic::Status::unavailable(format!(
            "sidecar-shim: cannot reach the container runtime at {}: {error}",
            self.runtime_path.display()
        ));
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.route, Route::Relayed { opened: false, .. }))
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.fail_relayed(id, &status);
        }
        self.flush();
    }

    /// The runtime connection closed (or failed): its calls in flight end
    /// UNAVAILABLE, as on a direct connection; local calls go on; the
    /// client is told GOAWAY.
    pub fn runtime_lost(&mut self, why: &str) {
        if !self.runtime_live() {
            return;
        }
        let in_flight = self
            .streams
            .values()
            .filter(|s| matches!(s.route, Route::Relayed { .. }))
            .count();
        info!(
            why,
            in_flight, "runtime connection closed; draining the client connection"
        );
        self.runtime = Runtime::Lost;
        self.rt.block = None;
        let status = tonic::Status::unavailable(format!(
            "sidecar-shim: the container runtime closed the connection ({why})"
        ));
        let relayed: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.route, Route::Relayed { .. }))
            .map(|(&id, _)| id)
            .collect();
        for id in relayed {
            self.fail_relayed(id, &status);
        }
        self.runtime_out.clear();
        self.send_goaway(
            reason::NO_ERROR,
            b"the container runtime closed the connection",
        );
        self.flush();
    }

    /// The result of a local call.
    pub fn local_result(&mut self, id: u32, result: Result<Bytes, tonic::Status>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if !matches!(stream.route, Route::Local(LocalPhase::Running)) {
            return;
        }
        if let Err(status) = &result {
            debug!(rpc.method = &*stream.method, stream = id, code = ?status.code(), "local call failed");
        }
        self.answer(id, result);
        self.flush();
    }

    /// A server-streaming local call answers: its response headers go out.
    pub fn local_stream_started(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if !matches!(stream.route, Route::Local(LocalPhase::Running)) {
            return;
        }
        stream.route = Route::Local(LocalPhase::Streaming);
        stream
            .down
            .queue
            .push_back(Item::Headers(grpc::response_headers(), false));
        self.down_ready.push_back(id);
        self.flush();
    }

    /// A message of a server-streaming local call.
    pub fn local_stream_message(&mut self, id: u32, message: &[u8]) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if !matches!(stream.route, Route::Local(LocalPhase::Streaming)) {
            return;
        }
        if stream.down.queued_data() > MAX_LOCAL_STREAM_QUEUE {
            debug!(
                rpc.method = &*stream.method,
                stream = id,
                "client does not read its stream"
            );
            self.actions.push(Action::Cancel(id));
            self.local_stream_end(
                id,
                tonic::Status::resource_exhausted(
                    "sidecar-shim: the client does not read the stream's messages",
                ),
            );
            return;
        }
        stream
            .down
            .queue
            .push_back(Item::Data(grpc::frame_message(message), false));
        self.down_ready.push_back(id);
        self.flush();
    }

    /// A server-streaming local call ends with `status` (OK or not).
    pub fn local_stream_end(&mut self, id: u32, status: tonic::Status) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let started = match stream.route {
            Route::Local(LocalPhase::Streaming) => true,
            Route::Local(LocalPhase::Running) => false,
            _ => return,
        };
        stream
            .down
            .queue
            .push_back(Item::Headers(grpc::status_headers(&status, !started), true));
        self.metrics
            .call(&stream.method, status.code(), stream.started.elapsed());
        stream.route = Route::Local(LocalPhase::Answered);
        self.local_bytes -= std::mem::take(&mut stream.local_size);
        self.down_ready.push_back(id);
        self.flush();
    }

    /// The proxy is shutting down: GOAWAY, finish what is in flight.
    pub fn drain(&mut self) {
        self.send_goaway(reason::NO_ERROR, b"sidecar-shim shutting down");
        self.flush();
    }

    /// The client connection is gone: account for the calls it left.
    pub fn client_gone(&mut self, code: tonic::Code) {
        if !self.streams.is_empty() {
            debug!(
                streams = self.streams.len(),
                "client connection closed with calls in flight"
            );
        }
        for (_, s) in self.streams.drain() {
            if !matches!(s.route, Route::Local(LocalPhase::Answered)) {
                self.metrics.call(&s.method, code, s.started.elapsed());
            }
        }
        self.local_bytes = 0;
    }

    // -- Input -------------------------------------------------------------

    /// Handle every complete frame from the client at the start of `buf`,
    /// removing them.
    pub fn client_input(&mut self, buf: &mut BytesMut) {
        if let Err(ConnError(code, why)) = each_frame(buf, |head, payload| match self.failed {
            true => Ok(false),
            false => self.client_frame(head, payload).map(|()| true),
        }) {
            self.connection_error(code, why);
            return;
        }
        self.flush();
    }

    /// Handle every complete frame from the runtime at the start of `buf`,
    /// removing them.
    pub fn runtime_input(&mut self, buf: &mut BytesMut) {
        let result = each_frame(buf, |head, payload| match self.runtime_live() {
            false => Ok(false),
            true => self.runtime_frame(head, payload).map(|()| true),
        });
        if let Err(ConnError(code, why)) = result {
            warn!(
                code = reason::name(code),
                why, "protocol error from the runtime; closing its connection"
            );
            frame::put_goaway(&mut self.runtime_out, 0, code, why.as_bytes());
            self.runtime_lost(why);
            return;
        }
        self.flush();
    }

    // -- The client hop ------------------------------------------------------

    fn client_frame(&mut self, head: &Head, payload: Bytes) -> Result<(), ConnError> {
        if !self.client.settings_seen && head.kind != kind::SETTINGS {
            return Err(ConnError(
                reason::PROTOCOL_ERROR,
                "the client preface must be followed by SETTINGS",
            ));
        }
        if let Some(block) = &mut self.client.block {
            if head.kind != kind::CONTINUATION || head.stream != block.stream {
                return Err(ConnError(reason::PROTOCOL_ERROR, "expected CONTINUATION"));
            }
            if block.fragment.len() + payload.len() > MAX_HEADER_LIST_SIZE {
                return Err(ConnError(
                    reason::ENHANCE_YOUR_CALM,
                    "header block larger than SETTINGS_MAX_HEADER_LIST_SIZE",
                ));
            }
            block.fragment.extend_from_slice(&payload);
            if head.has(flag::END_HEADERS) {
                let block = self.client.block.take().expect("block in progress");
                return self.client_block(block);
            }
            return Ok(());
        }
        match head.kind {
            kind::DATA => self.client_data(head, payload),
            kind::HEADERS => {
                if head.stream == 0 {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
                }
                let range = frame::headers_fragment(head, &payload)
                    .ok_or(ConnError(reason::PROTOCOL_ERROR, "bad HEADERS padding"))?;
                let self_dependent = head.has(flag::PRIORITY)
                    && frame::payload_u32(&payload[usize::from(head.has(flag::PADDED))..])
                        .is_some_and(|d| d & 0x7fff_ffff == head.stream);
                if range.len() > MAX_HEADER_LIST_SIZE {
                    return Err(ConnError(
                        reason::ENHANCE_YOUR_CALM,
                        "header block larger than SETTINGS_MAX_HEADER_LIST_SIZE",
                    ));
                }
                let block = PendingBlock {
                    stream: head.stream,
                    end_stream: head.has(flag::END_STREAM),
                    self_dependent,
                    fragment: BytesMut::from(&payload[range]),
                };
                if head.has(flag::END_HEADERS) {
                    self.client_block(block)
                } else {
                    self.client.block = Some(block);
                    Ok(())
                }
            }
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                let error = if payload.len() != 5 {
                    Some((reason::FRAME_SIZE_ERROR, "PRIORITY length"))
                } else if frame::payload_u32(&payload)
                    .is_some_and(|d| d & 0x7fff_ffff == head.stream)
                {
                    Some((
                        reason::PROTOCOL_ERROR,
                        "PRIORITY depending on its own stream",
                    ))
                } else {
                    None
                };
                match error {
                    // A stream error; on an idle stream, where RST_STREAM
                    // must not be sent (RFC 9113 §5.1), a connection error.
                    Some((code, why)) if head.stream > self.last_stream => {
                        Err(ConnError(code, why))
                    }
                    Some((code, _)) => {
                        self.reset_client_stream(head.stream, code);
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            kind::RST_STREAM => self.client_reset(head, &payload),
            kind::SETTINGS => {
                if head.stream != 0 {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
                }
                if head.has(flag::ACK) {
                    if !payload.is_empty() {
                        return Err(ConnError(
                            reason::FRAME_SIZE_ERROR,
                            "SETTINGS ACK with a payload",
                        ));
                    }
                    return Ok(());
                }
                let delta = self.client.apply_settings(&payload)?;
                if delta != 0 {
                    for s in self.streams.values_mut() {
                        s.down.send_window += delta;
                        if s.down.send_window > frame::MAX_WINDOW {
                            return Err(ConnError(
                                reason::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a window",
                            ));
                        }
                    }
                    self.queue_all_down();
                }
                frame::put_settings_ack(&mut self.client_out);
                Ok(())
            }
            kind::PUSH_PROMISE => Err(ConnError(
                reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                if head.stream != 0 {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if payload.len() != 8 {
                    return Err(ConnError(reason::FRAME_SIZE_ERROR, "PING length"));
                }
                if !head.has(flag::ACK) {
                    frame::put_ping_ack(&mut self.client_out, &payload);
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if payload.len() < 8 {
                    return Err(ConnError(reason::FRAME_SIZE_ERROR, "GOAWAY length"));
                }
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                debug!(
                    code = reason::name(code),
                    detail = %String::from_utf8_lossy(&payload[8..]),
                    "client sent GOAWAY"
                );
                Ok(())
            }
            kind::WINDOW_UPDATE => self.client_window_update(head, &payload),
            kind::CONTINUATION => Err(ConnError(
                reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            )),
            // Frames of unknown types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn client_data(&mut self, head: &Head, payload: Bytes) -> Result<(), ConnError> {
        let id = head.stream;
        if id == 0 {
            return Err(ConnError(reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if id > self.last_stream {
            return Err(ConnError(reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let len = head.len as i64;
        self.client.recv_window -= len;
        if self.client.recv_window < 0 {
            return Err(ConnError(
                reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection's window",
            ));
        }
        let range = frame::unpadded(head, &payload)
            .ok_or(ConnError(reason::PROTOCOL_ERROR, "bad DATA padding"))?;
        let end = head.has(flag::END_STREAM);
        let Some(stream) = self.streams.get_mut(&id) else {
            // A closed stream: its credit goes back; a frame on a stream
            // the proxy reset was in flight before the client saw it.
            self.client.unreturned += len;
            if self.was_closed(id) != Some(true) {
                self.reset_client_stream(id, reason::STREAM_CLOSED);
            }
            return Ok(());
        };
        if stream.recv.ended {
            self.client.unreturned += len;
            self.reset_client_stream(id, reason::STREAM_CLOSED);
            return Ok(());
        }
        stream.recv.window -= len;
        if stream.recv.window < 0 {
            self.client.unreturned += len;
            self.reset_client_stream(id, reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        // Padding is given back at once.
        let data = payload.slice(range);
        let padding = len - data.len() as i64;
        self.client.unreturned += padding;
        stream.recv.unreturned += padding;
        stream.recv.ended = end;
        match &mut stream.route {
            Route::Relayed { up, .. } => {
                up.queue.push_back(Item::Data(data, end));
                self.up_ready.push_back(id);
            }
            Route::Local(phase) => {
                // A local request's bytes are consumed here: credit goes
                // back at once.
                self.client.unreturned += data.len() as i64;
                stream.recv.unreturned += data.len() as i64;
                if let LocalPhase::Receiving { body, .. } = phase {
                    let refusal = if body.len() + data.len() > MAX_LOCAL_REQUEST {
                        Some("sidecar-shim: request too large")
                    } else if self.local_bytes + data.len() > MAX_LOCAL_BUFFERED {
                        Some("sidecar-shim: too many request bytes in flight on this connection")
                    } else {
                        None
                    };
                    if let Some(why) = refusal {
                        *phase = LocalPhase::Running;
                        self.answer(id, Err(tonic::Status::resource_exhausted(why)));
                    } else {
                        body.extend_from_slice(&data);
                        stream.local_size += data.len();
                        self.local_bytes += data.len();
                        if end {
                            self.dispatch(id);
                        }
                    }
                }
            }
        }
        self.stream_credit(id);
        Ok(())
    }

    /// A complete header block from the client.
    fn client_block(&mut self, block: PendingBlock) -> Result<(), ConnError> {
        let id = block.stream;
        let decoded = self
            .client
            .decoder
            .decode_limited(&block.fragment, MAX_HEADER_LIST_SIZE)
            .map_err(|_| ConnError(reason::COMPRESSION_ERROR, "malformed header block"))?;
        if let Some(stream) = self.streams.get_mut(&id) {
            // Trailers: they must end the request, and carry no pseudo-headers.
            if stream.recv.ended {
                self.reset_client_stream(id, reason::STREAM_CLOSED);
                return Ok(());
            }
            if !block.end_stream || decoded.too_large || check_trailers(&decoded.fields).is_err() {
                self.reset_client_stream(id, reason::PROTOCOL_ERROR);
                return Ok(());
            }
            stream.recv.ended = true;
            match &mut stream.route {
                Route::Relayed { up, .. } => {
                    up.queue.push_back(Item::Headers(decoded.fields, true));
                    self.up_ready.push_back(id);
                }
                Route::Local(LocalPhase::Receiving { .. }) => self.dispatch(id),
                Route::Local(_) => {}
            }
            return Ok(());
        }
        if id <= self.last_stream {
            match self.was_closed(id) {
                // In flight before the client saw the reset.
                Some(true) => {}
                Some(false) => self.reset_client_stream(id, reason::STREAM_CLOSED),
                None => {
                    return Err(ConnError(
                        reason::PROTOCOL_ERROR,
                        "HEADERS opening a stream below the last one",
                    ))
                }
            }
            return Ok(());
        }
        if id % 2 == 0 {
            return Err(ConnError(
                reason::PROTOCOL_ERROR,
                "even stream id from a client",
            ));
        }
        self.last_stream = id;
        if self.goaway.is_some() {
            self.reset_client_stream(id, reason::REFUSED_STREAM);
            return Ok(());
        }
        if block.self_dependent {
            self.reset_client_stream(id, reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if decoded.too_large {
            debug!(
                stream = id,
                size = decoded.size,
                "request header list too large"
            );
            self.open_stream(id, "", Route::Local(LocalPhase::Running), block.end_stream);
            self.answer(
                id,
                Err(tonic::Status::resource_exhausted(format!(
                    "sidecar-shim: request header list of {} bytes exceeds the limit of {MAX_HEADER_LIST_SIZE}",
                    decoded.size
                ))),
            );
            return Ok(());
        }
        let headers = decoded.fields;
        if let Err(why) = check_request(&headers) {
            debug!(stream = id, why, "malformed request");
            self.reset_client_stream(id, reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.streams.len() >= MAX_CONCURRENT_STREAMS as usize {
            self.reset_client_stream(id, reason::REFUSED_STREAM);
            return Ok(());
        }
        let method = String::from_utf8_lossy(hpack::get(&headers, b":path").unwrap_or_default())
            .into_owned();
        let end = block.end_stream;
        if self.interceptor.intercepts(&method) {
            self.open_stream(
                id,
                &method,
                Route::Local(LocalPhase::Receiving {
                    headers,
                    body: BytesMut::new(),
                }),
                end,
            );
            if end {
                self.dispatch(id);
            }
            return Ok(());
        }
        let mut up = Half::new(self.rt.initial_window);
        up.queue.push_back(Item::Headers(headers, end));
        self.open_stream(
            id,
            &method,
            Route::Relayed {
                opened: false,
                up,
                rt_recv: Recv::new(self.rt.stream_window),
                started: false,
                status: None,
            },
            end,
        );
        match self.runtime {
            Runtime::Connected => self.open_on_runtime(id),
            Runtime::Unreachable => {
                self.runtime = Runtime::Connecting;
                self.actions.push(Action::Connect);
            }
            Runtime::Connecting => {}
            Runtime::GoingAway | Runtime::Lost => {
                // Not sent anywhere: the client may retry it.
                self.drop_stream(id);
                self.reset_client_stream(id, reason::REFUSED_STREAM);
            }
        }
        Ok(())
    }

    fn open_stream(&mut self, id: u32, method: &str, route: Route, end: bool) {
        let mut recv = Recv::new(self.client.stream_window);
        recv.ended = end;
        self.streams.insert(
            id,
            Stream {
                method: method.into(),
                started: Instant::now(),
                local_size: 0,
                route,
                recv,
                down: Half::new(self.client.initial_window),
            },
        );
    }

    fn client_reset(&mut self, head: &Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(ConnError(reason::FRAME_SIZE_ERROR, "RST_STREAM length"));
        }
        if head.stream > self.last_stream {
            return Err(ConnError(
                reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let id = head.stream;
        if let Some(stream) = self.streams.get(&id) {
            debug!(
                rpc.method = &*stream.method,
                stream = id,
                elapsed_ms = stream.started.elapsed().as_millis() as u64,
                "client cancelled a call"
            );
            let answered = matches!(stream.route, Route::Local(LocalPhase::Answered));
            if !answered {
                self.metrics.call(
                    &stream.method,
                    tonic::Code::Cancelled,
                    stream.started.elapsed(),
                );
            }
            if let Route::Relayed { up, rt_recv, .. } = &stream.route {
                if up.sent && !rt_recv.ended {
                    frame::put_rst_stream(&mut self.runtime_out, id, reason::CANCEL);
                }
            }
            if matches!(
                stream.route,
                Route::Local(LocalPhase::Running | LocalPhase::Streaming)
            ) {
                self.actions.push(Action::Cancel(id));
            }
            self.drop_stream(id);
        }
        Ok(())
    }

    fn client_window_update(&mut self, head: &Head, payload: &[u8]) -> Result<(), ConnError> {
        let inc = Hop::increment(payload)?;
        if head.stream == 0 {
            if inc == 0 {
                return Err(ConnError(reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.client.send_window += inc;
            if self.client.send_window > frame::MAX_WINDOW {
                return Err(ConnError(
                    reason::FLOW_CONTROL_ERROR,
                    "connection window overflow",
                ));
            }
            self.queue_all_down();
            return Ok(());
        }
        if head.stream > self.last_stream {
            return Err(ConnError(
                reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            // Closed: allowed (RFC 9113 §6.9).
            return Ok(());
        };
        if inc == 0 {
            self.reset_client_stream(head.stream, reason::PROTOCOL_ERROR);
            return Ok(());
        }
        stream.down.send_window += inc;
        if stream.down.send_window > frame::MAX_WINDOW {
            self.reset_client_stream(head.stream, reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        self.down_ready.push_back(head.stream);
        Ok(())
    }

    /// A connection error: GOAWAY to the client, and the connection ends
    /// (the I/O loop drops the local calls still running).
    fn connection_error(&mut self, code: u32, why: &'static str) {
        warn!(
            code = reason::name(code),
            reason = why,
            "closing client connection after a protocol error"
        );
        // Never above a GOAWAY already sent (RFC 9113 §6.8).
        let last = self.goaway.unwrap_or(self.last_stream);
        frame::put_goaway(&mut self.client_out, last, code, why.as_bytes());
        self.failed = true;
        self.client_gone(tonic::Code::Unavailable);
    }

    fn remember_reset(&mut self, id: u32) {
        self.remember_closed(id, true);
    }

    fn remember_closed(&mut self, id: u32, reset: bool) {
        if let Some(entry) = self.closed.iter_mut().rev().find(|(i, _)| *i == id) {
            entry.1 |= reset;
            return;
        }
        if self.closed.len() == CLOSED_MEMORY {
            self.closed.pop_front();
        }
        self.closed.push_back((id, reset));
    }

    /// Whether `id` closed recently, and if so whether the proxy reset it.
    fn was_closed(&self, id: u32) -> Option<bool> {
        self.closed
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, reset)| *reset)
    }

    /// How many streams are open on the runtime connection (counted only
    /// when the runtime limits them, which containerd does not).
    fn runtime_streams(&self) -> usize {
        self.streams
            .values()
            .filter(|s| matches!(s.route, Route::Relayed { opened: true, .. }))
            .count()
    }

    /// End stream `id` toward the client with RST_STREAM (a stream error, or
    /// a refusal), forgetting it and cancelling what it started.
    fn reset_client_stream(&mut self, id: u32, code: u32) {
        frame::put_rst_stream(&mut self.client_out, id, code);
        self.remember_reset(id);
        if let Some(stream) = self.streams.get(&id) {
            if code != reason::REFUSED_STREAM
                && !matches!(stream.route, Route::Local(LocalPhase::Answered))
            {
                self.metrics.call(
                    &stream.method,
                    metrics::reset_code(code),
                    stream.started.elapsed(),
                );
            }
            match &stream.route {
                Route::Relayed { up, rt_recv, .. } if up.sent && !rt_recv.ended => {
                    frame::put_rst_stream(&mut self.runtime_out, id, reason::CANCEL);
                }
                Route::Local(LocalPhase::Running | LocalPhase::Streaming) => {
                    self.actions.push(Action::Cancel(id))
                }
                _ => {}
            }
            self.drop_stream(id);
        }
    }

    /// Forget a stream, giving back the credit of what it had queued.
    fn drop_stream(&mut self, id: u32) {
        let Some(stream) = self.streams.remove(&id) else {
            return;
        };
        self.remember_closed(id, false);
        self.local_bytes -= stream.local_size;
        let unforwarded = match &stream.route {
            Route::Relayed { up, .. } => up.queued_data(),
            Route::Local(_) => 0,
        };
        self.client.unreturned += unforwarded;
        if matches!(stream.route, Route::Relayed { .. }) {
            self.rt.unreturned += stream.down.queued_data();
        }
    }

    /// GOAWAY to the client: streams after the last one it opened are
    /// refused; the ones before it are answered.
    fn send_goaway(&mut self, code: u32, debug: &[u8]) {
        if self.goaway.is_none() && !self.failed {
            self.goaway = Some(self.last_stream);
            frame::put_goaway(&mut self.client_out, self.last_stream, code, debug);
        }
    }

    // -- Local calls ---------------------------------------------------------

    /// The request of a local stream is complete: hand it to the I/O loop.
    fn dispatch(&mut self, id: u32) {
        let stream = self.streams.get_mut(&id).expect("caller checked");
        let Route::Local(phase) = &mut stream.route else {
            return;
        };
        let LocalPhase::Receiving { headers, body } = std::mem::replace(phase, LocalPhase::Running)
        else {
            return;
        };
        match grpc::unary_message(&body) {
            Ok(message) => {
                let call = LocalCall {
                    method: stream.method.to_string(),
                    timeout: hpack::get(&headers, b"grpc-timeout").and_then(grpc::parse_timeout),
                    headers,
                    message,
                };
                if self.interceptor.streams(&call.method) {
                    self.actions.push(Action::CallStream(id, call));
                } else {
                    self.actions.push(Action::Call(id, call));
                }
            }
            Err(status) => self.answer(id, Err(status)),
        }
    }

    /// Queue the answer of a local stream.
    fn answer(&mut self, id: u32, result: Result<Bytes, tonic::Status>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        match result {
            Ok(message) => {
                stream
                    .down
                    .queue
                    .push_back(Item::Headers(grpc::response_headers(), false));
                stream
                    .down
                    .queue
                    .push_back(Item::Data(grpc::frame_message(&message), false));
                stream.down.queue.push_back(Item::Headers(
                    grpc::status_headers(&tonic::Status::ok(""), false),
                    true,
                ));
            }
            Err(status) => {
                stream
                    .down
                    .queue
                    .push_back(Item::Headers(grpc::status_headers(&status, true), true));
            }
        }
        debug!(
            rpc.method = &*stream.method,
            stream = id,
            latency_us = stream.started.elapsed().as_micros() as u64,
            "local call answered"
        );
        self.metrics
            .call(&stream.method, code, stream.started.elapsed());
        stream.route = Route::Local(LocalPhase::Answered);
        self.local_bytes -= std::mem::take(&mut stream.local_size);
        self.down_ready.push_back(id);
    }

    // -- The runtime hop -----------------------------------------------------

    /// Send a waiting relayed stream's HEADERS to the runtime.
    fn open_on_runtime(&mut self, id: u32) {
        if self.rt.max_streams != u32::MAX && self.runtime_streams() >= self.rt.max_streams as usize
        {
            // The runtime takes no more streams now: the client may retry.
            self.drop_stream(id);
            self.reset_client_stream(id, reason::REFUSED_STREAM);
            return;
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if let Route::Relayed { opened, up, .. } = &mut stream.route {
            *opened = true;
            up.send_window = self.rt.initial_window;
            self.up_ready.push_back(id);
        }
    }

    /// Answer a relayed call that cannot get (or finish) its answer from
    /// the runtime with `status`, after whatever the runtime already sent.
    fn fail_relayed(&mut self, id: u32, status: &tonic::Status) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Route::Relayed {
            opened,
            up,
            started,
            status: seen,
            ..
        } = &mut stream.route
        else {
            return;
        };
        if response_complete(&stream.down) {
            return;
        }
        *opened = false;
        let unforwarded = up.queued_data();
        up.queue.clear();
        up.ended = true;
        *seen = Some(status.code());
        self.client.unreturned += unforwarded;
        stream
            .down
            .queue
            .push_back(Item::Headers(grpc::status_headers(status, !*started), true));
        self.down_ready.push_back(id);
    }

    fn runtime_frame(&mut self, head: &Head, payload: Bytes) -> Result<(), ConnError> {
        if let Some(block) = &mut self.rt.block {
            if head.kind != kind::CONTINUATION || head.stream != block.stream {
                return Err(ConnError(reason::PROTOCOL_ERROR, "expected CONTINUATION"));
            }
            if block.fragment.len() + payload.len() > RUNTIME_MAX_HEADER_LIST_SIZE {
                return Err(ConnError(
                    reason::ENHANCE_YOUR_CALM,
                    "header block too large",
                ));
            }
            block.fragment.extend_from_slice(&payload);
            if head.has(flag::END_HEADERS) {
                let block = self.rt.block.take().expect("block in progress");
                return self.runtime_block(block);
            }
            return Ok(());
        }
        match head.kind {
            kind::DATA => self.runtime_data(head, payload),
            kind::HEADERS => {
                let range = frame::headers_fragment(head, &payload)
                    .ok_or(ConnError(reason::PROTOCOL_ERROR, "bad HEADERS padding"))?;
                let block = PendingBlock {
                    stream: head.stream,
                    end_stream: head.has(flag::END_STREAM),
                    self_dependent: false,
                    fragment: BytesMut::from(&payload[range]),
                };
                if head.has(flag::END_HEADERS) {
                    self.runtime_block(block)
                } else {
                    self.rt.block = Some(block);
                    Ok(())
                }
            }
            kind::RST_STREAM => {
                let code = frame::payload_u32(&payload)
                    .ok_or(ConnError(reason::FRAME_SIZE_ERROR, "RST_STREAM length"))?;
                self.runtime_reset(head.stream, code);
                Ok(())
            }
            kind::SETTINGS => {
                if head.has(flag::ACK) {
                    return Ok(());
                }
                let delta = self.rt.apply_settings(&payload)?;
                if delta != 0 {
                    for s in self.streams.values_mut() {
                        if let Route::Relayed { up, .. } = &mut s.route {
                            up.send_window += delta;
                        }
                    }
                    self.queue_all_up();
                }
                frame::put_settings_ack(&mut self.runtime_out);
                Ok(())
            }
            kind::PING => {
                if !head.has(flag::ACK) {
                    frame::put_ping_ack(&mut self.runtime_out, &payload);
                }
                Ok(())
            }
            kind::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError(reason::FRAME_SIZE_ERROR, "GOAWAY length"));
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                self.runtime_goaway(last, code, &payload[8..]);
                Ok(())
            }
            kind::WINDOW_UPDATE => {
                let inc = Hop::increment(&payload)?;
                if head.stream == 0 {
                    self.rt.send_window += inc;
                    self.queue_all_up();
                } else if let Some(Stream {
                    route: Route::Relayed { up, .. },
                    ..
                }) = self.streams.get_mut(&head.stream)
                {
                    up.send_window += inc;
                    self.up_ready.push_back(head.stream);
                }
                Ok(())
            }
            kind::PUSH_PROMISE => Err(ConnError(
                reason::PROTOCOL_ERROR,
                "PUSH_PROMISE though SETTINGS_ENABLE_PUSH is 0",
            )),
            kind::CONTINUATION => Err(ConnError(
                reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            )),
            _ => Ok(()),
        }
    }

    fn runtime_data(&mut self, head: &Head, payload: Bytes) -> Result<(), ConnError> {
        let len = head.len as i64;
        self.rt.recv_window -= len;
        if self.rt.recv_window < 0 {
            return Err(ConnError(
                reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection's window",
            ));
        }
        let range = frame::unpadded(head, &payload)
            .ok_or(ConnError(reason::PROTOCOL_ERROR, "bad DATA padding"))?;
        let data = payload.slice(range);
        let padding = len - data.len() as i64;
        let end = head.has(flag::END_STREAM);
        match self.streams.get_mut(&head.stream) {
            Some(Stream {
                route:
                    Route::Relayed {
                        rt_recv,
                        opened: true,
                        ..
                    },
                down,
                ..
            }) if !rt_recv.ended => {
                rt_recv.window -= len;
                if rt_recv.window < 0 {
                    return Err(ConnError(
                        reason::FLOW_CONTROL_ERROR,
                        "DATA beyond a stream's window",
                    ));
                }
                rt_recv.ended = end;
                self.rt.unreturned += padding;
                rt_recv.unreturned += padding;
                down.queue.push_back(Item::Data(data, end));
                self.down_ready.push_back(head.stream);
            }
            // A stream the proxy gave up on (the client reset it).
            _ => self.rt.unreturned += len,
        }
        Ok(())
    }

    /// A complete header block from the runtime: decoded whatever its
    /// stream (the table must follow), relayed if its stream is live.
    fn runtime_block(&mut self, block: PendingBlock) -> Result<(), ConnError> {
        let decoded = self
            .rt
            .decoder
            .decode_limited(&block.fragment, RUNTIME_MAX_HEADER_LIST_SIZE)
            .map_err(|_| ConnError(reason::COMPRESSION_ERROR, "malformed header block"))?;
        let id = block.stream;
        let Some(Stream {
            route:
                Route::Relayed {
                    rt_recv,
                    status,
                    started,
                    opened: true,
                    ..
                },
            down,
            method,
            ..
        }) = self.streams.get_mut(&id)
        else {
            return Ok(());
        };
        if rt_recv.ended {
            return Ok(());
        }
        if decoded.too_large {
            warn!(
                rpc.method = &**method,
                stream = id,
                size = decoded.size,
                "response header list too large"
            );
            let status = tonic::Status::internal(
                "sidecar-shim: the runtime's response headers are too large",
            );
            self.fail_relayed(id, &status);
            frame::put_rst_stream(&mut self.runtime_out, id, reason::CANCEL);
            return Ok(());
        }
        rt_recv.ended = block.end_stream;
        *started = true;
        if let Some(code) = grpc::status_of(&decoded.fields) {
            *status = Some(code);
        }
        down.queue
            .push_back(Item::Headers(decoded.fields, block.end_stream));
        self.down_ready.push_back(id);
        Ok(())
    }

    fn runtime_reset(&mut self, id: u32, code: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Route::Relayed {
            opened: true, up, ..
        } = &mut stream.route
        else {
            return;
        };
        // The request's remaining bytes will not be sent.
        let unforwarded = up.queued_data();
        up.queue.clear();
        up.ended = true;
        self.client.unreturned += unforwarded;
        if response_complete(&stream.down) {
            // The response is all there (a reset after it only stops the
            // request, RFC 9113 §8.1): let it finish.
            if let Route::Relayed { opened, .. } = &mut stream.route {
                *opened = false;
            }
            return;
        }
        debug!(
            rpc.method = &*stream.method,
            stream = id,
            code = reason::name(code),
            "runtime reset a call"
        );
        self.metrics.call(
            &stream.method,
            metrics::reset_code(code),
            stream.started.elapsed(),
        );
        self.drop_stream(id);
        frame::put_rst_stream(&mut self.client_out, id, code);
        self.remember_reset(id);
    }

    /// The runtime will take no new streams; those it did not accept are
    /// refused to the client, which may send them again (RFC 9113 §6.8).
    fn runtime_goaway(&mut self, last: u32, code: u32, detail: &[u8]) {
        let detail = String::from_utf8_lossy(detail);
        if code != reason::NO_ERROR {
            warn!(last_stream = last, code = reason::name(code), detail = %detail, "runtime sent GOAWAY");
        } else {
            info!(last_stream = last, detail = %detail, "runtime sent GOAWAY");
        }
        self.runtime = Runtime::GoingAway;
        let refused: Vec<u32> = self
            .streams
            .iter()
            .filter(|(&id, s)| matches!(s.route, Route::Relayed { .. }) && id > last)
            .map(|(&id, _)| id)
            .collect();
        for id in refused {
            // Not processed by the runtime: nothing to cancel there.
            if let Some(Stream {
                route: Route::Relayed { opened, .. },
                ..
            }) = self.streams.get_mut(&id)
            {
                *opened = false;
            }
            self.reset_client_stream(id, reason::REFUSED_STREAM);
        }
        self.send_goaway(reason::NO_ERROR, b"the container runtime is going away");
    }

    // -- Output --------------------------------------------------------------

    fn queue_all_down(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.down.queue.is_empty())
            .map(|(&id, _)| id)
            .collect();
        self.down_ready.extend(ids);
    }

    fn queue_all_up(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(&s.route, Route::Relayed { up, opened: true, .. } if !up.queue.is_empty()))
            .map(|(&id, _)| id)
            .collect();
        self.up_ready.extend(ids);
    }

    /// Move what the windows allow from the streams' queues to the output
    /// buffers, give credit back, and forget finished streams.
    fn flush(&mut self) {
        if self.failed {
            return;
        }
        if self.runtime_live() {
            self.flush_up();
        }
        self.flush_down();
        self.client.return_credit(&mut self.client_out);
        if self.runtime_live() {
            self.rt.return_credit(&mut self.runtime_out);
        }
    }

    /// Streams' queued frames toward the runtime.
    fn flush_up(&mut self) {
        let mut ready = std::mem::take(&mut self.up_ready);
        let mut again = VecDeque::new();
        while let Some(id) = ready.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            let Route::Relayed {
                opened: true, up, ..
            } = &mut stream.route
            else {
                continue;
            };
            let mut forwarded = 0;
            let blocked = write_items(up, id, &mut self.rt, &mut self.runtime_out, &mut forwarded);
            stream.recv.unreturned += forwarded;
            self.client.unreturned += forwarded;
            if blocked && !again.contains(&id) {
                again.push_back(id);
            }
            self.stream_credit(id);
            self.finish_if_done(id);
        }
        self.up_ready = again;
    }

    /// Streams' queued frames toward the client.
    fn flush_down(&mut self) {
        let mut ready = std::mem::take(&mut self.down_ready);
        let mut again = VecDeque::new();
        while let Some(id) = ready.pop_front() {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            let mut forwarded = 0;
            let blocked = write_items(
                &mut stream.down,
                id,
                &mut self.client,
                &mut self.client_out,
                &mut forwarded,
            );
            if let Route::Relayed {
                rt_recv, opened, ..
            } = &mut stream.route
            {
                rt_recv.unreturned += forwarded;
                self.rt.unreturned += forwarded;
                if *opened && !rt_recv.ended && rt_recv.unreturned >= self.rt.stream_window / 4 {
                    frame::put_window_update(&mut self.runtime_out, id, rt_recv.unreturned as u32);
                    rt_recv.window += rt_recv.unreturned;
                    rt_recv.unreturned = 0;
                }
            }
            if blocked && !again.contains(&id) {
                again.push_back(id);
            }
            self.finish_if_done(id);
        }
        self.down_ready = again;
    }

    /// Give a stream's request credit back to the client once a quarter of
    /// its window waits (only while the client may still send on it).
    fn stream_credit(&mut self, id: u32) {
        if let Some(stream) = self.streams.get_mut(&id) {
            let recv = &mut stream.recv;
            if !recv.ended
                && recv.unreturned > 0
                && recv.unreturned >= self.client.stream_window / 4
            {
                frame::put_window_update(&mut self.client_out, id, recv.unreturned as u32);
                recv.window += recv.unreturned;
                recv.unreturned = 0;
            }
        }
    }

    /// Forget a stream once its answer has been written. A request the
    /// client is still sending is stopped (RFC 9113 §8.1), toward whichever
    /// peers still expect it.
    fn finish_if_done(&mut self, id: u32) {
        let Some(stream) = self.streams.get(&id) else {
            return;
        };
        if !stream.down.ended {
            return;
        }
        if let Route::Relayed {
            up, opened, status, ..
        } = &stream.route
        {
            debug!(
                rpc.method = &*stream.method,
                stream = id,
                latency_us = stream.started.elapsed().as_micros() as u64,
                "forwarded call"
            );
            let code = status.unwrap_or(tonic::Code::Unknown);
            self.metrics
                .call(&stream.method, code, stream.started.elapsed());
            if *opened && up.sent && !up.ended && self.runtime_live() {
                frame::put_rst_stream(&mut self.runtime_out, id, reason::CANCEL);
            }
        }
        if !stream.recv.ended {
            frame::put_rst_stream(&mut self.client_out, id, reason::NO_ERROR);
            self.remember_reset(id);
        }
        self.drop_stream(id);
    }
}

/// The response of a stream has been written or queued to its end.
fn response_complete(down: &Half) -> bool {
    down.ended
        || down
            .queue
            .iter()
            .any(|i| matches!(i, Item::Headers(_, true) | Item::Data(_, true)))
}

/// Hand each complete frame at the start of `buf` to `f` (while it returns
/// `Ok(true)`), removing the frames it took. A frame larger than the
/// proxy's SETTINGS_MAX_FRAME_SIZE (the default, which it never raises) is
/// a connection error.
fn each_frame(
    buf: &mut BytesMut,
    mut f: impl FnMut(&Head, Bytes) -> Result<bool, ConnError>,
) -> Result<(), ConnError> {
    while let Some(head) = Head::parse(buf) {
        if head.len > frame::DEFAULT_MAX_FRAME {
            return Err(ConnError(
                reason::FRAME_SIZE_ERROR,
                "frame larger than SETTINGS_MAX_FRAME_SIZE",
            ));
        }
        if buf.len() < head.frame_len() {
            break;
        }
        let mut raw = buf.split_to(head.frame_len()).freeze();
        let payload = raw.split_off(frame::HEADER_LEN);
        if !f(&head, payload)? {
            break;
        }
    }
    Ok(())
}

/// Write a half's queued items to `out` as far as the windows allow.
/// `forwarded` counts DATA bytes written. Returns whether it stopped for
/// lack of window (or room in `out`) with items left.
fn write_items(
    half: &mut Half,
    id: u32,
    hop: &mut Hop,
    out: &mut BytesMut,
    forwarded: &mut i64,
) -> bool {
    while let Some(item) = half.queue.front_mut() {
        match item {
            Item::Headers(headers, end) => {
                let mut block = BytesMut::new();
                hop.encoder.encode(&mut block, headers);
                frame::put_headers(out, id, &block, *end, hop.max_frame);
                half.sent = true;
                half.ended |= *end;
                half.queue.pop_front();
            }
            Item::Data(data, end) => {
                if data.is_empty() {
                    frame::put_data(out, id, &[], *end, hop.max_frame);
                    half.ended |= *end;
                    half.queue.pop_front();
                    continue;
                }
                let n = (data.len() as i64)
                    .min(hop.send_window)
                    .min(half.send_window)
                    .min(hop.max_frame as i64);
                if n <= 0 || out.len() >= OUT_HIGH {
                    return true;
                }
                let chunk = data.split_to(n as usize);
                let last = data.is_empty();
                frame::put_data(out, id, &chunk, last && *end, hop.max_frame);
                hop.send_window -= n;
                half.send_window -= n;
                *forwarded += n;
                if last {
                    half.ended |= *end;
                    half.queue.pop_front();
                }
            }
        }
    }
    false
}

/// Check a request's header list (RFC 9113 §8.2, §8.3.1).
fn check_request(headers: &HeaderList) -> Result<(), &'static str> {
    let mut regular = false;
    let (mut method, mut scheme, mut path) = (0, 0, 0);
    for (name, value) in headers {
        check_field(name, value)?;
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular {
                return Err("pseudo-header after a regular field");
            }
            match pseudo {
                b"method" => method += 1,
                b"scheme" => scheme += 1,
                b"path" => {
                    if value.is_empty() {
                        return Err("empty :path");
                    }
                    path += 1
                }
                b"authority" => {}
                _ => return Err("unknown pseudo-header"),
            }
        } else {
            regular = true;
            check_regular(name, value)?;
        }
    }
    if method != 1 || scheme != 1 || path != 1 {
        return Err("missing or repeated pseudo-header");
    }
    Ok(())
}

/// Check a trailer section (no pseudo-headers, RFC 9113 §8.1).
fn check_trailers(headers: &HeaderList) -> Result<(), &'static str> {
    for (name, value) in headers {
        check_field(name, value)?;
        if name.starts_with(b":") {
            return Err("pseudo-header in trailers");
        }
        check_regular(name, value)?;
    }
    Ok(())
}

/// Field names and values (RFC 9113 §8.2.1).
fn check_field(name: &[u8], value: &[u8]) -> Result<(), &'static str> {
    let name_chars = name.strip_prefix(b":").unwrap_or(name);
    if name_chars.is_empty()
        || name_chars
            .iter()
            .any(|&c| c <= 0x20 || c.is_ascii_uppercase() || c >= 0x7f || c == b':')
    {
        return Err("invalid field name");
    }
    if value.iter().any(|&c| c == 0 || c == b'\n' || c == b'\r')
        || value.first().is_some_and(|&c| c == b' ' || c == b'\t')
        || value.last().is_some_and(|&c| c == b' ' || c == b'\t')
    {
        return Err("invalid field value");
    }
    Ok(())
}

/// Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2).
fn check_regular(name: &[u8], value: &[u8]) -> Result<(), &'static str> {
    match name {
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" => {
            Err("connection-specific field")
        }
        b"te" if value != b"trailers" => Err("TE other than trailers"),
        _ => Ok(()),
    }
}

/// Hashes a stream id as itself: ids are distinct odd numbers the client
/// chose, and the map is per connection, so SipHash's protection against
/// chosen keys buys nothing a bounded map (MAX_CONCURRENT_STREAMS) needs.
#[derive(Default)]
struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, id: u32) {
        // Spread the (odd) ids over hashbrown's top bits too.
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests;
