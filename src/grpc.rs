//! The little of gRPC that weir speaks itself: message framing and the standard health
//! service's messages (`grpc.health.v1`), for the identity probe and the demo's model server.
//! Everything else about a gRPC call passes through weir as HTTP/2.

use bytes::Bytes;

/// The health service's Check method.
pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// `HealthCheckResponse.ServingStatus.SERVING`.
pub const SERVING: u64 = 1;
/// `HealthCheckResponse.ServingStatus.NOT_SERVING`.
pub const NOT_SERVING: u64 = 2;

/// `message` in its gRPC frame: not compressed, then its length.
pub fn frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

/// The message of the first gRPC frame of `body`; `None` if it is cut short or compressed.
pub fn message(body: &[u8]) -> Option<&[u8]> {
    let (prefix, rest) = body.split_at_checked(5)?;
    if prefix[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    rest.get(..len)
}

/// A `grpc.health.v1.HealthCheckRequest` for `service`, in its gRPC message frame.
pub fn health_check_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 8);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    frame(&message)
}

/// A framed `grpc.health.v1.HealthCheckResponse` with `status`.
pub fn health_check_response(status: u64) -> Bytes {
    let mut message = vec![0x08]; // field 1, varint
    put_varint(&mut message, status);
    frame(&message)
}

/// The service a framed `HealthCheckRequest` asks about (`""`: the server as a whole).
pub fn health_check_service(body: &[u8]) -> Option<String> {
    let mut message = message(body)?;
    let mut service = String::new();
    for_each_field(&mut message, |field, value| {
        if let (1, Value::Bytes(bytes)) = (field, value) {
            service = String::from_utf8_lossy(bytes).into_owned();
        }
    })?;
    Some(service)
}

/// The `status` of a framed `grpc.health.v1.HealthCheckResponse`, by its enum name.
pub fn serving_status(body: &[u8]) -> Result<String, String> {
    let malformed = || "a malformed HealthCheckResponse".to_string();
    if body.first().is_some_and(|&b| b != 0) {
        return Err("a compressed HealthCheckResponse".into());
    }
    let mut message = message(body).ok_or_else(malformed)?;
    let mut status = 0;
    for_each_field(&mut message, |field, value| {
        if let (1, Value::Varint(n)) = (field, value) {
            status = n;
        }
    })
    .ok_or_else(malformed)?;
    Ok(match status {
        SERVING => "SERVING",
        NOT_SERVING => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "UNKNOWN",
    }
    .to_string())
}

/// A protobuf field's value, as far as these messages need it.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Calls `each` with every field of a protobuf message; `None` if the message is malformed.
fn for_each_field<'a>(message: &mut &'a [u8], mut each: impl FnMut(u64, Value<'a>)) -> Option<()> {
    while !message.is_empty() {
        let tag = varint(message)?;
        let value = match tag & 7 {
            0 => Value::Varint(varint(message)?),
            2 => {
                let len = varint(message)? as usize;
                let (bytes, rest) = message.split_at_checked(len)?;
                *message = rest;
                Value::Bytes(bytes)
            }
            1 => {
                *message = message.get(8..)?;
                Value::Fixed
            }
            5 => {
                *message = message.get(4..)?;
                Value::Fixed
            }
            _ => return None,
        };
        each(tag >> 3, value);
    }
    Some(())
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_messages_are_framed_and_read_as_protobuf() {
        let request = health_check_request("chat@v2");
        assert_eq!(&request[..5], &[0, 0, 0, 0, 9]);
        assert_eq!(&request[5..], b"\x0a\x07chat@v2");
        assert_eq!(&health_check_request("")[..], &[0, 0, 0, 0, 0]);
        let long = "m".repeat(200);
        assert_eq!(&health_check_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 2, 0x08, 1]).unwrap(),
            "SERVING"
        );
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 2, 0x08, 2]).unwrap(),
            "NOT_SERVING"
        );
        // An unknown field first, then status; an empty message is UNKNOWN (proto3 default).
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]).unwrap(),
            "SERVING"
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]).unwrap(), "UNKNOWN");
        assert!(serving_status(&[0, 0, 0]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 2, 0x12, 9]).is_err());
    }

    #[test]
    fn a_health_request_is_read_back_and_a_response_written() {
        assert_eq!(
            health_check_service(&health_check_request("chat@v2")).unwrap(),
            "chat@v2"
        );
        assert_eq!(health_check_service(&health_check_request("")).unwrap(), "");
        assert_eq!(
            health_check_service(&[0, 0, 0, 0, 3, 0x0a, 5, b'x']),
            None,
            "cut short"
        );
        assert_eq!(
            serving_status(&health_check_response(SERVING)).unwrap(),
            "SERVING"
        );
        assert_eq!(
            serving_status(&health_check_response(NOT_SERVING)).unwrap(),
            "NOT_SERVING"
        );
    }
}
