//! Entry points for fuzzing, one function per target taking the fuzzer's
//! bytes. The cargo-fuzz targets in `fuzz/fuzz_targets/` call them, and so
//! does `tests/fuzz_corpus.rs` (every file of `fuzz/corpus/<target>/`, on
//! stable, in CI). Each one panics when an invariant breaks; anything else
//! (an input the parser rejects) returns quietly.
//!
//! Not part of the shim's interface: hidden from the docs, and free to
//! change with the fuzzing.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::config::{self, Cli, Config, FileConfig};
use crate::lifecycle::machine::{
    Event, Machine, PodRecord, RuntimeContainer, RuntimePod, RuntimeState, Settings, WallClock,
    RECORD_VERSION,
};
use crate::lifecycle::spec::{self, Defaults, Preset};
use crate::lifecycle::store;
use crate::proxy::frame::{self, flag, kind, Head};
use crate::proxy::hpack::{self, HeaderList};

mod relay;

pub use relay::relay;

/// A fuzz target: takes the fuzzer's bytes, panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory (`fuzz/corpus/<name>`).
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("hpack_decode", hpack_decode),
    ("hpack_roundtrip", hpack_roundtrip),
    ("relay", relay),
    ("annotations", annotations),
    ("state_file", state_file),
    ("config", config),
    ("manifest", manifest),
];

/// Reads the fuzzer's bytes as a sequence of choices; past the end every
/// choice is 0 (so every input means something).
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Up to `n` bytes (fewer at the end).
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub(crate) fn string(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()) % (max + 1);
        self.bytes(n)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

// -- HTTP/2 framing -----------------------------------------------------------

/// The frame reader on arbitrary bytes: every frame header, fragment,
/// padding and SETTINGS payload it finds, and the writers' output read back.
pub fn frame(data: &[u8]) {
    // Walk the bytes as a frame stream.
    let mut at = 0;
    while let Some(head) = Head::parse(&data[at..]) {
        assert!(head.len <= frame::MAX_FRAME_LIMIT);
        assert_eq!(head.stream & 0x8000_0000, 0);
        assert_eq!(head.frame_len(), frame::HEADER_LEN + head.len);
        let end = (at + head.frame_len()).min(data.len());
        let payload = &data[at + frame::HEADER_LEN..end];
        check_payload(&head, payload);
        at = end;
        if at >= data.len() {
            break;
        }
    }
    // The same payload under every flag combination that changes parsing.
    if let Some(head) = Head::parse(data) {
        let payload = &data[frame::HEADER_LEN..];
        for flags in [
            0,
            flag::PADDED,
            flag::PRIORITY,
            flag::PADDED | flag::PRIORITY,
        ] {
            check_payload(&Head { flags, ..head }, payload);
        }
    }
    // What the writers write parses back to what they were given.
    let mut input = Input::new(data);
    let stream = input.u32() & 0x7fff_ffff;
    let max_frame = usize::from(input.u16()) % 20_000 + 1;
    let end = input.bool();
    let body = input.rest();
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, stream, body, end, max_frame);
    let (block, frames) = reassemble(&out, kind::HEADERS, max_frame);
    assert_eq!(block, body);
    assert_eq!(frames.first().map(|h| h.has(flag::END_STREAM)), Some(end));
    assert!(frames.last().is_some_and(|h| h.has(flag::END_HEADERS)));
    for (i, h) in frames.iter().enumerate() {
        assert_eq!(h.stream, stream);
        let want = if i == 0 {
            kind::HEADERS
        } else {
            kind::CONTINUATION
        };
        assert_eq!(h.kind, want);
        assert_eq!(h.has(flag::END_HEADERS), i + 1 == frames.len());
    }
    let mut out = BytesMut::new();
    frame::put_data(&mut out, stream, body, end, max_frame);
    let (data_back, frames) = reassemble(&out, kind::DATA, max_frame);
    assert_eq!(data_back, body);
    for (i, h) in frames.iter().enumerate() {
        assert_eq!(h.kind, kind::DATA);
        assert_eq!(h.has(flag::END_STREAM), end && i + 1 == frames.len());
    }
    let mut out = BytesMut::new();
    let pairs: Vec<(u16, u32)> = body
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    frame::put_settings(&mut out, &pairs);
    let head = Head::parse(&out).expect("a frame");
    assert_eq!(head.frame_len(), out.len());
    let back: Vec<(u16, u32)> = frame::settings(&out[frame::HEADER_LEN..]).collect();
    assert_eq!(back, pairs);
}

/// The readers' answers for one frame stay inside its payload and agree
/// with each other.
fn check_payload(head: &Head, payload: &[u8]) {
    let unpadded = frame::unpadded(head, payload);
    if let Some(r) = &unpadded {
        assert!(r.start <= r.end && r.end <= payload.len(), "{r:?}");
        if head.has(flag::PADDED) {
            assert_eq!(r.start, 1);
            assert_eq!(payload.len() - r.end, usize::from(payload[0]));
        } else {
            assert_eq!(r.clone(), 0..payload.len());
        }
    } else {
        assert!(head.has(flag::PADDED));
    }
    match frame::headers_fragment(head, payload) {
        Some(r) => {
            let u = unpadded.expect("a fragment lies inside the unpadded payload");
            assert!(
                u.start <= r.start && r.end == u.end && r.start <= r.end,
                "{r:?}"
            );
            let prio = if head.has(flag::PRIORITY) { 5 } else { 0 };
            assert_eq!(r.start, u.start + prio);
        }
        None => {
            if let Some(u) = unpadded {
                assert!(head.has(flag::PRIORITY) && u.len() < 5);
            }
        }
    }
    let settings: Vec<(u16, u32)> = frame::settings(payload).collect();
    assert_eq!(settings.len(), payload.len() / 6);
    match frame::payload_u32(payload) {
        Some(v) => assert_eq!(v.to_be_bytes(), payload[..4]),
        None => assert!(payload.len() < 4),
    }
}

/// A header block or DATA written as frames, read back: the payloads
/// concatenated and the frame headers. Every frame is within `max_frame`.
fn reassemble(out: &[u8], first: u8, max_frame: usize) -> (Vec<u8>, Vec<Head>) {
    let mut at = 0;
    let mut body = Vec::new();
    let mut heads = Vec::new();
    while at < out.len() {
        let head = Head::parse(&out[at..]).expect("whole frames");
        assert!(head.len <= max_frame.max(1));
        assert!(at + head.frame_len() <= out.len());
        if heads.is_empty() {
            assert_eq!(head.kind, first);
        }
        body.extend_from_slice(&out[at + frame::HEADER_LEN..at + head.frame_len()]);
        heads.push(head);
        at += head.frame_len();
    }
    assert!(!heads.is_empty());
    (body, heads)
}

// -- HPACK ----------------------------------------------------------------------

/// The HPACK decoder on arbitrary blocks, several in sequence on one
/// connection: with and without a limit on the header list size (the
/// dynamic table must stay the same either way), and field by field.
pub fn hpack_decode(data: &[u8]) {
    let mut input = Input::new(data);
    let limit = usize::from(input.u16());
    let mut limited = hpack::Decoder::default();
    let mut unlimited = hpack::Decoder::default();
    let mut visited = hpack::Decoder::default();
    while !input.is_empty() {
        let len = usize::from(input.u16() % 2048);
        let block = input.bytes(len);
        let all = unlimited.decode_limited(block, usize::MAX);
        let some = limited.decode_limited(block, limit);
        let mut seen: HeaderList = Vec::new();
        let visit = visited.visit(block, |n, v| {
            seen.push((Bytes::copy_from_slice(n), Bytes::copy_from_slice(v)))
        });
        match (&all, &some, &visit) {
            (Ok(all), Ok(some), Ok(())) => {
                assert!(!all.too_large);
                assert_eq!(all.fields, seen);
                let size: usize = all.fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
                assert_eq!(all.size, size);
                assert_eq!(some.size, size);
                assert_eq!(some.too_large, size > limit);
                if some.too_large {
                    assert!(some.fields.is_empty());
                } else {
                    assert_eq!(some.fields, all.fields);
                }
                assert_eq!(
                    hpack::Decoder::default().decode(block).ok().map(|_| ()),
                    hpack::Decoder::default().visit(block, |_, _| {}).ok()
                );
            }
            (Err(a), Err(b), Err(c)) => {
                assert_eq!(a, b);
                assert_eq!(a, c);
                // A decoding error is a connection error: nothing follows.
                return;
            }
            _ => panic!("decoders disagree: {all:?} {some:?} {visit:?}"),
        }
    }
}

/// What the encoder writes, the decoder reads back, across many blocks on
/// one connection, while the peer lowers its table size now and then.
pub fn hpack_roundtrip(data: &[u8]) {
    let mut input = Input::new(data);
    let mut enc = hpack::Encoder::default();
    let mut dec = hpack::Decoder::default();
    // Names and values drawn from a small pool, so that fields repeat and
    // the dynamic table is used.
    let mut pool: Vec<Vec<u8>> = vec![
        b":method".to_vec(),
        b"POST".to_vec(),
        b":path".to_vec(),
        b"/runtime.v1.RuntimeService/Version".to_vec(),
        b"grpc-timeout".to_vec(),
        b"content-type".to_vec(),
        b"application/grpc".to_vec(),
        b"x-bin".to_vec(),
    ];
    let mut blocks = 0;
    while !input.is_empty() && blocks < 64 {
        blocks += 1;
        let op = input.u8();
        if op & 0xf0 == 0xf0 {
            enc.set_peer_max(u32::from(input.u16()));
        }
        let count = usize::from(op & 0x0f);
        let mut list: HeaderList = Vec::with_capacity(count);
        for _ in 0..count {
            let mut pick = |input: &mut Input| -> Vec<u8> {
                let choice = input.u8();
                if choice & 0x80 != 0 || pool.is_empty() {
                    let s = input.string(255).to_vec();
                    if pool.len() < 64 {
                        pool.push(s.clone());
                    }
                    s
                } else {
                    pool[usize::from(choice) % pool.len()].clone()
                }
            };
            let name = pick(&mut input);
            let value = pick(&mut input);
            list.push((name.into(), value.into()));
        }
        let mut block = BytesMut::new();
        enc.encode(&mut block, &list);
        let back = dec
            .decode(&block)
            .unwrap_or_else(|e| panic!("block {blocks} does not decode: {e}: {list:?}"));
        assert_eq!(back, list, "block {blocks}");
        // No field grows by more than its literal encoding.
        let literal: usize = list.iter().map(|(n, v)| n.len() + v.len() + 12).sum();
        assert!(block.len() <= literal + 6, "{} > {literal}", block.len());
    }
}

// -- Annotations, manifests ----------------------------------------------------

/// Keys the annotation and label maps are built from (plus arbitrary ones).
const KEYS: &[&str] = &[
    spec::SIDECARS,
    "sidecar-shim.io/ready.proxy",
    "sidecar-shim.io/ready.log",
    "sidecar-shim.io/ready.istio-proxy",
    spec::RESTART_POLICY,
    spec::READY_TIMEOUT,
    spec::ON_READY_TIMEOUT,
    "sidecar.istio.io/status",
    "linkerd.io/proxy-version",
    "batch.kubernetes.io/job-name",
    "job-name",
    spec::PRE_STOP_HANDLER,
    spec::TERMINATION_GRACE_PERIOD,
];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A map of at most 8 entries from the input: keys mostly from [`KEYS`].
fn map(input: &mut Input) -> HashMap<String, String> {
    let n = input.u8() % 9;
    let mut m = HashMap::new();
    for _ in 0..n {
        let k = input.u8();
        let key = if usize::from(k) < KEYS.len() * 16 {
            KEYS[usize::from(k) % KEYS.len()].to_owned()
        } else {
            text(input.string(40))
        };
        m.insert(key, text(input.string(120)));
    }
    m
}

/// The annotation parser: the pod's sidecar spec, readiness checks,
/// container annotations. The result never depends on the maps' order, and
/// what it accepts is what the spec promises.
pub fn annotations(data: &[u8]) {
    let mut input = Input::new(data);
    let presets = match input.u8() % 4 {
        0 => vec![],
        1 => vec![Preset::Istio],
        2 => vec![Preset::Linkerd],
        _ => vec![Preset::Istio, Preset::Linkerd],
    };
    let defaults = Defaults {
        presets,
        ..Defaults::default()
    };
    let annotations = map(&mut input);
    let labels = map(&mut input);
    let result = spec::parse(&annotations, &labels, &defaults);
    // The same maps with other hash seeds (so another iteration order).
    let again: HashMap<String, String> = annotations.clone().into_iter().collect();
    let labels_again: HashMap<String, String> = labels.clone().into_iter().collect();
    assert_eq!(result, spec::parse(&again, &labels_again, &defaults));
    if let Ok(Some(spec)) = &result {
        assert!(!spec.sidecars.is_empty());
        assert_eq!(
            spec.ready.keys().collect::<Vec<_>>(),
            {
                let mut s: Vec<&String> = spec.sidecars.iter().collect();
                s.sort();
                s
            },
            "a readiness check for exactly the sidecars"
        );
        for (i, s) in spec.sidecars.iter().enumerate() {
            assert!(!s.is_empty() && s.len() <= 63, "{s:?}");
            assert_eq!(spec.sidecar_index(s), Some(i));
        }
        assert!(!spec.ready_timeout.is_zero());
        for check in spec.ready.values() {
            // A check prints as the annotation value that gives it back.
            assert_eq!(
                spec::parse_ready_check(&check.to_string()).as_ref(),
                Ok(check)
            );
        }
        let json = serde_json::to_string(spec).expect("a spec encodes");
        let back: spec::PodSpec = serde_json::from_str(&json).expect("and decodes");
        assert_eq!(&back, spec);
    }
    let _ = spec::applied_presets(&annotations, &defaults);
    let _ = spec::parse_pre_stop(&annotations);
    let _ = spec::grace_period(&annotations);
    let value = text(input.rest());
    if let Ok(check) = spec::parse_ready_check(&value) {
        assert_eq!(spec::parse_ready_check(&check.to_string()), Ok(check));
    }
    if let Ok(d) = config::parse_duration(&value) {
        assert_eq!(
            config::parse_duration(&format!("{}ms", d.as_millis())).ok(),
            Some(d)
        );
    }
}

/// `sidecar-shim check` on arbitrary YAML.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let report = crate::check::check(&text, "fuzz.yaml", &Defaults::default());
    let _ = crate::check::render_text(&report);
    let json = crate::check::render_json(&report);
    serde_json::from_str::<serde_json::Value>(&json).expect("the JSON report is JSON");
}

// -- State files -----------------------------------------------------------------

/// The state directory's file format and the record in it: a file is read
/// back as written, a record decodes, loads into a machine (which then
/// reconciles with the runtime and lives on for a while) and is recorded
/// again the same way.
pub fn state_file(data: &[u8]) {
    // As a whole file.
    if let Ok(body) = store::decode(data) {
        assert_eq!(
            store::encode(body),
            data,
            "a file that decodes is what encode writes"
        );
    }
    // As a body: what encode writes, decode reads.
    let file = store::encode(data);
    assert_eq!(store::decode(&file), Ok(data));
    if !file.is_empty() {
        let mut cut = file.clone();
        cut.pop();
        assert!(store::decode(&cut).is_err(), "a truncated file is corrupt");
    }
    // The record, as the service loads it.
    let Ok(record) = serde_json::from_slice::<PodRecord>(data) else {
        return;
    };
    if record.version != RECORD_VERSION {
        return;
    }
    let pod = record.pod.clone();
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let clock = WallClock::at(now, wall);
    let mut m = Machine::new(Settings::default());
    m.restore(now, &clock, record.clone());
    let first = m.record(&pod, &clock);
    if let Some(first) = &first {
        // Recording is stable once loaded.
        let mut m2 = Machine::new(Settings::default());
        m2.restore(now, &clock, first.clone());
        assert_eq!(m2.record(&pod, &clock).as_ref(), Some(first));
        let json = serde_json::to_vec(first).expect("a record encodes");
        assert_eq!(
            &serde_json::from_slice::<PodRecord>(&json).expect("decodes"),
            first
        );
    }
    // The runtime reports the pod with its containers in some state.
    let value = serde_json::from_slice::<serde_json::Value>(data).ok();
    let containers: Vec<RuntimeContainer> = value
        .as_ref()
        .and_then(|v| v.get("containers"))
        .and_then(|c| c.as_array())
        .map(|cs| {
            cs.iter()
                .enumerate()
                .map(|(i, c)| RuntimeContainer {
                    id: c
                        .get("id")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_owned(),
                    name: c
                        .get("name")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_owned(),
                    attempt: 0,
                    state: match i % 4 {
                        0 => RuntimeState::Running,
                        1 => RuntimeState::Exited { code: 1 },
                        2 => RuntimeState::Created,
                        _ => RuntimeState::Unknown,
                    },
                    pre_stop: None,
                    grace: Some(Duration::from_secs(30)),
                    regular: true,
                })
                .collect()
        })
        .unwrap_or_default();
    let spec = m.pod_spec(&pod);
    let runtime = vec![RuntimePod {
        id: pod.clone(),
        name: "default/fuzz".to_owned(),
        spec,
        containers: containers.clone(),
    }];
    let (_actions, _report) = m.reconcile(now, runtime);
    // Time passes; the machine acts on its deadlines; the containers exit.
    let mut t = now;
    for step in 0..16 {
        let next = m.next_deadline().unwrap_or(t + Duration::from_secs(1));
        t = next.max(t);
        let _ = m.handle(t, Event::Tick);
        if step == 8 {
            for c in &containers {
                let _ = m.handle(
                    t,
                    Event::Exited {
                        container: c.id.clone(),
                        code: 0,
                    },
                );
            }
        }
        let _ = m.record(&pod, &clock);
    }
    let _ = m.take_touched();
}

// -- The config file -----------------------------------------------------------

/// The config file: parsed, merged with the command line's defaults, and
/// turned into the lifecycle's settings.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    let cli = <Cli as clap::Parser>::parse_from(["sidecar-shim"]);
    if let Ok(config) = Config::merge(&cli, Some(file.clone())) {
        assert!(config.listen.is_absolute() && config.state_dir.is_absolute());
        assert_ne!(config.listen, config.runtime_socket);
        let defaults = config.lifecycle.defaults();
        assert!(spec::check_ready_timeout(defaults.ready_timeout).is_ok());
        let _ = config.lifecycle.settings();
        // The file's values win over the defaults.
        if let Some(d) = file.drain_timeout {
            assert_eq!(config.drain_timeout, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets accept anything, and the empty input in particular.
    #[test]
    fn every_target_takes_the_empty_input_and_some_bytes() {
        for (name, target) in TARGETS {
            target(b"");
            target(&[0u8; 64]);
            target(&[0xffu8; 64]);
            let _ = name;
        }
    }
}
