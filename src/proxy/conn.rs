//! One client connection, relayed frame by frame over its own connection to
//! the runtime.
//!
//! Why frames and not a terminating HTTP/2 server plus client: a CRI client
//! (kubelet) holds one or two long-lived connections, so pairing each with a
//! runtime connection keeps SETTINGS, PING and flow control end to end, costs
//! the same syscalls as a byte relay, and never parses the `:authority` that
//! the h2 crate would reject (older kubelets send the percent-encoded socket
//! path). The proxy reads only what it must:
//!
//! * client to runtime: every header block is decoded (to route on `:path`)
//!   and re-encoded without dynamic-table state (see [`super::hpack`]), so the
//!   proxy may keep some streams to itself ("local" streams: intercepted
//!   calls, and streams refused while draining) without desynchronising the
//!   runtime's HPACK decoder. Other frames pass through as they are, except
//!   flow-control credit the proxy owes or is owed for local streams.
//! * runtime to client: frames pass through untouched; the proxy only walks
//!   frame headers to account the client's connection window and to see
//!   calls end. Answers to local streams are injected between frames. With
//!   metrics on, response header blocks are also decoded (never altered) to
//!   read each call's `grpc-status` (see [`super::status`]).
//!
//! Flow control with injected answers: DATA the proxy injects uses the
//! client's connection window, which the runtime does not know about. The
//! proxy records that as debt and withholds as much from the client's next
//! connection WINDOW_UPDATEs before forwarding them; runtime DATA that arrives
//! while the client's window is short waits (in order) in `held`. With no
//! local streams none of this happens and frames just flow.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::frame::{self, flag, kind, reason, Head};
use super::{grpc, hpack, status, Interceptor, LocalCall};
use crate::metrics::{self, Metrics};

/// Initial read buffer size per direction; grows to hold the largest frame.
const READ_BUF: usize = 64 * 1024;

/// Requests to intercepted methods larger than this are refused.
const MAX_LOCAL_REQUEST: usize = 16 * 1024 * 1024;

/// State both directions of one connection touch. Locked briefly, never across
/// an await.
struct Shared {
    state: Mutex<State>,
    /// Wakes the runtime-to-client direction to write what the other direction
    /// or a finished local call queued.
    wake: Notify,
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    /// Frames for the client, queued by the client-to-runtime direction.
    control: BytesMut,
    /// The client's connection-level receive window, as the proxy knows it.
    client_window: i64,
    /// Injected DATA bytes not yet withheld from the client's WINDOW_UPDATEs.
    debt: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE (stream windows of local streams).
    client_initial_window: i64,
    /// INITIAL_WINDOW_SIZE of client SETTINGS frames the runtime has not yet
    /// acknowledged, oldest first (`None`: that frame did not change it).
    unacked_client_settings: VecDeque<Option<i64>>,
    /// Highest stream id the client opened.
    last_stream: u32,
    /// The runtime lowered SETTINGS_HEADER_TABLE_SIZE below the default: the
    /// encoder toward it stops using a dynamic table.
    runtime_table_shrunk: bool,
    /// Set once the proxy sent GOAWAY (draining): later streams are refused.
    goaway: Option<u32>,
    draining: bool,
    /// A connection error to report to the client before closing.
    fatal: Option<(u32, &'static str)>,
    /// Forwarded calls in flight.
    calls: HashMap<u32, Forwarded>,
    /// Streams the proxy answers itself.
    local: HashMap<u32, Local>,
}

struct Forwarded {
    method: Box<str>,
    started: Instant,
    /// A `grpc-status` seen in a response header block that did not end
    /// the stream (only followed with metrics on).
    status: Option<tonic::Code>,
}

struct Local {
    method: Box<str>,
    started: Instant,
    headers: hpack::HeaderList,
    body: BytesMut,
    /// The client's stream-level receive window for this stream.
    window: i64,
    phase: Phase,
}

enum Phase {
    /// Receiving the request.
    Receiving,
    /// The request is complete and being handled.
    Running(tokio::task::AbortHandle),
    /// The answer, being written as the client's windows allow.
    Answering(Answer),
    /// Refused while draining: frames are dropped until the client ends it.
    Refused,
}

struct Answer {
    head: Option<BytesMut>,
    data: Bytes,
    trailers: BytesMut,
    code: tonic::Code,
}

impl Answer {
    fn new(result: Result<Bytes, tonic::Status>) -> Answer {
        match result {
            Ok(message) => Answer {
                head: Some(grpc::response_headers()),
                data: grpc::frame_message(&message),
                trailers: grpc::status_block(&tonic::Status::ok(""), false),
                code: tonic::Code::Ok,
            },
            Err(status) => Answer {
                head: None,
                data: Bytes::new(),
                trailers: grpc::status_block(&status, true),
                code: status.code(),
            },
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-updated that
        // matters more than serving on; take the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the result of a local call and wake the writer.
    fn finish_local(&self, stream: u32, result: Result<Bytes, tonic::Status>) {
        let mut st = self.lock();
        if let Some(local) = st.local.get_mut(&stream) {
            if let Err(status) = &result {
                debug!(rpc.method = &*local.method, stream, code = ?status.code(), "local call failed");
            }
            local.phase = Phase::Answering(Answer::new(result));
            drop(st);
            self.wake.notify_one();
        }
    }
}

impl Drop for Local {
    /// A local call dropped before it was answered (client reset, connection
    /// closed) is cancelled.
    fn drop(&mut self) {
        if let Phase::Running(task) = &self.phase {
            task.abort();
        }
    }
}

/// Relay one client connection whose preface has been read (the bytes after
/// it are in `pending`) over `runtime`.
pub(super) async fn relay(
    client: UnixStream,
    runtime: UnixStream,
    pending: BytesMut,
    interceptor: Arc<dyn Interceptor>,
    metrics: Arc<Metrics>,
    drain: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            client_window: frame::DEFAULT_WINDOW,
            client_initial_window: frame::DEFAULT_WINDOW,
            ..State::default()
        }),
        wake: Notify::new(),
        interceptor,
        metrics,
    });
    let (client_rd, client_wr) = client.into_split();
    let (runtime_rd, mut runtime_wr) = runtime.into_split();
    if let Err(e) = runtime_wr.write_all(frame::PREFACE).await {
        debug!(error = %e, "runtime connection closed before the preface");
        return;
    }
    let up = ClientToRuntime::new(shared.clone()).run(client_rd, runtime_wr, pending);
    let down = RuntimeToClient::new(shared.clone(), drain).run(runtime_rd, client_wr);
    // What the client makes of calls still in flight: it went away itself,
    // or it sees its connection fail.
    let unfinished = tokio::select! {
        r = up => {
            if let Err(e) = r { debug!(error = %e, "client side closed") }
            tonic::Code::Cancelled
        }
        r = down => {
            if let Err(e) = r { debug!(error = %e, "runtime side closed") }
            tonic::Code::Unavailable
        }
    };
    let mut st = shared.lock();
    if !st.calls.is_empty() || !st.local.is_empty() {
        debug!(
            forwarded = st.calls.len(),
            local = st.local.len(),
            "connection closed with calls in flight"
        );
        let metrics = &shared.metrics;
        for call in st.calls.values() {
            metrics.call(&call.method, unfinished, call.started.elapsed());
        }
        for local in st.local.values() {
            if !matches!(local.phase, Phase::Refused) {
                metrics.call(&local.method, unfinished, local.started.elapsed());
            }
        }
    }
    // Local calls still running die with the connection, as calls to a
    // runtime do when their client goes away: dropping them aborts their
    // tasks (which hold `shared`, so it would never be dropped otherwise),
    // and a call the lifecycle holds is then cancelled.
    let local = std::mem::take(&mut st.local);
    drop(st);
    drop(local);
}

/// The client-to-runtime direction.
struct ClientToRuntime {
    shared: Arc<Shared>,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    /// A header block being assembled from HEADERS and CONTINUATION frames.
    block: Option<PendingBlock>,
    out: BytesMut,
}

struct PendingBlock {
    stream: u32,
    end_stream: bool,
    fragment: BytesMut,
}

/// A connection error: GOAWAY with this code, then close.
struct ConnError(u32, &'static str);

impl ClientToRuntime {
    fn new(shared: Arc<Shared>) -> Self {
        ClientToRuntime {
            shared,
            decoder: hpack::Decoder::default(),
            encoder: hpack::Encoder::default(),
            block: None,
            out: BytesMut::new(),
        }
    }

    async fn run(
        mut self,
        mut rd: OwnedReadHalf,
        mut wr: OwnedWriteHalf,
        mut buf: BytesMut,
    ) -> std::io::Result<()> {
        buf.reserve(READ_BUF);
        loop {
            let consumed = match self.process(&buf) {
                Ok(n) => n,
                Err(ConnError(code, why)) => {
                    // Report to the client through the writer, then park: the
                    // writer closes the connection.
                    self.shared.lock().fatal = Some((code, why));
                    self.shared.wake.notify_one();
                    std::future::pending::<()>().await;
                    unreachable!();
                }
            };
            buf.advance(consumed);
            if !self.out.is_empty() {
                wr.write_all(&self.out).await?;
                self.out.clear();
            }
            // Make room for a whole frame if a large one is on its way.
            let need = Head::parse(&buf).map_or(frame::HEADER_LEN, |h| h.frame_len());
            buf.reserve(need.max(READ_BUF / 4));
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Handle every complete frame in `buf`; returns the bytes consumed.
    fn process(&mut self, buf: &[u8]) -> Result<usize, ConnError> {
        let mut at = 0;
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let mut woke = false;
        while let Some(head) = Head::parse(&buf[at..]) {
            if head.len > frame::MAX_FRAME_LIMIT {
                return Err(ConnError(reason::PROTOCOL_ERROR, "frame too large"));
            }
            if buf.len() - at < head.frame_len() {
                break;
            }
            let raw = &buf[at..at + head.frame_len()];
            let payload = &raw[frame::HEADER_LEN..];
            at += head.frame_len();

            if let Some(block) = &mut self.block {
                if head.kind != kind::CONTINUATION || head.stream != block.stream {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "expected CONTINUATION"));
                }
                block.fragment.extend_from_slice(payload);
                if head.has(flag::END_HEADERS) {
                    let block = self.block.take().expect("block in progress");
                    woke |= self.header_block(
                        &mut st,
                        block.stream,
                        block.end_stream,
                        &block.fragment,
                    )?;
                }
                continue;
            }

            match head.kind {
                kind::HEADERS => {
                    let range = frame::headers_fragment(&head, payload)
                        .ok_or(ConnError(reason::PROTOCOL_ERROR, "bad HEADERS padding"))?;
                    let fragment = &payload[range];
                    let end_stream = head.has(flag::END_STREAM);
                    if head.has(flag::END_HEADERS) {
                        woke |= self.header_block(&mut st, head.stream, end_stream, fragment)?;
                    } else {
                        self.block = Some(PendingBlock {
                            stream: head.stream,
                            end_stream,
                            fragment: BytesMut::from(fragment),
                        });
                    }
                }
                kind::CONTINUATION => {
                    return Err(ConnError(reason::PROTOCOL_ERROR, "unexpected CONTINUATION"));
                }
                kind::DATA if st.local.contains_key(&head.stream) => {
                    woke |= self.local_data(&mut st, &head, payload);
                }
                kind::WINDOW_UPDATE if head.stream == 0 => {
                    let inc = i64::from(frame::payload_u32(payload).unwrap_or(0) & 0x7fff_ffff);
                    st.client_window += inc;
                    let pay = st.debt.min(inc);
                    st.debt -= pay;
                    if inc - pay > 0 {
                        frame::put_window_update(&mut self.out, 0, (inc - pay) as u32);
                    }
                    woke = true;
                }
                kind::WINDOW_UPDATE | kind::RST_STREAM | kind::PRIORITY
                    if st.local.contains_key(&head.stream) =>
                {
                    let value = i64::from(frame::payload_u32(payload).unwrap_or(0) & 0x7fff_ffff);
                    match head.kind {
                        kind::WINDOW_UPDATE => {
                            if let Some(local) = st.local.get_mut(&head.stream) {
                                local.window += value;
                            }
                            woke = true;
                        }
                        kind::RST_STREAM => {
                            // The client gave up on a call the proxy holds:
                            // dropping it aborts its task.
                            if let Some(local) = st.local.remove(&head.stream) {
                                debug!(
                                    rpc.method = &*local.method,
                                    stream = head.stream,
                                    elapsed_ms = local.started.elapsed().as_millis() as u64,
                                    "client cancelled a local call"
                                );
                                if !matches!(local.phase, Phase::Refused) {
                                    self.shared.metrics.call(
                                        &local.method,
                                        tonic::Code::Cancelled,
                                        local.started.elapsed(),
                                    );
                                }
                                woke = true;
                            }
                        }
                        _ => {}
                    }
                }
                kind::SETTINGS if !head.has(flag::ACK) => {
                    // The client's receive windows change only once the
                    // runtime's acknowledgement reaches it (h2 applies its
                    // own settings then); the other direction applies this
                    // when it passes that ACK on.
                    let window = frame::settings(payload)
                        .filter(|(id, _)| *id == frame::setting::INITIAL_WINDOW_SIZE)
                        .map(|(_, v)| i64::from(v))
                        .last();
                    st.unacked_client_settings.push_back(window);
                    self.out.extend_from_slice(raw);
                }
                kind::RST_STREAM => {
                    if let Some(call) = st.calls.remove(&head.stream) {
                        log_end(head.stream, &call, "cancelled by client");
                        self.shared.metrics.call(
                            &call.method,
                            tonic::Code::Cancelled,
                            call.started.elapsed(),
                        );
                    }
                    self.out.extend_from_slice(raw);
                }
                _ => self.out.extend_from_slice(raw),
            }
        }
        drop(st);
        if woke {
            self.shared.wake.notify_one();
        }
        Ok(at)
    }

    /// A complete header block from the client: a new request, or trailers.
    /// Returns whether the writer must be woken.
    fn header_block(
        &mut self,
        st: &mut State,
        stream: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<bool, ConnError> {
        let headers = self
            .decoder
            .decode(block)
            .map_err(|_| ConnError(reason::COMPRESSION_ERROR, "malformed header block"))?;
        if stream > st.last_stream {
            if stream % 2 == 0 {
                return Err(ConnError(
                    reason::PROTOCOL_ERROR,
                    "even stream id from client",
                ));
            }
            st.last_stream = stream;
            let method = hpack::get(&headers, b":path").unwrap_or_default();
            let method: Box<str> = String::from_utf8_lossy(method).into();
            if st.goaway.is_some_and(|last| stream > last) {
                frame::put_rst_stream(&mut st.control, stream, reason::REFUSED_STREAM);
                if !end_stream {
                    st.local
                        .insert(stream, Local::new(method, headers, 0, Phase::Refused));
                }
                return Ok(true);
            }
            if self.shared.interceptor.intercepts(&method) {
                let window = st.client_initial_window;
                st.local.insert(
                    stream,
                    Local::new(method, headers, window, Phase::Receiving),
                );
                if end_stream {
                    self.dispatch(st, stream);
                }
                return Ok(true);
            }
            st.calls.insert(
                stream,
                Forwarded {
                    method,
                    started: Instant::now(),
                    status: None,
                },
            );
        } else if let Some(local) = st.local.get_mut(&stream) {
            // Trailers on a local stream end its request.
            if end_stream && matches!(local.phase, Phase::Receiving) {
                self.dispatch(st, stream);
            }
            return Ok(true);
        }
        let mut encoded = BytesMut::with_capacity(block.len() * 2 + 64);
        self.encoder
            .encode(st.runtime_table_shrunk, &mut encoded, &headers);
        frame::put_headers(
            &mut self.out,
            stream,
            &encoded,
            end_stream,
            frame::DEFAULT_MAX_FRAME,
        );
        Ok(false)
    }

    /// DATA on a local stream: keep the payload, give the credit back.
    fn local_data(&mut self, st: &mut State, head: &Head, payload: &[u8]) -> bool {
        let credit = head.len as u32;
        if credit > 0 {
            frame::put_window_update(&mut st.control, 0, credit);
            if !head.has(flag::END_STREAM) {
                frame::put_window_update(&mut st.control, head.stream, credit);
            }
        }
        let local = st.local.get_mut(&head.stream).expect("caller checked");
        match local.phase {
            Phase::Receiving => {
                let data = match frame::unpadded(head, payload) {
                    Some(r) => &payload[r],
                    None => payload,
                };
                if local.body.len() + data.len() > MAX_LOCAL_REQUEST {
                    local.phase = Phase::Answering(Answer::new(Err(
                        tonic::Status::resource_exhausted("sidecar-shim: request too large"),
                    )));
                    return true;
                }
                local.body.extend_from_slice(data);
                if head.has(flag::END_STREAM) {
                    self.dispatch(st, head.stream);
                }
            }
            Phase::Refused if head.has(flag::END_STREAM) => {
                st.local.remove(&head.stream);
            }
            _ => {}
        }
        credit > 0
    }

    /// The request on a local stream is complete: run it.
    fn dispatch(&mut self, st: &mut State, stream: u32) {
        let local = st.local.get_mut(&stream).expect("caller checked");
        let call = match grpc::unary_message(&local.body) {
            Ok(message) => LocalCall {
                method: local.method.to_string(),
                timeout: hpack::get(&local.headers, b"grpc-timeout").and_then(grpc::parse_timeout),
                headers: std::mem::take(&mut local.headers),
                message,
            },
            Err(status) => {
                local.phase = Phase::Answering(Answer::new(Err(status)));
                return;
            }
        };
        local.body = BytesMut::new();
        let fut = self.shared.interceptor.call(call);
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let result = fut.await;
            shared.finish_local(stream, result);
        });
        local.phase = Phase::Running(task.abort_handle());
    }
}

impl Local {
    fn new(method: Box<str>, headers: hpack::HeaderList, window: i64, phase: Phase) -> Local {
        Local {
            method,
            started: Instant::now(),
            headers,
            body: BytesMut::new(),
            window,
            phase,
        }
    }
}

fn log_end(stream: u32, call: &Forwarded, how: &str) {
    debug!(
        rpc.method = &*call.method,
        stream,
        latency_us = call.started.elapsed().as_micros() as u64,
        how,
        "forwarded call"
    );
}

/// The runtime-to-client direction, which also writes everything the proxy
/// itself sends to the client.
struct RuntimeToClient {
    shared: Arc<Shared>,
    drain: watch::Receiver<bool>,
    /// Runtime frames waiting for the client's connection window.
    held: BytesMut,
    /// The runtime is in the middle of a header block: nothing may be
    /// injected until it ends.
    in_block: bool,
    /// The runtime's SETTINGS (its connection preface) has been passed on;
    /// nothing may be sent before it.
    preface_done: bool,
    out: BytesMut,
    /// Follows response header blocks for call codes; `None` with metrics off.
    responses: Option<status::Responses>,
}

impl RuntimeToClient {
    fn new(shared: Arc<Shared>, drain: watch::Receiver<bool>) -> Self {
        let responses = shared.metrics.enabled().then(status::Responses::default);
        RuntimeToClient {
            shared,
            drain,
            held: BytesMut::new(),
            in_block: false,
            preface_done: false,
            out: BytesMut::new(),
            responses,
        }
    }

    async fn run(mut self, mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let mut drain_seen = false;
        loop {
            let close = self.prepare();
            if !self.out.is_empty() {
                wr.write_all(&self.out).await?;
                self.out.clear();
            }
            if close {
                wr.shutdown().await.ok();
                return Ok(());
            }
            let need = Head::parse(&buf).map_or(frame::HEADER_LEN, |h| h.frame_len());
            buf.reserve(need.max(READ_BUF / 4));
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    let (forward, consumed) = self.process(&buf);
                    if forward > 0 {
                        wr.write_all(&buf[..forward]).await?;
                    }
                    buf.advance(consumed);
                }
                _ = self.shared.wake.notified() => {}
                r = self.drain.changed(), if !drain_seen => {
                    drain_seen = true;
                    if r.is_ok() && *self.drain.borrow() {
                        self.shared.lock().draining = true;
                    }
                }
            }
        }
    }
}

impl RuntimeToClient {
    /// Walk the complete runtime frames in `buf`. Returns `(forward,
    /// consumed)`: the first `forward` bytes go to the client as they are; the
    /// frames after them, up to `consumed`, were copied to `held` because the
    /// client's connection window cannot take them yet.
    fn process(&mut self, buf: &[u8]) -> (usize, usize) {
        let mut st = self.shared.lock();
        let mut at = 0;
        let mut forward = 0;
        while let Some(head) = Head::parse(&buf[at..]) {
            if buf.len() - at < head.frame_len() {
                break;
            }
            let end = at + head.frame_len();
            // With metrics on: the code the frame ending a call gives it.
            let mut code = None;
            let ends_stream = match head.kind {
                kind::HEADERS | kind::CONTINUATION | kind::PUSH_PROMISE
                    if self.responses.is_some() =>
                {
                    let payload = &buf[at + frame::HEADER_LEN..end];
                    let block = self
                        .responses
                        .as_mut()
                        .and_then(|r| r.frame(&head, payload));
                    match block {
                        Some(block) if block.end_stream => {
                            code = block.status;
                            true
                        }
                        Some(block) => {
                            if let Some(call) = st.calls.get_mut(&block.stream) {
                                call.status = call.status.or(block.status);
                            }
                            false
                        }
                        None => false,
                    }
                }
                kind::DATA | kind::HEADERS => head.has(flag::END_STREAM),
                kind::RST_STREAM => {
                    if self.responses.is_some() {
                        let payload = &buf[at + frame::HEADER_LEN..end];
                        code = frame::payload_u32(payload).map(metrics::reset_code);
                    }
                    true
                }
                kind::SETTINGS => {
                    if head.has(flag::ACK) {
                        if let Some(Some(window)) = st.unacked_client_settings.pop_front() {
                            let delta = window - st.client_initial_window;
                            st.client_initial_window = window;
                            for local in st.local.values_mut() {
                                local.window += delta;
                            }
                        }
                    } else {
                        let payload = &buf[at + frame::HEADER_LEN..end];
                        if frame::settings(payload).any(|(id, v)| {
                            id == frame::setting::HEADER_TABLE_SIZE
                                && (v as usize) < hpack::DEFAULT_TABLE
                        }) {
                            st.runtime_table_shrunk = true;
                        }
                    }
                    self.preface_done = true;
                    false
                }
                _ => false,
            };
            if ends_stream {
                if let Some(call) = st.calls.remove(&head.stream) {
                    log_end(
                        head.stream,
                        &call,
                        if head.kind == kind::RST_STREAM {
                            "reset"
                        } else {
                            "done"
                        },
                    );
                    if self.responses.is_some() {
                        // A response without grpc-status is UNKNOWN to
                        // a gRPC client.
                        let code = code.or(call.status).unwrap_or(tonic::Code::Unknown);
                        self.shared
                            .metrics
                            .call(&call.method, code, call.started.elapsed());
                    }
                }
            }
            let fits = head.kind != kind::DATA || head.len as i64 <= st.client_window;
            if forward == at && self.held.is_empty() && fits {
                if head.kind == kind::DATA {
                    st.client_window -= head.len as i64;
                }
                self.in_block = matches!(
                    head.kind,
                    kind::HEADERS | kind::PUSH_PROMISE | kind::CONTINUATION
                ) && !head.has(flag::END_HEADERS);
                forward = end;
            } else {
                self.held.extend_from_slice(&buf[at..end]);
            }
            at = end;
        }
        (forward, at)
    }

    /// Queue everything the proxy itself has to write; returns whether the
    /// connection is done and should close after this write.
    fn prepare(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if let Some((code, why)) = st.fatal {
            // Only complete frames have been written so far; the GOAWAY
            // follows them.
            frame::put_goaway(&mut self.out, st.last_stream, code, why.as_bytes());
            warn!(
                reason = why,
                "closing client connection after a protocol error"
            );
            return true;
        }
        if !self.preface_done || self.in_block {
            return false;
        }
        // Runtime frames that waited for window go first, in order.
        if !self.held.is_empty() {
            let n = take_fitting(&self.held, &mut st.client_window);
            self.out.extend_from_slice(&self.held[..n]);
            self.held.advance(n);
            if let Some(end) = last_block_state(&self.out) {
                self.in_block = end;
            }
            if self.in_block {
                return false;
            }
        }
        if !st.control.is_empty() {
            let control = st.control.split();
            self.out.extend_from_slice(&control);
        }
        if st.draining && st.goaway.is_none() {
            st.goaway = Some(st.last_stream);
            frame::put_goaway(
                &mut self.out,
                st.last_stream,
                reason::NO_ERROR,
                b"sidecar-shim shutting down",
            );
        }
        self.inject(&mut st);
        st.goaway.is_some() && st.calls.is_empty() && st.local.is_empty()
    }

    /// Write answers of local calls as far as the client's windows allow.
    fn inject(&mut self, st: &mut State) {
        let State {
            local,
            client_window,
            debt,
            ..
        } = st;
        local.retain(|&stream, l| {
            let Phase::Answering(answer) = &mut l.phase else {
                return true;
            };
            if let Some(head) = answer.head.take() {
                frame::put_headers(
                    &mut self.out,
                    stream,
                    &head,
                    false,
                    frame::DEFAULT_MAX_FRAME,
                );
            }
            while !answer.data.is_empty() {
                let n = (answer.data.len() as i64)
                    .min(*client_window)
                    .min(l.window)
                    .min(frame::DEFAULT_MAX_FRAME as i64);
                if n <= 0 {
                    return true;
                }
                let chunk = answer.data.split_to(n as usize);
                frame::put_data(
                    &mut self.out,
                    stream,
                    &chunk,
                    false,
                    frame::DEFAULT_MAX_FRAME,
                );
                *client_window -= n;
                l.window -= n;
                *debt += n;
            }
            frame::put_headers(
                &mut self.out,
                stream,
                &answer.trailers,
                true,
                frame::DEFAULT_MAX_FRAME,
            );
            debug!(
                rpc.method = &*l.method,
                stream,
                latency_us = l.started.elapsed().as_micros() as u64,
                "local call answered"
            );
            self.shared
                .metrics
                .call(&l.method, answer.code, l.started.elapsed());
            false
        });
    }
}

/// Length of the prefix of `frames` (complete frames) that fits in `window`,
/// debiting DATA frames from it.
fn take_fitting(frames: &[u8], window: &mut i64) -> usize {
    let mut at = 0;
    while let Some(head) = Head::parse(&frames[at..]) {
        if head.kind == kind::DATA {
            if head.len as i64 > *window {
                break;
            }
            *window -= head.len as i64;
        }
        at += head.frame_len();
    }
    at
}

/// Whether, after the last complete frame in `frames`, a header block is
/// still open. `None` if `frames` holds no frame.
fn last_block_state(frames: &[u8]) -> Option<bool> {
    let mut at = 0;
    let mut open = None;
    while let Some(head) = Head::parse(&frames[at..]) {
        if matches!(
            head.kind,
            kind::HEADERS | kind::PUSH_PROMISE | kind::CONTINUATION
        ) {
            open = Some(!head.has(flag::END_HEADERS));
        } else {
            open = Some(false);
        }
        at += head.frame_len();
    }
    open
}
