//! gRPC over HTTP/2 as the proxy speaks it when it answers a call itself:
//! message framing, response header blocks and status trailers
//! (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).

use bytes::{BufMut, Bytes, BytesMut};

use super::hpack::{self, HeaderList};

/// Split a complete unary request body into its single message.
pub fn unary_message(body: &[u8]) -> Result<Bytes, tonic::Status> {
    if body.len() < 5 {
        return Err(tonic::Status::internal(
            "sidecar-shim: request carries no gRPC message",
        ));
    }
    if body[0] != 0 {
        return Err(tonic::Status::unimplemented(
            "sidecar-shim: compressed requests are not supported for this method",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + len {
        return Err(tonic::Status::internal(
            "sidecar-shim: request body is not exactly one gRPC message",
        ));
    }
    Ok(Bytes::copy_from_slice(&body[5..]))
}

/// Prefix an encoded message with the gRPC length-prefix.
pub fn frame_message(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

/// Response headers of a successful call.
pub fn response_headers() -> HeaderList {
    vec![
        (Bytes::from_static(b":status"), Bytes::from_static(b"200")),
        (
            Bytes::from_static(b"content-type"),
            Bytes::from_static(b"application/grpc"),
        ),
    ]
}

/// Trailers carrying a status; with `trailers_only` the list also carries
/// the response headers (a "Trailers-Only" response).
pub fn status_headers(status: &tonic::Status, trailers_only: bool) -> HeaderList {
    let mut out = if trailers_only {
        response_headers()
    } else {
        Vec::new()
    };
    out.push((
        Bytes::from_static(b"grpc-status"),
        (status.code() as i32).to_string().into(),
    ));
    let message = percent_encode(status.message());
    if !message.is_empty() {
        out.push((Bytes::from_static(b"grpc-message"), message.into()));
    }
    out
}

/// The `grpc-status` of a header list, if it has one.
pub fn status_of(headers: &HeaderList) -> Option<tonic::Code> {
    hpack::get(headers, b"grpc-status").map(tonic::Code::from_bytes)
}

/// grpc-message is percent-encoded: printable ASCII except '%' is sent as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse a grpc-timeout header value (e.g. "119999m") into a duration.
pub fn parse_timeout(v: &[u8]) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_framing_roundtrips() {
        let framed = frame_message(b"hello");
        assert_eq!(
            unary_message(&framed).unwrap(),
            Bytes::from_static(b"hello")
        );
        assert!(unary_message(&framed[..6]).is_err());
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(
            unary_message(&compressed).unwrap_err().code(),
            tonic::Code::Unimplemented
        );
    }

    #[test]
    fn status_headers_carry_code_and_encoded_message() {
        let st = tonic::Status::unavailable("runtime down: 100% gone\n");
        let list = status_headers(&st, true);
        assert_eq!(hpack::get(&list, b":status"), Some(&b"200"[..]));
        assert_eq!(hpack::get(&list, b"grpc-status"), Some(&b"14"[..]));
        assert_eq!(
            hpack::get(&list, b"grpc-message"),
            Some(&b"runtime down: 100%25 gone%0A"[..])
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(
            parse_timeout(b"119999m"),
            Some(std::time::Duration::from_millis(119_999))
        );
        assert_eq!(
            parse_timeout(b"2S"),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"123456789S"), None);
        assert_eq!(parse_timeout(b"12x"), None);
    }
}
